"""CUDA backend of ``modkern.perturb`` (same contract as ``modkern.ops.perturb.torch_impl``).

Thin wrapper over ``modkern._C.perturb_forward`` / ``perturb_backward`` (``csrc/perturb*``); the
inputs are contiguous (the registered ops make them so). float64 inputs run the PyTorch backend.
"""

from __future__ import annotations

import torch

from modkern.ops.cuda_ext import ext


def forward(embeds, delta, mask):
    """``embeds + delta * mask`` in fp32, returned in ``embeds.dtype``."""
    out = torch.empty_like(embeds, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    return ext().perturb_forward(embeds, delta, mask, out)


def backward(grad_out, mask, delta_dtype):
    """Gradient for ``delta``: ``grad_out`` on selected tokens, 0 elsewhere, in ``delta_dtype``."""
    grad_delta = torch.empty(grad_out.shape, dtype=delta_dtype, device=grad_out.device)
    if grad_delta.numel() == 0:
        return grad_delta
    return ext().perturb_backward(grad_out, mask, grad_delta)
