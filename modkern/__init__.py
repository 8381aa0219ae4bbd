"""modkern: fused GPU kernels for modality-robust fine-tuning of multimodal LLMs.

Public API (see each function's docstring for the math)::

    from modkern import fused_js, fused_kl, masked_adv_step, init_delta, perturb, modality_mask
    from modkern import fused_linear_kl, fused_linear_js  # the same from LM-head hidden states, chunked
"""

from modkern.ops.adv_step import masked_adv_step
from modkern.ops.dispatch import available_backends, resolve_backend
from modkern.ops.divergence import FusedDivergence, fused_js, fused_kl
from modkern.ops.linear_divergence import fused_linear_js, fused_linear_kl
from modkern.ops.perturb import perturb
from modkern.ops.perturb.delta_init import init_delta
from modkern.ops.perturb.mask import modality_mask

__version__ = "0.1.0"

__all__ = [
    "FusedDivergence",
    "available_backends",
    "fused_js",
    "fused_kl",
    "fused_linear_js",
    "fused_linear_kl",
    "init_delta",
    "masked_adv_step",
    "modality_mask",
    "perturb",
    "resolve_backend",
]
