"""The one-read entry points (``forward_with_grads``, ``scale_``) for the divergence backends that
have no kernel of their own for them (PyTorch, CUDA): composed from their forward and backward."""

from __future__ import annotations

from modkern.constants import accumulation_dtype


def forward_with_grads(forward, backward, p, q, ref_index, mask, weight, spec):
    """``(loss_rows, grad_p, grad_q)``: the backend's ``forward``, then its ``backward`` with
    ``weight`` (a 0-dim tensor) as every row's incoming gradient."""
    rows, stats, saved_p, saved_q = forward(p, q, ref_index, mask, spec)
    grad_rows = weight.to(stats.dtype).expand(q.shape[0])
    grad_p, grad_q = backward(grad_rows, p, q, ref_index, mask, stats, saved_p, saved_q, spec)
    return rows, grad_p, grad_q


def scale_(grad_scale, *tensors):
    """``t *= grad_scale`` in place for each tensor (the product in the accumulation dtype)."""
    for t in tensors:
        t.copy_(t * grad_scale.to(device=t.device, dtype=accumulation_dtype(t)))
