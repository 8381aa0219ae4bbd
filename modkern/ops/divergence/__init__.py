"""``fused_js`` / ``fused_kl``: the divergence op family.

``api`` (spec, custom ops, autograd, the public functions), ``reference`` (the float64 spec),
``torch_impl`` and ``cuda_impl`` (backends; the Triton one is ``kernels/divergence.py``).
"""

from modkern.ops.divergence.api import (
    DIRECTIONS,
    GRAD_MODES,
    KINDS,
    DivergenceSpec,
    FusedDivergence,
    divergence_bwd,
    divergence_fwd,
    fused_js,
    fused_kl,
)

__all__ = [
    "DIRECTIONS",
    "GRAD_MODES",
    "KINDS",
    "DivergenceSpec",
    "FusedDivergence",
    "divergence_bwd",
    "divergence_fwd",
    "fused_js",
    "fused_kl",
]
