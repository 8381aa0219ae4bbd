"""``modkern train --model DIR --data FILE --out DIR``: robust fine-tuning of a local checkpoint on a data file.

The model and its processor come from the checkpoint (``from_pretrained``), the samples from the
data file (:mod:`modkern.data`), the batches from the model's own processor with the paper's copies
(:mod:`modkern.processing`) and the loss from :func:`modkern.integrations.hf.patch_trainer` on a
plain Hugging Face ``Trainer`` (so ``--fsdp`` / ``--deepspeed`` and ``torchrun`` / ``accelerate
launch`` work as for any Trainer run). Each training item is one batch of the sample mix
(image-heavy : text-heavy : VQA, the official 2:2:4 scaled to ``batch_size``;
:class:`modkern.data.KindMixSampler`), composed once per run from the seed; the Trainer shuffles
their order every epoch and splits them over processes. An audio-video data file (MMA-Bench's
alignment tuning) is cut into batches of ``batch_size`` samples in a seeded shuffle (no mix: the
paper prescribes none), its copies are the alignment copies
(:class:`modkern.objective.alignment.AlignmentConfig`, ``FinetuneConfig.alignment``) and the attack
perturbs the stream the question does not ask about (:data:`~modkern.objective.alignment.ALIGNMENT_POLICY`,
added to ``robust.policy`` for the kinds it does not name); a file mixing audio-video and image
samples is refused. Evaluation (``eval_data``) is the plain CE
of the clean samples, without copies. The run ends with the model and its processor in ``out``
(loadable with ``from_pretrained`` / ``AutoProcessor``), the Trainer's checkpoints in
``out/checkpoints`` (resume with ``resume``) and ``out/finetune.json`` (settings, log history).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from modkern.data import OFFICIAL_MIX, KindMixSampler, read_samples
from modkern.objective.alignment import ALIGNMENT_POLICY, AlignmentConfig
from modkern.objective.augment import RobustCollator
from modkern.objective.config import RobustConfig
from modkern.processing import ChatProcessor, ProcessorError, processor_collator, sampling_rate_of, to_sample


class FinetuneError(ValueError):
    """A problem with the inputs of :func:`run_finetune` (checkpoint, processor, data, settings)."""


@dataclass
class FinetuneConfig:
    """Settings of :func:`run_finetune` (the ``modkern train --data`` options)."""

    model: str
    data: str
    out: str
    robust: RobustConfig = field(default_factory=RobustConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)  # the copies of audio-video data
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float = 2e-5  # the official LLaVA configs (1e-5 for Qwen)
    batch_size: int = 8  # samples per batch before the copies
    grad_accum: int = 1
    mix: Optional[dict] = None  # kind -> count per batch (default: the official 2:2:4 scaled; image data only)
    bf16: bool = False
    eval_data: Optional[str] = None
    skip_bad: bool = False
    seed: int = 0
    resume: Optional[str] = None  # a checkpoint directory, or "last" (the newest in out/checkpoints)
    save_steps: int = 500
    device: str = "auto"
    fsdp: str = ""
    fsdp_config: Optional[str] = None
    deepspeed: Optional[str] = None
    progress: bool = True


def mix_for_batch(batch_size: int, kinds: set, ratio: Optional[dict] = None) -> dict:
    """Samples of each kind per batch: ``ratio`` (default :data:`OFFICIAL_MIX`) over the kinds the
    data has, scaled to ``batch_size`` as the official code does (``int(bs * share)`` of each kind,
    the rest to the last one: 8 -> 2:2:4)."""
    ratio = {k: n for k, n in (ratio or OFFICIAL_MIX).items() if k in kinds and n > 0}
    if not ratio:
        raise FinetuneError(f"the mix asks for none of the kinds the data has ({sorted(kinds)})")
    total = sum(ratio.values())
    mix = {k: int(batch_size * n / total) for k, n in ratio.items()}
    last = list(ratio)[-1]
    mix[last] += batch_size - sum(mix.values())
    return mix


def default_mix(samples: list, batch_size: int, log=print) -> dict:
    """The official mix scaled to ``batch_size`` (:func:`mix_for_batch`); for data too small to make
    one batch of it, the data's own proportions over ``min(batch_size, len(samples))`` (said)."""
    counts = {k: sum(s.kind == k for s in samples) for k in OFFICIAL_MIX}
    mix = mix_for_batch(batch_size, {k for k, n in counts.items() if n})
    if all(counts[k] >= n for k, n in mix.items()):
        return mix
    size = min(batch_size, len(samples))
    own = mix_for_batch(size, {k for k, n in counts.items() if n}, {k: n for k, n in counts.items() if n})
    log(f"the data cannot fill one batch of the mix {mix} (it has {counts}): batches of {own} instead")
    return own


def is_av_data(samples: list, what: str) -> bool:
    """Whether ``samples`` are audio-video ones (a :class:`FinetuneError` when they mix the two:
    their copies, batches and attack targets differ)."""
    av = [s for s in samples if s.is_av]
    other = [s for s in samples if not s.is_av]
    if av and other:
        raise FinetuneError(
            f"{what} mixes audio-video samples (line {av[0].line}) with image or text samples (line "
            f"{other[0].line}): fine-tune on them in separate runs"
        )
    return bool(av)


def mix_batches(samples: list, mix: dict, seed: int) -> list:
    """The index batches of a fixed kind mix (:class:`modkern.data.KindMixSampler`), composed once."""
    try:  # the sampler checks that the data has enough samples of every kind the mix asks for
        return list(KindMixSampler([s.kind for s in samples], mix, seed=seed))
    except ValueError as exc:
        raise FinetuneError(f"--mix: {exc}") from None


def shuffled_batches(n: int, batch_size: int, seed: int) -> list:
    """``n`` sample indices in a seeded shuffle, cut into batches of ``batch_size`` (the last one
    may be smaller): the batches of audio-video data."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class SampleBatches:
    """A map-style dataset whose items are whole batches (lists of samples, :func:`mix_batches` or
    :func:`shuffled_batches`); the media are read (``read``: a data-file sample -> a sample) when an
    item is taken."""

    def __init__(self, samples: list, batches: list, read=to_sample):
        self.samples, self.batches, self.read = samples, batches, read

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return {"samples": [self.read(self.samples[j]) for j in self.batches[i]], "copies": True}


class CleanSamples:
    """A dataset of single clean samples (evaluation: no copies)."""

    def __init__(self, samples: list, read=to_sample):
        self.samples, self.read = samples, read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return {"samples": [self.read(self.samples[i])], "copies": False}


@dataclass
class GroupCollator:
    """Flattens dataset items (``{"samples": [...], "copies": bool}``) into one batch: with the
    paper's copies for training items, without for evaluation ones."""

    train: RobustCollator
    clean: RobustCollator

    def __call__(self, items: list) -> dict:
        samples = [s for item in items for s in item["samples"]]
        return (self.train if all(item["copies"] for item in items) else self.clean)(samples)


def load_model_and_processor(path: str):
    """``(model, processor)`` of a local checkpoint (a :class:`FinetuneError` saying what is missing)."""
    from modkern.apps.frames_video import load_processor
    from modkern.apps.train_loop import load_checkpoint
    from modkern.processing import check_processor

    try:
        processor = load_processor(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure means: no usable processor there
        raise FinetuneError(f"--model {path}: no processor could be loaded ({type(exc).__name__}: {exc})") from None
    try:
        check_processor(processor)
    except ProcessorError as exc:
        raise FinetuneError(f"--model {path}: {exc}") from None
    try:
        model = load_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"--model {path}: {exc}") from None
    return model, processor


def _training_args(cfg: FinetuneConfig, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=os.path.join(cfg.out, "checkpoints"),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=1,  # one item = one batch of the mix
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        bf16=cfg.bf16,
        logging_steps=1,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="epoch" if has_eval else "no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cfg.device != "cpu" and torch.cuda.is_available(),
        seed=cfg.seed,
        use_cpu=cfg.device == "cpu",
        disable_tqdm=not cfg.progress,
        fsdp=cfg.fsdp,
        fsdp_config=cfg.fsdp_config,
        deepspeed=cfg.deepspeed,
    )


def _resume_path(cfg: FinetuneConfig):
    if cfg.resume != "last":
        return cfg.resume
    from transformers.trainer_utils import get_last_checkpoint

    folder = os.path.join(cfg.out, "checkpoints")
    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last is None:
        raise FinetuneError(f"--resume last: no checkpoint in {folder}")
    return last


def _read(path: str, skip_bad: bool, log) -> list:
    data = read_samples(path, skip_bad=skip_bad)
    if data.skipped:
        log(data.skipped_note())
    return data.samples


def run_finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with the robust objective; returns the summary written
    to ``out/finetune.json`` (``final_loss``, ``steps``, ``log_history``, the settings)."""
    from transformers import Trainer

    from modkern.integrations.hf import patch_trainer

    samples = _read(cfg.data, cfg.skip_bad, log)
    eval_samples = _read(cfg.eval_data, cfg.skip_bad, log) if cfg.eval_data else None
    av = is_av_data(samples + (eval_samples or []), "--data" + (" with --eval" if eval_samples else ""))
    if av and cfg.mix is not None:
        raise FinetuneError("--mix applies to image data; audio-video batches are a shuffle of the data")
    if not av and cfg.alignment != AlignmentConfig():
        raise FinetuneError("--av-copies, --no-audio-answer and --no-video-answer apply to audio-video data files")
    mix = None if av else cfg.mix if cfg.mix is not None else default_mix(samples, cfg.batch_size, log)
    batches = shuffled_batches(len(samples), cfg.batch_size, cfg.seed) if av else mix_batches(samples, mix, cfg.seed)
    robust = dataclasses.replace(cfg.robust, policy={**ALIGNMENT_POLICY, **cfg.robust.policy}) if av else cfg.robust
    model, processor = load_model_and_processor(cfg.model)
    read = functools.partial(to_sample, sampling_rate=sampling_rate_of(processor))
    train = processor_collator(processor, augment=cfg.alignment if av else None, seed=cfg.seed)
    clean = RobustCollator(collate=ChatProcessor(processor))
    trainer = Trainer(
        model=model,
        args=_training_args(cfg, eval_samples is not None),
        train_dataset=SampleBatches(samples, batches, read),
        eval_dataset=CleanSamples(eval_samples, read) if eval_samples else None,
        data_collator=GroupCollator(train, clean),
        processing_class=processor,
    )
    patch_trainer(trainer, robust)
    if trainer.is_world_process_zero():
        shape = f"shuffled batches of {cfg.batch_size} with alignment copies" if av else f"batches of {mix}"
        log(f"robust fine-tuning of {cfg.model} on {len(samples)} samples of {cfg.data}: {shape}")
    result = trainer.train(resume_from_checkpoint=_resume_path(cfg))
    trainer.save_model(cfg.out)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "mix": mix,
        "samples": len(samples),
        "world_size": trainer.args.world_size,
        "settings": {**{k: v for k, v in asdict(cfg).items() if k != "robust"}, "robust": asdict(robust)},
        "log_history": history,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(cfg.out, "finetune.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
        log(f"wrote the fine-tuned model and its processor to {cfg.out} (log: {cfg.out}/finetune.json)")
    return summary


__all__ = [
    "CleanSamples",
    "FinetuneConfig",
    "FinetuneError",
    "GroupCollator",
    "SampleBatches",
    "is_av_data",
    "load_model_and_processor",
    "mix_batches",
    "mix_for_batch",
    "run_finetune",
    "shuffled_batches",
]
