"""The modality-robust training objective (SPEC §2) and its data side.

``robust`` (the loss: clean pass, attack, adversarial pass, consistency, with :class:`RobustConfig`
and the published presets), ``model_hooks`` (how the perturbation reaches a Hugging Face model and
how the LM head sees only the answer rows), ``augment`` (the paper's heuristic copies and the
collator), ``distractors`` (the pool of irrelevant sentences).
"""

from modkern.objective.robust import PRESETS, RobustConfig, RobustOutput, clean_loss, robust_loss

__all__ = ["PRESETS", "RobustConfig", "RobustOutput", "clean_loss", "robust_loss"]
