"""CUDA backend of the masked PGD step (same contract as ``modkern.ops.adv_step.torch_impl``).

Thin wrapper over ``modkern._C.adv_step`` (``csrc/adv_step*``): one pass for the paper's raw / sign
step with an Linf or no projection; a split per-sample reduction first for the l2 / linf steps and
the l2 projection. float64 ``delta`` or ``grad`` runs the PyTorch backend.
"""

from __future__ import annotations

from modkern.constants import NORM_CODES, STEP_CODES
from modkern.ops.cuda_ext import ext


def step(delta, grad, mask, out, alpha, alpha_t, epsilon, epsilon_t, step, norm):
    """Write one masked PGD step of ``delta [B, L, H]`` into ``out`` (which may be ``delta``)."""
    if delta.numel() == 0:
        return out
    ext().adv_step(
        delta, grad, mask, out, float(alpha), alpha_t, float(epsilon), epsilon_t, STEP_CODES[step], NORM_CODES[norm]
    )
    return out
