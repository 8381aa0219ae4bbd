"""``fused_js`` / ``fused_kl``: divergences between softmax distributions straight from logits.

Layers, bottom-up:

1. backend modules (``modkern.ops.divergence.torch_impl``, ``modkern.kernels.divergence``,
   ``modkern.ops.divergence.cuda_impl``) with one ``forward`` and one ``backward`` each;
2. two registered custom ops, ``modkern::divergence_fwd`` (per-row losses, row statistics and the
   per-row gradients) and ``modkern::divergence_bwd`` (scales the stored gradients by the incoming
   per-row gradient; recomputes the P gradient when ``ref_index`` shares P rows), with fake
   implementations and autograd registered on the forward op, so ``torch.compile(fullgraph=True)``
   traces through them and ``torch.library.opcheck`` passes;
3. ``FusedDivergence``, a ``torch.autograd.Function`` over the two ops;
4. ``grad_mode="forward"``: ``modkern::divergence_fwd_grads`` (the loss and the gradients of the
   reduced loss in one read of the logits; Triton: ``_divergence_fused_kernel``, other backends:
   their forward then their backward) and ``modkern::divergence_scale_`` (the backward: the stored
   gradients times the incoming scalar, in place), under ``ForwardGradsDivergence``;
5. ``fused_js`` / ``fused_kl``: argument checks, flattening, reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from modkern import checks
from modkern._reduction import mean_divisor, reduce_rows
from modkern.constants import DIVERGENCE_KIND_IDS, KERNEL_DTYPES, STATS_WIDTH, accumulation_dtype
from modkern.ops.dispatch import (
    DIVERGENCE_GRAD_MODE_AUTO,
    Impl,
    check_backend,
    device_guard,
    register,
    saved_grad_dtype,
)

# The family's implementations. The Triton kernels accumulate in fp32 (float64 logits run the
# PyTorch backend); the CUDA kernels store the forward's gradients in the logits' dtype and fp16
# needs them in fp32 (saved_grad_dtype), so fp16 runs the PyTorch backend there too.
IMPLS = register(
    "divergence",
    torch=Impl("modkern.ops.divergence.torch_impl"),
    triton=Impl("modkern.kernels.divergence", KERNEL_DTYPES),
    cuda=Impl("modkern.ops.divergence.cuda_impl", (torch.float32, torch.bfloat16)),
)

KINDS = tuple(DIVERGENCE_KIND_IDS)
# Row statistics every backend's forward returns for its backward:
# (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q), the log-sum-exps kept as shift + logsum.
DIRECTIONS = ("forward", "reverse", "symmetric")
# "backward": the backward recomputes the gradients from the logits (nothing [R, V] is held between
# forward and backward); "forward": the forward writes them in the same read of the logits and
# the backward only scales them (fewer bytes, the gradients held until the backward); "auto":
# modkern.ops.dispatch.DIVERGENCE_GRAD_MODE_AUTO (set from a GPU measurement).
GRAD_MODES = ("auto", "backward", "forward")


@dataclass(frozen=True)
class DivergenceSpec:
    """What one divergence call computes: the one argument the backends take besides tensors.

    Backend modules (``modkern.ops.divergence.torch_impl``, ``modkern.kernels.divergence``,
    ``modkern.ops.divergence.cuda_impl``) implement::

        forward(p, q, ref_index, mask, spec) -> (loss_rows [R], stats [R, 4], grad_p, grad_q)
        backward(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec)
            -> (grad_p, grad_q)

    The custom ops keep flat arguments (``torch.library`` schemas take no objects): the spec's
    fields last, in ``SPEC_SCHEMA``'s order (``op_args``), rebuilt inside (``DivergenceSpec.of``).
    """

    kind: str  # "js", "kl_forward", "kl_reverse" or "kl_symmetric"
    beta: float  # JS mixture weight M = beta P + (1 - beta) Q (unused by the KL kinds)
    inv_temperature: float  # 1 / T, applied to both logits
    need_grad_p: bool  # compute the gradient of the P logits
    need_grad_q: bool  # compute the gradient of the Q logits
    backend: str = "auto"

    @property
    def kind_id(self) -> int:
        return DIVERGENCE_KIND_IDS[self.kind]

    def stores_grad_p(self, ref_index) -> bool:
        """The forward stores P's gradient, unless ``ref_index`` shares P rows (then the backward
        recomputes it from p, q and the row statistics)."""
        return self.need_grad_p and ref_index is None

    def backward_reads_logits(self, ref_index, stored_grad_p, stored_grad_q) -> bool:
        """The backward recomputes from p, q and stats: the shared-P gradient (``ref_index`` with
        ``need_grad_p``) always, and any wanted gradient the forward did not store (the Triton
        backend stores none; stored gradients are 2-D, placeholders ``[0]``)."""
        if self.need_grad_p and (ref_index is not None or stored_grad_p.dim() != 2):
            return True
        return self.need_grad_q and stored_grad_q.dim() != 2

    @property
    def grads_read_row_sums(self) -> bool:
        """Whether a wanted gradient reads the row sums S_P / S_Q: JS's both sides, KL(P||Q)'s P
        side, KL(Q||P)'s Q side, the symmetric KL's both (the other KL sides are P - Q)."""
        if self.kind == "kl_forward":
            return self.need_grad_p
        if self.kind == "kl_reverse":
            return self.need_grad_q
        return self.need_grad_p or self.need_grad_q

    def row_loss(self, s_p, s_q):
        """The per-row loss from the row sums S_P = sum P (log P - x_P) and S_Q likewise."""
        if self.kind == "js":
            return self.beta * s_p + (1.0 - self.beta) * s_q
        if self.kind == "kl_forward":
            return s_p
        if self.kind == "kl_reverse":
            return s_q
        return s_p + s_q

    def op_args(self) -> tuple:
        """The spec as the custom ops take it (their last arguments, ``SPEC_SCHEMA``)."""
        return (self.kind, self.beta, self.inv_temperature, self.need_grad_p, self.need_grad_q, self.backend)

    @staticmethod
    def of(kind, beta, inv_temperature, need_grad_p, need_grad_q, backend="auto") -> DivergenceSpec:
        return DivergenceSpec(kind, float(beta), float(inv_temperature), bool(need_grad_p), bool(need_grad_q), backend)


def values_checked_on_host(t: Tensor) -> bool:
    """Whether the op reads ``t``'s values for a check (CPU: no sync to pay) or leaves them on the device."""
    return t.device.type == "cpu"


def check_ref_index_values(ref_index: Optional[Tensor], num_p_rows: int) -> Optional[Tensor]:
    """``ref_index`` as the kernels may read it. Runs inside the op, so it is opaque to torch.compile.

    CPU: a real check (``ValueError``). Elsewhere the values cannot be read without a host sync, and
    a device-side assert would kill the CUDA context: the indices are clamped into ``[0, N)`` so no
    kernel reads outside ``p``, and the public functions make the result NaN through
    :func:`ref_index_guard` (loss and gradients)."""
    if ref_index is None or ref_index.numel() == 0:
        return ref_index
    if values_checked_on_host(ref_index):
        lo, hi = int(ref_index.min()), int(ref_index.max())
        if lo < 0 or hi >= num_p_rows:
            raise ValueError(f"ref_index values must lie in [0, {num_p_rows}), got range [{lo}, {hi}]")
        return ref_index
    return ref_index.clamp(0, num_p_rows - 1)


def ref_index_guard(ref_index: Optional[Tensor], num_p_rows: int) -> Optional[Tensor]:
    """On a device, a 0-dim fp32 factor: 1 when every ``ref_index`` value lies in ``[0, N)``, else NaN.

    The public functions multiply their per-row losses (or the forward-gradient weight) by it, so an
    index out of range gives a NaN loss and NaN gradients instead of a device-side assert. None where
    the op checks the values itself (CPU) or there is no ``ref_index``."""
    if ref_index is None or ref_index.numel() == 0 or values_checked_on_host(ref_index):
        return None
    in_range = ((ref_index >= 0) & (ref_index < num_p_rows)).all()
    return checks.nan_unless(in_range, torch.ones((), dtype=torch.float32, device=ref_index.device))


# The ops' signatures, written once: the logits and their optional row maps first, the spec's fields
# (DivergenceSpec.op_args) last.
ROWS_SCHEMA = "Tensor p, Tensor q, Tensor? ref_index, Tensor? mask"
SPEC_SCHEMA = "str kind, float beta, float inv_temperature, bool need_grad_p, bool need_grad_q, str backend"


def _forward(p: Tensor, q: Tensor, ref_index: Optional[Tensor], mask: Optional[Tensor], *spec_args):
    """Returns (loss_rows [R], stats [R, STATS_WIDTH], grad_p [N, V] or [0], grad_q [R, V] or [0]).

    grad_p / grad_q are the per-row gradients of backends that store them (``STORES_GRADIENTS``)."""
    ref_index = check_ref_index_values(ref_index, p.shape[0])
    spec = DivergenceSpec.of(*spec_args)
    with device_guard(q.device):
        return IMPLS.load(spec.backend, q.device, (p.dtype, q.dtype)).forward(p, q, ref_index, mask, spec)


divergence_fwd = torch.library.custom_op(
    "modkern::divergence_fwd",
    _forward,
    mutates_args=(),
    schema=f"({ROWS_SCHEMA}, {SPEC_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
)


# Whether a backend's forward stores each row's gradients (the backward scales them) or its backward
# recomputes them from the logits and the row statistics (Triton): what the op's fake outputs and
# autograd's saved tensors look like.
STORES_GRADIENTS = {"torch": True, "triton": False, "cuda": True}


def _stores_gradients(backend, p, q) -> bool:
    """Whether the backend that runs this call stores the gradients in the forward (decided without
    loading it: the fake implementation asks too)."""
    return STORES_GRADIENTS[IMPLS.name(backend, q.device, (p.dtype, q.dtype))]


@divergence_fwd.register_fake
def _(p, q, ref_index, mask, *spec_args):
    rows = q.shape[0]
    acc = accumulation_dtype(p)
    spec = DivergenceSpec.of(*spec_args)
    stores = _stores_gradients(spec.backend, p, q)
    return (
        q.new_empty((rows,), dtype=acc),
        q.new_empty((rows, STATS_WIDTH), dtype=acc),
        torch.empty_like(p, dtype=saved_grad_dtype(p.dtype))
        if stores and spec.stores_grad_p(ref_index)
        else p.new_empty(0),
        torch.empty_like(q, dtype=saved_grad_dtype(q.dtype)) if stores and spec.need_grad_q else q.new_empty(0),
    )


def _backward_op(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, *spec_args):
    """Returns (grad_p [N, V] or [0], grad_q [R, V] or [0]) for the per-row output gradient.

    ``p`` / ``q`` are read only when ``ref_index`` is given and P's gradient is wanted; otherwise
    only their shape and dtype matter (the autograd path passes stride-0 stand-ins then, so the
    logits need not stay alive until the backward)."""
    ref_index = check_ref_index_values(ref_index, p.shape[0])
    spec = DivergenceSpec.of(*spec_args)
    tensors = (grad_rows.contiguous(), p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q)
    with device_guard(q.device):
        return IMPLS.load(spec.backend, q.device, (p.dtype, q.dtype)).backward(*tensors, spec)


divergence_bwd = torch.library.custom_op(
    "modkern::divergence_bwd",
    _backward_op,
    mutates_args=(),
    schema=f"(Tensor grad_rows, {ROWS_SCHEMA}, Tensor stats, Tensor saved_grad_p, Tensor saved_grad_q, "
    f"{SPEC_SCHEMA}) -> (Tensor, Tensor)",
)


@divergence_bwd.register_fake
def _(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, *spec_args):
    spec = DivergenceSpec.of(*spec_args)
    return (
        torch.empty_like(p) if spec.need_grad_p else p.new_empty(0),
        torch.empty_like(q) if spec.need_grad_q else q.new_empty(0),
    )


def _save(ctx, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec: DivergenceSpec):
    """Save only what the backward reads: the stored gradients and the mask, plus p, q, ref_index
    and the row statistics when it recomputes a gradient (``DivergenceSpec.backward_reads_logits``).
    Otherwise p and q are saved as stride-0 stand-ins (their shape and dtype, one element of
    storage), so the logits are not kept alive until the backward."""
    keep = spec.backward_reads_logits(ref_index, saved_grad_p, saved_grad_q)
    if not keep:
        p, q = _stand_in(p), _stand_in(q)
        ref_index, stats = None, stats.new_zeros(0)
    ctx.save_for_backward(p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q)
    ctx.spec = spec


def _stand_in(x):
    return x.new_zeros((1,) * x.dim()).expand(x.shape)


def _backward(ctx, grad_rows):
    """Shared by the op's registered autograd and by ``FusedDivergence.backward``."""
    p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q = ctx.saved_tensors
    spec: DivergenceSpec = ctx.spec
    if not (spec.need_grad_p or spec.need_grad_q):
        return None, None
    grad_p, grad_q = torch.ops.modkern.divergence_bwd(
        grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, *spec.op_args()
    )
    return (grad_p if spec.need_grad_p else None), (grad_q if spec.need_grad_q else None)


def _setup_context(ctx, inputs, output):
    p, q, ref_index, mask, *spec_args = inputs
    _, stats, saved_grad_p, saved_grad_q = output
    _save(ctx, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, DivergenceSpec.of(*spec_args))


def _op_backward(ctx, grad_rows, _grad_stats, _grad_gp, _grad_gq):
    return (*_backward(ctx, grad_rows), *(None,) * 8)


divergence_fwd.register_autograd(_op_backward, setup_context=_setup_context)


class FusedDivergence(torch.autograd.Function):
    """Per-row divergence between ``softmax(p / T)[ref_index]`` and ``softmax(q / T)``.

    ``FusedDivergence.apply(p, q, ref_index, mask, kind, beta, temperature, backend)`` with 2-D
    contiguous logits ``p [N, V]``, ``q [R, V]``, optional int64 ``ref_index [R]`` and bool
    ``mask [R]``; ``kind`` in ``("js", "kl_forward", "kl_reverse", "kl_symmetric")``. Returns the
    per-row losses ``[R]`` (fp32, 0 on masked rows). Gradients flow to whichever logits require
    grad; only those are computed. ``fused_js`` / ``fused_kl`` validate arguments and wrap this.
    """

    @staticmethod
    def forward(ctx, p, q, ref_index, mask, kind, beta, temperature, backend):
        need_grad_p, need_grad_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        spec = DivergenceSpec.of(kind, beta, 1.0 / temperature, need_grad_p, need_grad_q, backend)
        rows, stats, gp, gq = torch.ops.modkern.divergence_fwd(p, q, ref_index, mask, *spec.op_args())
        _save(ctx, p, q, ref_index, mask, stats, gp, gq, spec)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        grad_p, grad_q = _backward(ctx, grad_rows)
        return grad_p, grad_q, None, None, None, None, None, None


def _forward_with_grads(p, q, ref_index, mask, weight, *spec_args):
    """Returns (loss_rows [R], grad_p [N, V] or [0], grad_q [R, V] or [0]): the per-row losses and
    the gradients of ``weight * loss_rows.sum()`` (``weight``: a 0-dim fp32 tensor), in one call.

    The Triton backend reads the logits once; the others run their forward, then their backward with
    ``weight`` as every row's incoming gradient (:mod:`modkern.ops.divergence.composed`)."""
    ref_index = check_ref_index_values(ref_index, p.shape[0])
    spec = DivergenceSpec.of(*spec_args)
    module = IMPLS.load(spec.backend, q.device, (p.dtype, q.dtype))
    with device_guard(q.device):
        return module.forward_with_grads(p, q, ref_index, mask, weight, spec)


divergence_fwd_grads = torch.library.custom_op(
    "modkern::divergence_fwd_grads",
    _forward_with_grads,
    mutates_args=(),
    schema=f"({ROWS_SCHEMA}, Tensor weight, {SPEC_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)


@divergence_fwd_grads.register_fake
def _(p, q, ref_index, mask, weight, *spec_args):
    spec = DivergenceSpec.of(*spec_args)
    return (
        q.new_empty((q.shape[0],), dtype=accumulation_dtype(p)),
        torch.empty_like(p) if spec.need_grad_p else p.new_empty(0),
        torch.empty_like(q) if spec.need_grad_q else q.new_empty(0),
    )


@torch.library.custom_op("modkern::divergence_scale_", mutates_args=("grad_p", "grad_q"))
def divergence_scale_(grad_scale: Tensor, grad_p: Tensor, grad_q: Tensor, backend: str) -> None:
    """``grad_p *= grad_scale``, ``grad_q *= grad_scale`` in place (fp32 products). The Triton
    backend moves nothing when the scale is 1, decided on the device (no host sync)."""
    tensors = [t for t in (grad_p, grad_q) if t.numel()]
    if not tensors:
        return
    module = IMPLS.load(backend, tensors[0].device, tuple(t.dtype for t in tensors))
    with device_guard(tensors[0].device):
        module.scale_(grad_scale, *tensors)


@divergence_scale_.register_fake
def _(grad_scale, grad_p, grad_q, backend):
    return None


class ForwardGradsDivergence(torch.autograd.Function):
    """``weight * sum_r loss_r`` whose forward also computes the gradients (``grad_mode="forward"``).

    ``ForwardGradsDivergence.apply(p, q, ref_index, mask, weight, kind, beta, temperature,
    backend)``, arguments as in :class:`FusedDivergence` plus ``weight`` (0-dim fp32: 1 for
    ``reduction="sum"``, 1 / count for ``"mean"``); returns the reduced loss. The backward scales
    the stored gradients by the incoming gradient in place and returns them: one backward per
    forward (a second one, with ``retain_graph=True``, raises PyTorch's "modified by an inplace
    operation" error rather than returning twice-scaled gradients).
    """

    @staticmethod
    def forward(ctx, p, q, ref_index, mask, weight, kind, beta, temperature, backend):
        need_grad_p, need_grad_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, grad_p, grad_q = torch.ops.modkern.divergence_fwd_grads(
            p, q, ref_index, mask, weight, kind, beta, 1.0 / temperature, need_grad_p, need_grad_q, backend
        )
        ctx.save_for_backward(grad_p, grad_q)
        ctx.need_grads = (need_grad_p, need_grad_q)
        ctx.backend = backend
        return rows.sum() * weight

    @staticmethod
    def backward(ctx, grad_loss):
        grad_p, grad_q = ctx.saved_tensors
        need_grad_p, need_grad_q = ctx.need_grads
        torch.ops.modkern.divergence_scale_(grad_loss, grad_p, grad_q, ctx.backend)
        return (grad_p if need_grad_p else None), (grad_q if need_grad_q else None), *(None,) * 7


def _uses_forward_grads(grad_mode, reduction, p2, q2, ref_index) -> bool:
    """Whether this call takes the one-read path: ``grad_mode`` resolves to ``"forward"``, the loss is
    reduced (the backward then gets one scalar), a gradient is wanted, the logits are not fp16
    (whose small gradient entries need the recomputing backward's scaling before rounding), and no
    P gradient is shared by ``ref_index`` copies."""
    mode = DIVERGENCE_GRAD_MODE_AUTO if grad_mode == "auto" else grad_mode
    wants_p = p2.requires_grad and torch.is_grad_enabled()
    wants_q = q2.requires_grad and torch.is_grad_enabled()
    return (
        mode == "forward"
        and reduction != "none"
        and (wants_p or wants_q)
        and q2.dtype != torch.float16
        and not (wants_p and ref_index is not None)
    )


def _reduction_weight(reduction, num_items, mask, rows: int, device) -> Tensor:
    """The 0-dim fp32 weight of every row in the reduced loss: 1 for ``"sum"``, 1 / the mean's
    divisor (``modkern._reduction.mean_divisor``) for ``"mean"``. No host synchronization."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=device)
    divisor = mean_divisor(num_items, mask, rows, device, torch.float32)
    if isinstance(divisor, Tensor):
        return divisor.reshape(()).reciprocal()
    return torch.full((), 1.0 / divisor, dtype=torch.float32, device=device)


def _prepare(p_logits, q_logits, temperature, mask, ref_index, reduction, num_items, backend):
    """Shared argument checks; returns flattened 2-D logits and per-row tensors."""
    checks.check_float_tensor("p_logits", p_logits)
    checks.check_float_tensor("q_logits", q_logits)
    if p_logits.dim() < 1 or q_logits.dim() < 1:
        raise ValueError("p_logits and q_logits must have a vocabulary dimension (at least 1-D)")
    if p_logits.dtype != q_logits.dtype:
        raise TypeError(f"p_logits ({p_logits.dtype}) and q_logits ({q_logits.dtype}) must have the same dtype")
    device = checks.check_same_device(q_logits=q_logits, p_logits=p_logits)
    vocab = q_logits.shape[-1]
    if p_logits.shape[-1] != vocab:
        raise ValueError(
            f"p_logits and q_logits must have the same vocabulary size (last dim), got {p_logits.shape[-1]} and {vocab}"
        )
    if vocab == 0:
        raise ValueError("the vocabulary dimension of the logits must not be empty")
    checks.check_positive_number("temperature", temperature, allow_tensor=False)
    checks.check_reduction_args(reduction, num_items)
    backend = check_backend(backend)
    leading = q_logits.shape[:-1]
    q2 = q_logits.reshape(-1, vocab)
    p2 = p_logits.reshape(-1, vocab)
    rows = q2.shape[0]
    if ref_index is None:
        if p_logits.shape != q_logits.shape:
            raise ValueError(
                f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} must have the same "
                "shape unless ref_index maps each q row to a p row"
            )
    else:
        ref_index = checks.check_index_vector("ref_index", ref_index, rows, leading, device)
    mask = checks.check_mask("mask", mask, rows, leading, device)
    # Kernels need a unit stride along V; a stride-0 expanded tensor is made contiguous too.
    p2 = p2 if p2.stride(-1) == 1 and p2.stride(0) != 0 else p2.contiguous()
    q2 = q2 if q2.stride(-1) == 1 and q2.stride(0) != 0 else q2.contiguous()
    return p2, q2, ref_index, mask, leading, backend


def _divergence(
    kind, beta, p_logits, q_logits, temperature, mask, ref_index, reduction, num_items, backend, grad_mode, scale
):
    checks.check_choice("grad_mode", grad_mode, GRAD_MODES)
    p2, q2, ref_index, mask, leading, backend = _prepare(
        p_logits, q_logits, temperature, mask, ref_index, reduction, num_items, backend
    )
    scale = checks.check_finite_factor("scale", scale, q2.device)
    if isinstance(scale, Tensor):  # the result keeps the accumulation dtype whatever the scale's
        scale = scale.to(device=q2.device, dtype=accumulation_dtype(p2))
    guard = ref_index_guard(ref_index, p2.shape[0])
    if _uses_forward_grads(grad_mode, reduction, p2, q2, ref_index):
        weight = _reduction_weight(reduction, num_items, mask, q2.shape[0], q2.device)
        weight = weight if guard is None else weight * guard
        # a constant scale goes into the gradients the forward writes (the backward then gets the
        # caller's outer gradient, often 1, and moves nothing); one that requires grad stays outside
        folded = scale is not None and not (isinstance(scale, Tensor) and scale.requires_grad)
        if folded:
            weight = weight * scale
        out = ForwardGradsDivergence.apply(p2, q2, ref_index, mask, weight, kind, beta, float(temperature), backend)
        return out if scale is None or folded else out * scale
    rows = FusedDivergence.apply(p2, q2, ref_index, mask, kind, beta, float(temperature), backend)
    rows = rows if guard is None else rows * guard
    out = rows.reshape(leading) if reduction == "none" else reduce_rows(rows, mask, reduction, num_items)
    return out if scale is None else out * scale


def fused_js(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    ref_index: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items=None,
    backend: str = "auto",
    grad_mode: str = "auto",
    scale=None,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence between two softmax distributions, from raw logits.

    .. math::
        P = \mathrm{softmax}(p/T),\quad Q = \mathrm{softmax}(q/T),\quad M = \beta P + (1-\beta) Q,\\
        \mathrm{JS}_\beta = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)

    over the last (vocabulary) dimension; ``beta = 0.5`` is the symmetric JS bounded by ln 2.
    This is the standard generalized JS, not the paper code's "JS" consistency,
    ½[KL(M‖P) + KL(M‖Q)] with a 1e-6 floor (whose LLaVA JS + PGD path cannot run); the official
    objective's default divergence is KL(Q‖P): ``fused_kl(..., direction="reverse")``.

    Args:
        p_logits: ``[..., V]`` (``[N, V]`` after flattening) - e.g. the clean branch.
        q_logits: ``[..., V]`` (``[R, V]``) - e.g. the perturbed branch.
        beta: mixture weight in (0, 1).
        temperature: T > 0 applied to both logits.
        mask: bool ``[R]`` (or q's leading shape): rows that count; others give 0 loss and 0 grad.
        ref_index: int ``[R]``: q row r is compared with p row ``ref_index[r]`` (k perturbed copies
            per clean row without an expanded copy). Values must lie in ``[0, N)``.
        reduction: ``"none"`` (per-row ``[...]``), ``"sum"`` or ``"mean"`` (over counted rows, 0
            when none counts).
        num_items: int or 0-dim tensor; when given, ``"mean"`` divides the sum by it instead.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see ``modkern.ops.dispatch``).
        grad_mode: where the gradients are computed. ``"backward"``: the backward reads the logits
            again and recomputes them (nothing ``[R, V]`` held in between). ``"forward"``: the
            forward writes them in its one read of the logits (Triton: rows split over programs
            that exchange row statistics) and the backward only scales them, in place - fewer
            bytes moved, the gradients held until the backward, one backward per forward. It
            applies to ``"sum"`` / ``"mean"`` with a gradient wanted, not to fp16 logits or to a
            P gradient shared through ``ref_index`` (those take ``"backward"``). ``"auto"``:
            ``modkern.ops.dispatch.DIVERGENCE_GRAD_MODE_AUTO``, ``"backward"`` until a GPU measurement
            says otherwise.
        scale: a constant factor of the result (finite number or 0-dim tensor):
            ``fused_js(..., scale=lam)`` is ``lam * fused_js(...)``. With ``grad_mode="forward"``
            the gradients written in the forward are those of the scaled loss, so the backward
            moves nothing when its incoming gradient is 1 (it scales every gradient in place
            otherwise): fold a loss weight here (e.g. ``lam / num_tokens``) rather than
            multiplying the result. A tensor that requires grad is applied to the result instead.

    Gradients flow to whichever logits require grad, in their dtype; accumulation is fp32.

    Example::

        >>> clean = torch.randn(8, 32064); adv = torch.randn(8, 32064, requires_grad=True)
        >>> fused_js(clean, adv, mask=labels != -100).backward()
    """
    beta = checks.check_open_unit_interval("beta", beta)
    return _divergence(
        "js", beta, p_logits, q_logits, temperature, mask, ref_index, reduction, num_items, backend, grad_mode, scale
    )


def fused_kl(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    ref_index: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items=None,
    backend: str = "auto",
    grad_mode: str = "auto",
    scale=None,
) -> Tensor:
    r"""Kullback-Leibler divergence between two softmax distributions, from raw logits.

    .. math::
        \mathrm{KL}(P\|Q) = \sum_v P_v(\log P_v - \log Q_v),\quad P = \mathrm{softmax}(p/T),\;
        Q = \mathrm{softmax}(q/T)

    ``direction="forward"``: KL(P||Q); ``"reverse"``: KL(Q||P) (the official objective's
    ``F.kl_div(log P.detach(), Q)``, with P the detached clean branch and the gradient through Q);
    ``"symmetric"``: KL(P||Q) + KL(Q||P) (SMART). ``0 log 0 = 0``. All other arguments as in
    :func:`fused_js`.

    Example::

        >>> loss = fused_kl(clean_logits.detach(), adv_logits, direction="reverse", mask=answer_rows, ref_index=ref)
    """
    checks.check_choice("direction", direction, DIRECTIONS)
    return _divergence(
        "kl_" + direction,
        0.5,
        p_logits,
        q_logits,
        temperature,
        mask,
        ref_index,
        reduction,
        num_items,
        backend,
        grad_mode,
        scale,
    )
