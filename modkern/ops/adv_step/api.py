"""``masked_adv_step``: one PGD update of an embedding perturbation, restricted by a token mask.

Layers, bottom-up:

1. backend modules (``modkern.ops.adv_step.torch_impl``, ``modkern.kernels.adv_step``) with one
   ``step(delta, grad, mask, out, ...)`` that writes the update into ``out`` (``out`` may be
   ``delta``);
2. two registered custom ops: ``modkern::masked_adv_step`` (out-of-place, returns a new tensor)
   and ``modkern::masked_adv_step_inplace`` (``mutates_args=("delta",)``, returns nothing), with
   fake implementations, so ``torch.compile(fullgraph=True)`` traces through them and
   ``torch.library.opcheck`` passes. No autograd: the step is an optimizer-like update of a
   detached tensor (the public function runs it under ``torch.no_grad()``).
3. ``masked_adv_step``: argument checks and the choice between the two ops.

Why a mutating op for ``inplace=True`` rather than ``delta.copy_(out_of_place(...))``: the fused
step moves N*(2D + G) bytes (read delta and grad, write delta; N = B*L*H, D / G bytes per element).
The copy variant would add a full temporary plus its read and write, N*(4D + G): for fp32 delta and
bf16 grad that is 18 instead of 10 bytes per element, 1.8x the traffic of a memory-bound op. Under
``torch.compile`` the mutation is functionalized and Inductor re-inplaces it, so the compiled graph
also writes ``delta`` directly.

``alpha`` / ``epsilon`` reach the ops either as floats (eager; ``torch.compile`` specializes on the
value) or as 0-dim device tensors (no recompilation per value, never read on the host).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from modkern import checks
from modkern.constants import KERNEL_DTYPES
from modkern.ops.dispatch import Impl, check_backend, device_guard, register

STEPS = ("raw", "sign", "l2", "l2_token", "linf")
NORMS = ("linf", "l2", "l2_token", None)

# The PGD step's implementations: the Triton kernels have an fp64 path of their own; the CUDA ones
# take the kernel dtypes.
IMPLS = register(
    "adv_step",
    torch=Impl("modkern.ops.adv_step.torch_impl"),
    triton=Impl("modkern.kernels.adv_step"),
    cuda=Impl("modkern.ops.adv_step.cuda_impl", KERNEL_DTYPES),
)


# The two registered forms of the step (out-of-place, in place) share one argument list; only
# delta's role differs (read, or read and written).
_STEP_ARGS = (
    "Tensor grad, Tensor mask, float alpha, Tensor? alpha_t, float epsilon, Tensor? epsilon_t, str step, "
    "str norm, str backend"
)


def _step_into(out: Tensor, delta: Tensor, grad: Tensor, mask: Tensor, *options) -> None:
    """``out = delta'``: the backend's step (``options``: alpha .. norm, then backend)."""
    *step_options, backend = options
    with device_guard(delta.device):
        IMPLS.load(backend, delta.device, (delta.dtype, grad.dtype)).step(delta, grad, mask, out, *step_options)


def _step_out_of_place(delta: Tensor, grad: Tensor, mask: Tensor, *options) -> Tensor:
    out = torch.empty_like(delta)
    _step_into(out, delta, grad, mask, *options)
    return out


def _step_inplace(delta: Tensor, grad: Tensor, mask: Tensor, *options) -> None:
    _step_into(delta, delta, grad, mask, *options)


masked_adv_step_op = torch.library.custom_op(
    "modkern::masked_adv_step", _step_out_of_place, mutates_args=(), schema=f"(Tensor delta, {_STEP_ARGS}) -> Tensor"
)
masked_adv_step_op.register_fake(lambda delta, *args: torch.empty_like(delta))
masked_adv_step_inplace_op = torch.library.custom_op(
    "modkern::masked_adv_step_inplace",
    _step_inplace,
    mutates_args=("delta",),
    schema=f"(Tensor(a!) delta, {_STEP_ARGS}) -> ()",
)
masked_adv_step_inplace_op.register_fake(lambda delta, *args: None)


def _has_overlap(t: Tensor) -> bool:
    # An expanded tensor (stride 0 on a dim of size > 1) cannot be written in place.
    return any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))


def _check_inplace(delta: Tensor) -> None:
    """Refuse what torch refuses for an in-place op on ``delta``, with the fix."""
    if _has_overlap(delta):
        raise ValueError("delta is an expanded tensor (stride 0): it cannot be updated in place; pass inplace=False")
    if delta.requires_grad and torch.is_grad_enabled():
        why = (
            "torch refuses in-place updates of a leaf that requires grad while grad mode is on"
            if delta.is_leaf
            else "the step has no autograd history, so an in-place update would corrupt the graph"
        )
        raise ValueError(
            f"delta requires grad: {why}. Pass delta.detach(), call under torch.no_grad(), or use inplace=False"
        )


def masked_adv_step(
    delta: Tensor,
    grad: Tensor,
    mask: Tensor,
    *,
    alpha,
    epsilon,
    step: str = "raw",
    norm: Optional[str] = "linf",
    inplace: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""One projected-gradient (PGD) step of an embedding perturbation on the masked tokens.

    With ``g = grad`` on tokens where ``mask`` is nonzero (0 elsewhere):

    .. math::
        d = \begin{cases} g & \text{raw (the paper's)} \\ \mathrm{sign}(g) & \text{sign} \\
        g / \max(\|g_b\|_2, 10^{-12}) & \text{l2 (per sample b, FreeLB)} \\
        g / \max(\|g_{bl}\|_2, 10^{-12}) & \text{l2\_token (per token)} \\
        g / \max(\max|g_b|, 10^{-12}) & \text{linf (per sample)} \end{cases}
        \qquad \delta' = \Pi_\varepsilon\big((\delta + \alpha d)\odot m\big)

    where the projection :math:`\Pi_\varepsilon` is ``norm``: ``"linf"`` clamp to
    :math:`[-\varepsilon, \varepsilon]` (the paper's); ``"l2"`` rescale sample b to
    :math:`\varepsilon` when :math:`\|\delta'_b\|_2 > \varepsilon`; ``"l2_token"`` the same per token;
    ``None`` none. Tokens off the mask come out 0. The mask is applied before the projection, so
    ``"l2"`` is the exact projection onto the masked ball (identical to SPEC §1's order whenever
    ``delta`` is 0 off the mask, as ``init_delta`` and every step keep it). A sample with an empty
    mask or an all-zero gradient stays finite (guarded divisions).

    Args:
        delta: ``[B, L, H]`` float perturbation (fp32 or the model dtype).
        grad: ``[B, L, H]`` float gradient of the loss w.r.t. ``delta`` (any float dtype, any
            strides; expanded stride-0 gradients are fine).
        mask: ``[B, L]`` bool or 0/1 numbers, broadcast over H (other values: ``ValueError`` on
            CPU; on a GPU, where they are not read, nonzero selects).
        alpha: step size > 0, a Python number or a 0-dim tensor on ``delta``'s device.
        epsilon: radius > 0, number or 0-dim tensor; may be None when ``norm`` is None. A tensor
            ``alpha`` / ``epsilon`` is checked on CPU (``ValueError``); on a GPU reading it would
            need a host sync, so a value <= 0 or non-finite makes the result NaN instead.
        step: ``"raw"``, ``"sign"``, ``"l2"``, ``"l2_token"`` or ``"linf"``.
        norm: ``"linf"``, ``"l2"``, ``"l2_token"`` or None.
        inplace: write the result into ``delta`` (and return it); else return a new tensor. Like
            any in-place torch op, refused (``ValueError``) when ``delta`` requires grad while grad
            mode is on: detach it first, or run under ``torch.no_grad()`` as an optimizer does.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see ``modkern.ops.dispatch``).

    Returns:
        ``delta'`` in ``delta``'s dtype, with no autograd history (like an optimizer step).

    Example::

        >>> delta = init_delta(embeds, mask, epsilon=1e-3)
        >>> delta.requires_grad_()
        >>> (g,) = torch.autograd.grad(loss_fn(perturb(embeds, delta, mask)), delta)
        >>> delta = masked_adv_step(delta.detach(), g, mask, alpha=0.1, epsilon=1e-3)  # raw step, Linf ball
    """
    checks.check_float_tensor("delta", delta)
    checks.check_float_tensor("grad", grad)
    if delta.dim() != 3:
        raise ValueError(f"delta must have shape [B, L, H], got {tuple(delta.shape)}")
    if grad.shape != delta.shape:
        raise ValueError(f"grad must have the shape of delta {tuple(delta.shape)}, got {tuple(grad.shape)}")
    device = checks.check_same_device(delta=delta, grad=grad)
    mask = checks.check_token_mask("mask", mask, delta.shape[:2], device)
    checks.check_choice("step", step, STEPS)
    checks.check_choice("norm", norm, NORMS)
    # each scalar as a Python float and, when it was given as a tensor, that tensor on the device
    alpha, alpha_t = checks.check_scalar_on("alpha", alpha, device)
    if norm is None and epsilon is None:
        epsilon, epsilon_t = 0.0, None
    else:
        epsilon, epsilon_t = checks.check_scalar_on("epsilon", epsilon, device)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace:
        _check_inplace(delta)
    backend = check_backend(backend)
    args = (delta, grad, mask, alpha, alpha_t, epsilon, epsilon_t, step, "none" if norm is None else norm, backend)
    with torch.no_grad():
        if inplace:
            torch.ops.modkern.masked_adv_step_inplace(*args)
            return delta
        return torch.ops.modkern.masked_adv_step(*args)
