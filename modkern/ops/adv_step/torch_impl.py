"""PyTorch backend of the masked PGD step (same contract as ``modkern.kernels.adv_step``).

The reference (``modkern.ops.adv_step.reference``) *is* the math; this backend runs it in fp32
(fp64 for fp64 ``delta``) and writes the result into ``out``. It moves several passes over the
tensor (upcasts, where, norms, clamp), which is fine on CPU; the fused kernels exist for the GPU.
"""

from __future__ import annotations

import torch

from modkern.ops.adv_step.reference import masked_adv_step as reference_step


def step(delta, grad, mask, out, alpha, alpha_t, epsilon, epsilon_t, step, norm):
    """Write one masked PGD step of ``delta [B, L, H]`` into ``out`` (which may be ``delta``).

    ``mask``: bool ``[B, L]``. ``alpha_t`` / ``epsilon_t``: 0-dim tensors on the device, used
    instead of the Python floats ``alpha`` / ``epsilon`` when given (their values are never read
    on the host). ``norm``: ``"linf"``, ``"l2"``, ``"l2_token"`` or ``"none"``.
    """
    acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
    a = alpha if alpha_t is None else alpha_t.to(acc)
    e = epsilon if epsilon_t is None else epsilon_t.to(acc)
    new = reference_step(
        delta.to(acc), grad, mask, alpha=a, epsilon=e, step=step, norm=None if norm == "none" else norm
    )
    out.copy_(new)
    return out
