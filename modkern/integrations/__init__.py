"""modkern inside other training frameworks: ``hf`` (the Hugging Face ``Trainer`` and TRL-style
subclasses: ``patch_trainer``, ``make_robust_trainer``, ``RobustTrainerMixin``)."""
