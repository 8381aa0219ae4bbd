"""Readable PyTorch references: the executable specification of every modkern op.

They follow SPEC §1 literally, run in whatever dtype they are given (use float64 for ground
truth) and are differentiated by ordinary autograd. Tests compare every backend with them.
"""

from modkern.reference.adversarial import masked_adv_step, modality_mask_rows, perturb
from modkern.reference.divergence import js_divergence, kl_divergence
from modkern.reference.linear_divergence import linear_js_divergence, linear_kl_divergence

__all__ = [
    "js_divergence",
    "kl_divergence",
    "linear_js_divergence",
    "linear_kl_divergence",
    "masked_adv_step",
    "modality_mask_rows",
    "perturb",
]
