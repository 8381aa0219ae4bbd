r"""``fused_linear_kl`` / ``fused_linear_js``: the divergence of two branches' logits from their hidden states.

With ``logits = hidden @ weight.T (+ bias)`` for both branches (the LM head), the value is exactly
:func:`modkern.fused_kl` / :func:`modkern.fused_js` of those logits, but the ``[rows, V]`` logits
never exist all at once: the rows are processed in chunks of ``chunk_size``, so at most one chunk
of logits (and its temporaries) is alive at a time. Optionally the same pass also computes the
token cross entropy of the Q branch against ``targets`` (the adversarial CE of the robust
objective and its consistency term share the logits chunk).

Memory: the forward stores nothing but its inputs; the backward recomputes each chunk's logits
(one more matmul per branch and chunk) and accumulates the hidden-state gradients and the weight
gradient (fp32 accumulator ``[V, H]`` when the weight requires grad) chunk by chunk. Per chunk the
divergence runs through the same ``modkern::divergence_fwd`` / ``divergence_bwd`` ops as
``fused_kl`` (so on a GPU the Triton / CUDA divergence kernels), the CE in fp32.

Layers: the custom ops ``modkern::linear_losses_fwd`` (per-row divergence and CE) and
``modkern::linear_losses_bwd`` (the four gradients) with fakes and registered autograd, so
``torch.compile(fullgraph=True)`` traces through them and ``opcheck`` passes; then
:func:`linear_losses` (the engine the robust objective calls) and the public wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from modkern import checks
from modkern._reduction import reduce_rows
from modkern.constants import IGNORE_INDEX
from modkern.ops.dispatch import accumulation_dtype, check_backend
from modkern.ops.divergence.api import (
    DIRECTIONS,
    check_ref_index_values,
    divergence_bwd,
    divergence_fwd,
    ref_index_guard,
)

NO_DIVERGENCE = "none"
# Default memory budget of one chunk's [rows, V] temporaries (logits of both branches, the
# divergence's stored gradients, the fp32 softmax of the CE): ~8 fp32-sized [rows, V] buffers.
DEFAULT_CHUNK_BUDGET_BYTES = 512 * 2**20
_BYTES_PER_CHUNK_ELEMENT = 32


def default_chunk_size(rows: int, vocab: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's ``[rows, V]`` temporaries fit in ``budget_bytes``."""
    per_row = max(vocab, 1) * _BYTES_PER_CHUNK_ELEMENT
    return max(1, min(max(rows, 1), budget_bytes // per_row))


# ----------------------------------------------------------------------------------------------
# One chunk


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(hidden, weight, bias)


def token_ce_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row next-token CE in fp32 (fp64 for fp64 logits); 0 where ``targets == -100``.

    The one CE of the package: the fused-linear chunks and the robust objective's answer rows."""
    logits = logits.to(accumulation_dtype(logits))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def _ce_grad(logits: Tensor, targets: Tensor, grad_rows: Tensor) -> Tensor:
    """d(sum_r grad_rows[r] * CE_r) / d logits, fp32: ``(softmax - onehot) * grad_rows``."""
    keep = targets != IGNORE_INDEX
    grad = torch.softmax(logits.to(accumulation_dtype(logits)), dim=-1)
    grad.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), -keep.to(grad.dtype).unsqueeze(1))
    return grad.mul_((grad_rows * keep).unsqueeze(1))


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` with the product accumulated *and returned* in ``acc`` (fp32 for 16-bit inputs), so
    that summing chunk and branch contributions (which nearly cancel for symmetric divergences)
    does not round each of them to 16 bits first."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)  # 16-bit tensor cores, fp32 output (torch >= 2.8)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return a.to(acc) @ b.to(acc)


@dataclass(frozen=True)
class _Chunk:
    """Rows ``[start, stop)`` of Q and the P rows they are compared with."""

    start: int
    stop: int
    p_rows: Tensor  # int64 indices into p_hidden

    def slice(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None or t.numel() == 0 else t[self.start : self.stop]


def _chunks(rows: int, chunk_size: int, ref_index: Optional[Tensor], device) -> list[_Chunk]:
    out = []
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        p_rows = ref_index[start:stop] if ref_index is not None else torch.arange(start, stop, device=device)
        out.append(_Chunk(start, stop, p_rows))
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("modkern::linear_losses_fwd", mutates_args=())
def linear_losses_fwd(
    q_hidden: Tensor,
    p_hidden: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Optional[Tensor],
    mask: Optional[Tensor],
    ref_index: Optional[Tensor],
    kind: str,
    beta: float,
    inv_temperature: float,
    chunk_size: int,
    detach_p_logits: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (divergence rows [R] or [0], CE rows [R] or [0]), fp32.

    ``detach_p_logits`` only matters to the backward (no gradient through the P logits).
    """
    if p_hidden is not None:
        ref_index = check_ref_index_values(ref_index, p_hidden.shape[0])  # inside the op: opaque to compile
    rows, acc = q_hidden.shape[0], accumulation_dtype(q_hidden)
    div = q_hidden.new_zeros((rows if kind != NO_DIVERGENCE else 0,), dtype=acc)
    ce = q_hidden.new_zeros((rows if targets is not None else 0,), dtype=acc)
    for chunk in _chunks(rows, chunk_size, ref_index, q_hidden.device):
        q_logits = _logits(chunk.slice(q_hidden), weight, bias)
        if targets is not None:
            ce[chunk.start : chunk.stop] = token_ce_rows(q_logits, chunk.slice(targets))
        if kind != NO_DIVERGENCE:
            p_logits = _logits(p_hidden.index_select(0, chunk.p_rows), weight, bias)
            args = (None, chunk.slice(mask), kind, beta, inv_temperature, False, False, backend)
            div[chunk.start : chunk.stop] = divergence_fwd(p_logits, q_logits, *args)[0]
    return div, ce


@linear_losses_fwd.register_fake
def _(q_hidden, p_hidden, weight, bias, targets, mask, ref_index, kind, *options):
    rows, acc = q_hidden.shape[0], accumulation_dtype(q_hidden)
    return (
        q_hidden.new_empty((rows if kind != NO_DIVERGENCE else 0,), dtype=acc),
        q_hidden.new_empty((rows if targets is not None else 0,), dtype=acc),
    )


@dataclass
class _HeadGrads:
    """The gradients the backward accumulates chunk by chunk (``[0]`` where not wanted), in the
    accumulation dtype except Q's (written once per row)."""

    q: Tensor
    p: Tensor
    weight: Tensor
    bias: Tensor

    @staticmethod
    def zeros(q_hidden, p_hidden, weight, need_q, need_p, need_weight, need_bias) -> _HeadGrads:
        acc = accumulation_dtype(weight)
        return _HeadGrads(
            torch.zeros_like(q_hidden) if need_q else q_hidden.new_empty(0),
            torch.zeros_like(p_hidden, dtype=acc) if need_p else q_hidden.new_empty(0),
            torch.zeros_like(weight, dtype=acc) if need_weight else weight.new_empty(0),
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else weight.new_empty(0),
        )

    def add(self, d_logits: Tensor, hidden: Tensor, weight: Tensor, q_rows: Optional[slice], p_rows: Optional[Tensor]):
        """Add one chunk's logit gradient ``d_logits`` (of ``hidden``'s rows) into the bias, the
        head weight and the hidden states (Q rows ``q_rows`` or P rows ``p_rows``)."""
        acc = accumulation_dtype(weight)
        if self.bias.numel():
            self.bias.add_(d_logits.sum(0, dtype=acc))
        d_logits = d_logits.to(weight.dtype)
        if self.weight.numel():
            self.weight.add_(_mm(d_logits.t(), hidden, acc))
        if q_rows is not None and self.q.numel():
            self.q[q_rows] = d_logits @ weight
        elif p_rows is not None and self.p.numel():
            self.p.index_add_(0, p_rows, _mm(d_logits, weight, acc))


@torch.library.custom_op("modkern::linear_losses_bwd", mutates_args=())
def linear_losses_bwd(
    grad_div: Tensor,
    grad_ce: Tensor,
    q_hidden: Tensor,
    p_hidden: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Optional[Tensor],
    mask: Optional[Tensor],
    ref_index: Optional[Tensor],
    kind: str,
    beta: float,
    inv_temperature: float,
    chunk_size: int,
    detach_p_logits: bool,
    need_grad_q: bool,
    need_grad_p: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (q_hidden, p_hidden, weight, bias), each ``[0]`` when not needed."""
    use_div = kind != NO_DIVERGENCE
    if use_div:
        ref_index = check_ref_index_values(ref_index, p_hidden.shape[0])
    need_head = need_grad_weight or need_grad_bias
    q_logit_grad = need_grad_q or need_head
    p_logit_grad = use_div and not detach_p_logits and (need_grad_p or need_head)
    need_grad_p = need_grad_p and p_logit_grad
    grads = _HeadGrads.zeros(q_hidden, p_hidden, weight, need_grad_q, need_grad_p, need_grad_weight, need_grad_bias)
    spec_args = (kind, beta, inv_temperature, p_logit_grad, q_logit_grad, backend)
    for chunk in _chunks(q_hidden.shape[0], chunk_size, ref_index, q_hidden.device):
        q_h = chunk.slice(q_hidden)
        q_logits = _logits(q_h, weight, bias)
        d_q = d_p = p_h = None
        if use_div and (q_logit_grad or p_logit_grad):
            p_h = p_hidden.index_select(0, chunk.p_rows)
            p_logits = _logits(p_h, weight, bias)
            d_p, d_q = _divergence_logit_grads(p_logits, q_logits, chunk.slice(mask), chunk.slice(grad_div), spec_args)
            del p_logits
        if targets is not None and q_logit_grad:
            d_ce = _ce_grad(q_logits, chunk.slice(targets), chunk.slice(grad_ce))
            d_q = d_ce if d_q is None or d_q.numel() == 0 else d_ce.add_(d_q)
        del q_logits
        if d_q is not None and d_q.numel():
            grads.add(d_q, q_h, weight, slice(chunk.start, chunk.stop), None)
        if p_logit_grad and d_p.numel():
            grads.add(d_p, p_h, weight, None, chunk.p_rows)
    return (
        grads.q,
        grads.p.to(p_hidden.dtype) if need_grad_p else grads.p,
        grads.weight.to(weight.dtype) if need_grad_weight else grads.weight,
        grads.bias.to(bias.dtype) if need_grad_bias else grads.bias,
    )


def _divergence_logit_grads(p_logits, q_logits, mask, grad_rows, spec_args):
    """One chunk's divergence gradients of its P and Q logits, through the divergence ops (the
    forward for the row statistics, then the backward)."""
    _, stats, saved_p, saved_q = divergence_fwd(p_logits, q_logits, None, mask, *spec_args)
    return divergence_bwd(grad_rows, p_logits, q_logits, None, mask, stats, saved_p, saved_q, *spec_args)


@linear_losses_bwd.register_fake
def _(grad_div, grad_ce, q_hidden, p_hidden, weight, bias, *options):
    need_grad_q, need_grad_p, need_grad_weight, need_grad_bias = options[-5:-1]
    return (
        torch.empty_like(q_hidden) if need_grad_q else q_hidden.new_empty(0),
        torch.empty_like(p_hidden) if need_grad_p else q_hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_grad_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    (q_hidden, p_hidden, weight, bias, targets, mask, ref_index, *meta) = inputs
    ctx.save_for_backward(q_hidden, p_hidden, weight, bias, targets, mask, ref_index)
    ctx.meta = tuple(meta)  # kind, beta, inv_temperature, chunk_size, detach_p_logits, backend


def _op_backward(ctx, grad_div, grad_ce):
    q_hidden, p_hidden, weight, bias, targets, mask, ref_index = ctx.saved_tensors
    detach_p, backend = ctx.meta[-2:]
    wanted = ctx.needs_input_grad
    need = dict(
        q=wanted[0],
        p=p_hidden is not None and wanted[1] and not detach_p,
        w=wanted[2],
        b=bias is not None and wanted[3],
    )
    if not any(need.values()):
        return (None,) * 13
    rows = q_hidden.shape[0]
    acc = accumulation_dtype(q_hidden)
    grad_div = grad_div if grad_div is not None and grad_div.numel() else q_hidden.new_zeros(rows, dtype=acc)
    grad_ce = grad_ce if grad_ce is not None and grad_ce.numel() else q_hidden.new_zeros(rows, dtype=acc)
    grad_div, grad_ce = grad_div.contiguous(), grad_ce.contiguous()
    needs = (need["q"], need["p"], need["w"], need["b"])
    gq, gp, gw, gb = linear_losses_bwd(grad_div, grad_ce, *ctx.saved_tensors, *ctx.meta[:-1], *needs, backend)
    pick = lambda flag, g: g if flag else None
    return (pick(need["q"], gq), pick(need["p"], gp), pick(need["w"], gw), pick(need["b"], gb)) + (None,) * 9


linear_losses_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The engine


def _kind(divergence: Optional[str], direction: str) -> str:
    if divergence is None:
        return NO_DIVERGENCE
    if divergence == "js":
        return "js"
    if divergence == "kl":
        checks.check_choice("direction", direction, DIRECTIONS)
        return "kl_" + direction
    raise ValueError(f"divergence must be 'kl', 'js' or None, got {divergence!r}")


def _check_hidden(name: str, hidden: Tensor, weight: Tensor) -> Tensor:
    checks.check_float_tensor(name, hidden)
    if hidden.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, H] (flatten leading dims first), got shape {tuple(hidden.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name} has hidden size {hidden.shape[1]} but weight is {tuple(weight.shape)} ([V, H]): they must agree"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{name} ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    return hidden


def linear_losses(
    q_hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    p_hidden: Optional[Tensor] = None,
    divergence: Optional[str] = None,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    targets: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    ref_index: Optional[Tensor] = None,
    detach_p_logits: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-row divergence and / or CE of the logits ``hidden @ weight.T + bias``, chunk by chunk.

    Returns ``(div_rows [R] or None, ce_rows [R] or None)`` in fp32: ``div_rows`` when
    ``divergence`` is ``"kl"`` (with ``direction``) or ``"js"`` (with ``beta``) between the P logits
    of ``p_hidden[ref_index[r]]`` (or row r) and the Q logits of ``q_hidden[r]`` (0 where ``mask``
    is False); ``ce_rows`` = ``CE(q logits, targets)`` when ``targets`` is given (0 where it is -100;
    no temperature). ``detach_p_logits`` treats the P logits as constants (no gradient through them
    to ``weight`` / ``bias`` / ``p_hidden``), as for a detached clean branch.
    """
    checks.check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the LM head's weight), got shape {tuple(weight.shape)}")
    _check_hidden("q_hidden", q_hidden, weight)
    kind = _kind(divergence, direction)
    rows = q_hidden.shape[0]
    device = checks.check_same_device(q_hidden=q_hidden, weight=weight, p_hidden=p_hidden, bias=bias)
    if bias is not None:
        checks.check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one entry per vocabulary row of weight)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if kind == NO_DIVERGENCE:
        if targets is None:
            raise ValueError("nothing to compute: give a divergence, targets, or both")
        p_hidden = mask = ref_index = None
    else:
        if p_hidden is None:
            raise ValueError("p_hidden is required for a divergence")
        _check_hidden("p_hidden", p_hidden, weight)
        if ref_index is None:
            if p_hidden.shape[0] != rows:
                raise ValueError(
                    f"p_hidden has {p_hidden.shape[0]} rows and q_hidden {rows}: they must agree unless ref_index "
                    "maps each q row to a p row"
                )
        else:
            ref_index = checks.check_index_vector("ref_index", ref_index, rows, (rows,), device)
        mask = checks.check_mask("mask", mask, rows, (rows,), device)
    if targets is not None:
        targets = checks.check_index_vector("targets", targets, rows, (rows,), device, "an integer tensor of token ids")
    temperature = checks.check_positive_number("temperature", temperature, allow_tensor=False)
    beta = checks.check_open_unit_interval("beta", beta)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    backend = check_backend(backend)
    if not isinstance(detach_p_logits, bool):
        raise TypeError(f"detach_p_logits must be a bool, got {type(detach_p_logits).__name__}")
    args = (q_hidden, p_hidden, weight, bias, targets, mask, ref_index, kind, beta, 1.0 / temperature)
    div, ce = linear_losses_fwd(*args, int(chunk_size), detach_p_logits, backend)
    guard = ref_index_guard(ref_index, p_hidden.shape[0]) if kind != NO_DIVERGENCE else None
    div = div if guard is None else div * guard
    return (div if kind != NO_DIVERGENCE else None), (ce if targets is not None else None)


# ----------------------------------------------------------------------------------------------
# Public wrappers


def _linear_divergence(divergence, direction, beta, p_hidden, q_hidden, weight, bias, options) -> Tensor:
    reduction, num_items = options.pop("reduction"), options.pop("num_items")
    checks.check_reduction_args(reduction, num_items)
    checks.check_float_tensor("p_hidden", p_hidden)
    div, _ = linear_losses(
        q_hidden, weight, bias, p_hidden=p_hidden, divergence=divergence, direction=direction, beta=beta, **options
    )
    mask = options.get("mask")
    return reduce_rows(div, None if mask is None else mask.reshape(-1), reduction, num_items)


def fused_linear_kl(
    p_hidden: Tensor,
    q_hidden: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    direction: str = "forward",
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    ref_index: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items=None,
    chunk_size: Optional[int] = None,
    detach_p_logits: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""KL divergence between the LM-head distributions of two branches, from their hidden states.

    .. math::
        p = h_P W^\top + b,\quad q = h_Q W^\top + b,\quad
        \mathrm{KL}(P\|Q) = \sum_v P_v (\log P_v - \log Q_v),\quad P = \mathrm{softmax}(p/T)

    Exactly ``fused_kl(p_hidden @ weight.T + bias, q_hidden @ weight.T + bias, ...)`` (same
    ``direction``, ``temperature``, ``mask``, ``ref_index``, ``reduction``, ``num_items``), computed
    ``chunk_size`` rows at a time so that at most one chunk of ``[rows, V]`` logits exists.

    Args:
        p_hidden: ``[N, H]`` hidden states of the P branch (e.g. the clean pass).
        q_hidden: ``[R, H]``; row r is compared with ``p_hidden[ref_index[r]]`` (or row r).
        weight: ``[V, H]`` LM-head weight; ``bias``: ``[V]`` or None. Same dtype as the hidden states.
        chunk_size: rows per chunk; None picks one from a ~512 MiB budget for a chunk's temporaries.
        detach_p_logits: no gradient through the P logits (to ``weight``, ``bias`` or ``p_hidden``),
            as with a detached clean branch; otherwise ``weight`` gets both branches' gradients.

    Gradients flow to whichever of ``p_hidden``, ``q_hidden``, ``weight``, ``bias`` require grad;
    fp32 accumulation; the forward stores only its inputs (the backward recomputes the logits).

    Example::

        >>> h_clean = torch.randn(64, 4096, dtype=torch.bfloat16)
        >>> h_adv = torch.randn(64, 4096, dtype=torch.bfloat16, requires_grad=True)
        >>> loss = fused_linear_kl(h_clean, h_adv, lm_head.weight, detach_p_logits=True)
    """
    options = dict(
        temperature=temperature,
        mask=mask,
        ref_index=ref_index,
        reduction=reduction,
        num_items=num_items,
        chunk_size=chunk_size,
        detach_p_logits=detach_p_logits,
        backend=backend,
    )
    checks.check_choice("direction", direction, DIRECTIONS)
    return _linear_divergence("kl", direction, 0.5, p_hidden, q_hidden, weight, bias, options)


def fused_linear_js(
    p_hidden: Tensor,
    q_hidden: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    ref_index: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items=None,
    chunk_size: Optional[int] = None,
    detach_p_logits: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Generalized JS divergence between the LM-head distributions of two branches, from hidden states.

    .. math::
        M = \beta P + (1-\beta) Q,\quad \mathrm{JS}_\beta = \beta\,\mathrm{KL}(P\|M)
        + (1-\beta)\,\mathrm{KL}(Q\|M)

    with ``P = softmax((p_hidden @ weight.T + bias) / T)`` and Q likewise: exactly ``fused_js`` of
    those logits, chunked over rows as in :func:`fused_linear_kl` (all arguments as there).

    Example::

        >>> loss = fused_linear_js(h_clean, h_adv, lm_head.weight, beta=0.5, mask=answer_rows)
    """
    options = dict(
        temperature=temperature,
        mask=mask,
        ref_index=ref_index,
        reduction=reduction,
        num_items=num_items,
        chunk_size=chunk_size,
        detach_p_logits=detach_p_logits,
        backend=backend,
    )
    return _linear_divergence("js", "forward", beta, p_hidden, q_hidden, weight, bias, options)
