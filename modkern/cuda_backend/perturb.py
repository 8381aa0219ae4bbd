"""CUDA backend of ``modkern.perturb`` (same contract as ``modkern.torch_backend.perturb``).

Thin wrapper over ``modkern._C.perturb_forward`` / ``perturb_backward`` (``csrc/perturb*``); the
inputs are contiguous (the registered ops make them so). float64 inputs run the PyTorch backend.
"""

from __future__ import annotations

import torch

from modkern.cuda_backend._ext import ext, kernel_dtypes
from modkern.torch_backend import perturb as _torch_impl


def forward(embeds, delta, mask):
    """``embeds + delta * mask`` in fp32, returned in ``embeds.dtype``."""
    if not kernel_dtypes(embeds, delta):
        return _torch_impl.forward(embeds, delta, mask)
    out = torch.empty_like(embeds, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    return ext().perturb_forward(embeds, delta, mask, out)


def backward(grad_out, mask, delta_dtype):
    """Gradient for ``delta``: ``grad_out`` on selected tokens, 0 elsewhere, in ``delta_dtype``."""
    if grad_out.dtype not in (torch.float32, torch.bfloat16, torch.float16) or delta_dtype == torch.float64:
        return _torch_impl.backward(grad_out, mask, delta_dtype)
    grad_delta = torch.empty(grad_out.shape, dtype=delta_dtype, device=grad_out.device)
    if grad_delta.numel() == 0:
        return grad_delta
    return ext().perturb_backward(grad_out, mask, grad_delta)
