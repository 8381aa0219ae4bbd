"""Readable PyTorch references: the executable specification of every modkern op, gathered from
the ops' folders (``modkern/ops/<op>/reference.py``).

They follow SPEC §1 literally, run in whatever dtype they are given (use float64 for ground
truth) and are differentiated by ordinary autograd. Tests compare every backend with them.
"""

from modkern.ops.adv_step.reference import masked_adv_step
from modkern.ops.divergence.reference import js_divergence, kl_divergence
from modkern.ops.linear_divergence.reference import linear_js_divergence, linear_kl_divergence
from modkern.ops.perturb.reference import modality_mask_rows, perturb

__all__ = [
    "js_divergence",
    "kl_divergence",
    "linear_js_divergence",
    "linear_kl_divergence",
    "masked_adv_step",
    "modality_mask_rows",
    "perturb",
]
