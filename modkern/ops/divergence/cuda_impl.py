"""CUDA backend of the divergence family (same contract as ``modkern.ops.divergence.torch_impl``).

Thin wrapper over ``modkern._C.divergence_forward`` / ``divergence_backward`` (``csrc/divergence*``):
the forward computes per-row losses, row statistics and the per-row gradients in one kernel (row
slices kept in shared memory, split over a thread-block cluster on Hopper); the backward scales
the stored gradients, or with ``ref_index`` recomputes P's gradient per P row over its copies.
float64 and float16 inputs run the PyTorch backend (see ``SUPPORTED_DTYPES``).
"""

from __future__ import annotations

import torch

from modkern.ops.cuda_ext import ext
from modkern.ops.dispatch import DIVERGENCE_KIND_IDS as KIND_IDS  # = the C++ kind codes (csrc/divergence.h)

# float64 runs the PyTorch backend (modkern.ops.dispatch.load_impl), and so does float16: the CUDA kernels
# store the forward's gradients in the logits' dtype, and fp16 needs them in fp32
# (modkern.ops.dispatch.saved_grad_dtype). bf16 / fp32 are the training dtypes this backend is for.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# The forward stores each row's gradients (rows cached in shared memory: one HBM read of the
# logits); the backward scales them.
STORES_GRADIENTS = True


def forward(p, q, ref_index, mask, spec):
    """``spec``: a ``modkern.ops.divergence.DivergenceSpec``."""
    return ext().divergence_forward(
        p, q, ref_index, mask, KIND_IDS[spec.kind], spec.beta, spec.inv_temperature, spec.need_grad_p, spec.need_grad_q
    )


def backward(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec):
    tensors = (grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q)
    return ext().divergence_backward(
        *tensors, KIND_IDS[spec.kind], spec.beta, spec.inv_temperature, spec.need_grad_p, spec.need_grad_q
    )
