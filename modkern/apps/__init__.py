"""modkern's applications, built on the library and never imported by it.

- :mod:`modkern.apps.cli` - the ``modkern`` console command (``train``, ``selfcheck``, ``diagnose``);
- :mod:`modkern.apps.demo` - the main job, ``modkern train``: SFT vs the paper's recipe on a synthetic task;
- :mod:`modkern.apps.diagnose` - ``modkern diagnose``: how much modality interference a model has;
- :mod:`modkern.apps.train_loop` - a thin training loop over :func:`modkern.objective.robust.robust_loss`;
- :mod:`modkern.apps.synthetic_task` - the demo's synthetic modality-interference task and word tokenizer;
- :mod:`modkern.apps.tiny_models` - tiny LLaVA / Qwen2-VL / Qwen2.5-Omni / Llama models built from configs;
- :mod:`modkern.apps.progress` - the progress display shared by the long-running applications.
"""
