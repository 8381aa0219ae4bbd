"""CUDA backend of the divergence family (same contract as ``modkern.ops.divergence.torch_impl``).

Thin wrapper over ``modkern._C.divergence_forward`` / ``divergence_backward`` (``csrc/divergence*``):
the forward computes per-row losses, row statistics and the per-row gradients in one kernel (row
slices kept in shared memory, split over a thread-block cluster on Hopper); the backward scales
the stored gradients, or with ``ref_index`` recomputes P's gradient per P row over its copies.
float64 and float16 inputs run the PyTorch backend (the ``Impl`` dtypes registered in ``modkern.ops.divergence.api``).
"""

from __future__ import annotations

from modkern.ops.cuda_ext import ext
from modkern.ops.dispatch import DIVERGENCE_KIND_IDS as KIND_IDS  # = the C++ kind codes (csrc/divergence.h)
from modkern.ops.divergence import composed

# The forward stores each row's gradients (rows cached in shared memory: one HBM read of the
# logits); the backward scales them (modkern.ops.divergence.api.STORES_GRADIENTS).


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


def forward_with_grads(p, q, ref_index, mask, weight, spec):
    """The forward, then the backward with ``weight`` as every row's incoming gradient."""
    return composed.forward_with_grads(forward, backward, p, q, ref_index, mask, weight, spec)


scale_ = composed.scale_
