"""``perturb``: add a perturbation to the embeddings of the masked tokens, autograd-aware.

Layers, bottom-up:

1. backend modules (``modkern.ops.perturb.torch_impl``, ``modkern.kernels.perturb``) with
   ``forward(embeds, delta, mask)`` and ``backward(grad_out, mask, delta_dtype)``;
2. registered custom ops ``modkern::perturb_fwd`` and ``modkern::perturb_bwd`` with fake
   implementations; autograd is registered on ``perturb_fwd`` (the gradient for ``embeds`` is the
   incoming gradient itself, the gradient for ``delta`` is the masked incoming gradient in
   ``delta``'s dtype, computed only when needed), so ``torch.compile(fullgraph=True)`` traces
   through and ``torch.library.opcheck`` passes. The registered autograd makes the op itself
   differentiable, so no separate ``autograd.Function`` is needed;
3. ``perturb``: argument checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modkern import checks
from modkern.constants import KERNEL_DTYPES
from modkern.ops.dispatch import Impl, check_backend, device_guard, register

# perturb's implementations: the Triton kernels have an fp64 path; the CUDA ones take the kernel dtypes.
IMPLS = register(
    "perturb",
    torch=Impl("modkern.ops.perturb.torch_impl"),
    triton=Impl("modkern.kernels.perturb"),
    cuda=Impl("modkern.ops.perturb.cuda_impl", KERNEL_DTYPES),
)


def _contiguous(t: Tensor) -> Tensor:
    # The kernels index [N, H] rows densely; this also turns a stride-0 expanded gradient into a
    # real tensor (a no-op for the usual contiguous inputs).
    return t if t.is_contiguous() else t.contiguous()


@torch.library.custom_op("modkern::perturb_fwd", mutates_args=())
def perturb_fwd(embeds: Tensor, delta: Tensor, mask: Tensor, backend: str) -> Tensor:
    """``embeds + delta * mask`` computed in fp32, in ``embeds.dtype``."""
    args = (_contiguous(embeds), _contiguous(delta), _contiguous(mask))
    with device_guard(embeds.device):
        return IMPLS.load(backend, embeds.device, (embeds.dtype, delta.dtype)).forward(*args)


@perturb_fwd.register_fake
def _(embeds, delta, mask, backend):
    return torch.empty(embeds.shape, dtype=embeds.dtype, device=embeds.device)


@torch.library.custom_op("modkern::perturb_bwd", mutates_args=())
def perturb_bwd(grad_out: Tensor, mask: Tensor, delta_dtype: torch.dtype, backend: str) -> Tensor:
    """Gradient for ``delta``: ``grad_out`` on masked tokens, 0 elsewhere, in ``delta_dtype``."""
    args = (_contiguous(grad_out), _contiguous(mask), delta_dtype)
    with device_guard(grad_out.device):
        return IMPLS.load(backend, grad_out.device, (grad_out.dtype, delta_dtype)).backward(*args)


@perturb_bwd.register_fake
def _(grad_out, mask, delta_dtype, backend):
    return torch.empty(grad_out.shape, dtype=delta_dtype, device=grad_out.device)


def _setup_context(ctx, inputs, output):
    embeds, delta, mask, backend = inputs
    ctx.save_for_backward(mask)
    ctx.meta = (embeds.dtype, delta.dtype, backend)


def _op_backward(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    embeds_dtype, delta_dtype, backend = ctx.meta
    grad_embeds = grad_delta = None
    if ctx.needs_input_grad[0]:
        grad_embeds = grad_out.to(embeds_dtype)
    if ctx.needs_input_grad[1]:
        grad_delta = torch.ops.modkern.perturb_bwd(grad_out, mask, delta_dtype, backend)
    return grad_embeds, grad_delta, None, None


perturb_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def perturb(embeds: Tensor, delta: Tensor, mask: Tensor, *, backend: str = "auto") -> Tensor:
    r"""``embeds + delta * mask``: the perturbed embeddings the language model sees.

    .. math:: \tilde x_{bl} = x_{bl} + m_{bl}\,\delta_{bl}

    computed in fp32 (fp64 if an input is fp64) and returned in ``embeds.dtype``; ``delta`` is
    ignored on unmasked tokens (a NaN there does not leak).

    Args:
        embeds: ``[..., H]`` float embeddings (e.g. ``[B, L, H]`` bf16 merged input embeddings).
        delta: float perturbation of the same shape (fp32 or the model dtype).
        mask: ``embeds.shape[:-1]`` bool or 0/1 numbers (other values: ``ValueError`` on CPU; on a
            GPU, where they are not read, nonzero selects).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see ``modkern.ops.dispatch``).

    Gradients: to ``delta`` (the incoming gradient on masked tokens, in ``delta``'s dtype) and to
    ``embeds`` if it requires grad (the incoming gradient).

    Example::

        >>> delta = init_delta(embeds, mask, epsilon=1e-3).requires_grad_()
        >>> out = model(inputs_embeds=perturb(embeds, delta, mask))
    """
    checks.check_float_tensor("embeds", embeds)
    checks.check_float_tensor("delta", delta)
    if embeds.dim() < 1:
        raise ValueError("embeds must have a feature dimension (at least 1-D)")
    if delta.shape != embeds.shape:
        raise ValueError(f"delta must have the shape of embeds {tuple(embeds.shape)}, got {tuple(delta.shape)}")
    device = checks.check_same_device(embeds=embeds, delta=delta)
    mask = checks.check_token_mask("mask", mask, embeds.shape[:-1], device)
    backend = check_backend(backend)
    return torch.ops.modkern.perturb_fwd(embeds, delta, mask, backend)
