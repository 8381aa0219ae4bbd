"""PyTorch backend of ``modkern.perturb`` (same contract as ``modkern.kernels.perturb``)."""

from __future__ import annotations

import torch

from modkern.ops.perturb.reference import perturb as forward  # noqa: F401  (the reference is the math)


def backward(grad_out, mask, delta_dtype):
    """Gradient for ``delta``: ``grad_out`` on selected tokens, 0 elsewhere, in ``delta_dtype``."""
    keep = mask[..., None]
    return torch.where(keep, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)).to(delta_dtype)
