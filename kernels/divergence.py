"""Triton kernels of the divergence family (``fused_js`` / ``fused_kl``).

Same contract as ``modkern.torch_backend.divergence`` (its docstring has the table of losses and
gradients). Per compared row r, with ``a = p[ref[r]] / T`` and ``b = q[r] / T``:

    pass 1  online max / sum-exp per lane of a and b (one exp per element) -> (shift, ls) per row
    pass 2  logP = (a - shift_a) - ls_a, logQ likewise, P, Q, (log M)      -> S_P, S_Q, loss
    pass 3  the gradient(s) of the row's loss, times 1/T        -> grad_p[r], grad_q[r]

Pass 3 is folded into pass 2 when every requested gradient is free of the row sums (forward KL
with only Q requiring grad - the paper's default with a detached clean branch - writes Q - P;
reverse KL with only P requiring grad writes P - Q).

Why store the gradients in the forward and scale them in the backward rather than recompute them
there (bytes per element of one [R, V] operand, one gradient, bf16 = 2 bytes):
    stored:     fwd reads a, b twice (8) + writes g (2); bwd reads g, writes g' (4)   = 14 B
    recomputed: fwd reads a, b twice (8);        bwd reads a, b 2-3x (8-12) + writes (2) = 18-22 B
so storing wins, and the backward is a pure streaming scale. (fp16 logits store fp32 gradients -
``saved_grad_dtype``: unscaled fp16 would flush the small entries before a loss scale lifts them -
which costs 4 more bytes per element there; bf16 / fp32 store their own dtype.) The exception is ``ref_index`` with a
gradient for P: several Q rows share one P row, so each P row's gradient is a sum over its copies,
recomputed in the backward by one program per P row looping over its copies (an on-device CSR
built with argsort / scatter_add / cumsum - no atomics, deterministic, no [R, V] temporary).

No host synchronization anywhere; all offsets are int64 (R * V can exceed 2^31). float64 logits
run the PyTorch backend (these kernels accumulate in fp32).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

try:  # the fast log2 (PTX lg2.approx) of the compiled kernels; the interpreter has no libdevice
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - depends on the triton build
    _libdevice = None

from modkern.backend import KERNEL_DTYPES, accumulation_dtype, saved_grad_dtype

# float64 logits run the PyTorch backend (modkern.backend.load_impl reads this).
SUPPORTED_DTYPES = KERNEL_DTYPES

# Widest block of the vocabulary one program handles per loop iteration. Rows wider than this
# loop; tests lower it to exercise many iterations.
BLOCK_V_MAX = 4096


# Compiled kernels take log2 through lg2.approx (libdevice fast_log2f); the interpreter (numpy) and
# triton builds without libdevice use tl.log2. See _fast_log2 for the accuracy argument.
_FAST_LOG = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") != "1" and _libdevice is not None and hasattr(_libdevice, "fast_log2f")
)
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = tl.constexpr(1.0 / math.log(2.0))
# Start of the running max: finite, so exp2(lo - hi) never sees -inf - -inf (no guard per element).
_M_INIT = tl.constexpr(-3.4028234663852886e38)


def _block_v(vocab: int) -> int:
    return max(16, min(triton.next_power_of_2(vocab), BLOCK_V_MAX))


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


# exp / log go through exp2 / log2 (one MUFU op each: ex2.approx.ftz, lg2.approx.ftz); tl.exp is
# ex2.approx without ftz, which adds a denormal fix-up of ~3 instructions per call (a probability
# below 2^-126 flushes to 0: 0 log 0 = 0). The logits stay in natural units, a = logit / T, as in
# the torch backend (exact for T = 1 or 0.5): scaling them by log2(e) rounded every element, and
# JS's log P - log M - S_P (|log P - log M| <= log(1/beta)) lost ~6x precision to it.


@triton.jit
def _load_row(base, offs, limit, scale):
    # Lanes at or past ``limit`` read -inf (probability exactly 0). ``limit`` is V for an active
    # row; masked-out rows run none of the loops. ``scale`` = 1 / T.
    x = tl.load(base + offs, mask=offs < limit, other=float("-inf"))
    return x.to(tl.float32) * scale


@triton.jit
def _fast_log2(x):
    # log2 x for the per-element log M's log(1 + e), e in [0, 1]: x in [1, 2].
    # Compiled: lg2.approx.ftz.f32, one MUFU op (the precise logf was ~60 instructions), absolute
    # error ~2^-22 in log2 on [1, 2] (PTX ISA). With e from ex2.approx (relative error ~2^-22),
    # log M carries < 4e-7 absolute error, below the ~1e-6 that the fp32 rounding of the logits
    # puts into log P near the top entries. (log M = log(beta P + (1 - beta) Q) from P and Q would
    # save a MUFU op, but P = exp(log P) carries |log P| x 2^-24 relative error from rounding
    # log P * log2(e): JS's gradients, whose log P - log M - S_P cancels, came out ~10x less
    # accurate.) tests/test_divergence.py holds every
    # backend's fp32 gradients within 1.5e-4 relative L2 error of float64 on peaked rows.
    if _FAST_LOG:
        return _libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _online_lse_update(m, s, x):
    # Per-lane online log-sum-exp with ONE exp per element: e^(lo - hi) rescales whichever of
    # the running sum (when x raises the max) and the new term (otherwise) sits below the max.
    # m starts finite (_M_INIT), so a -inf x gives e^-inf = 0 and never -inf - -inf.
    hi = tl.maximum(m, x)
    e = tl.exp2((tl.minimum(m, x) - hi) * _LOG2E)
    s = tl.where(x > m, s * e + 1.0, s + e)
    return hi, s


@triton.jit
def _lse_finish(m, s):
    # The row's log-sum-exp as (shift, log-sum): lse = shift + ls. Kept apart so that
    # log P = (a - shift) - ls: a - shift is exact (Sterbenz) and ls is O(1) with full relative
    # precision. Forming shift + ls first (~20 for peaked logits) rounds at ulp(20) ~ 2e-6: the
    # error that made the kernels' fp32 gradients ~4x less accurate than float64 allows.
    # A row that saw nothing keeps shift = _M_INIT and ls = log(0) = -inf. (Once per row: the
    # precise tl.exp / tl.log.)
    shift = tl.max(m, 0)
    return shift, tl.log(tl.sum(s * tl.exp(m - shift), 0))


@triton.jit
def _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND: tl.constexpr):
    # log-probabilities, probabilities, and what each side's log is compared against:
    # JS compares both with log M = logaddexp(log P + log beta, log Q + log(1 - beta));
    # KL(P||Q) compares log P with log Q and vice versa. c_p, c_q = log beta, log(1 - beta).
    lp = (a - sh_a) - ls_a
    lq = (b - sh_b) - ls_b
    prob_p = tl.exp2(lp * _LOG2E)
    prob_q = tl.exp2(lq * _LOG2E)
    if KIND == 0:
        u = lp + c_p
        v = lq + c_q
        hi = tl.maximum(u, v)
        lm = hi + _fast_log2(1.0 + tl.exp2((tl.minimum(u, v) - hi) * _LOG2E)) * _LN2
        xp = lm
        xq = lm
    else:
        xp = lq
        xq = lp
    # P (log P - x) with 0 log 0 = 0; a NaN P (NaN logit) is not == 0 and propagates, so a broken
    # row is NaN, never a silent 0.
    t_p = tl.where(prob_p == 0, 0.0, prob_p * (lp - xp))
    t_q = tl.where(prob_q == 0, 0.0, prob_q * (lq - xq))
    return prob_p, prob_q, t_p, t_q


@triton.jit
def _grad_a(prob_p, prob_q, t_p, s_p, own_scale, inv_t, KIND: tl.constexpr):
    # d loss / d logit_p (1/T included): own = P (log P - x - S_P) = t_p - S_P P (0 where
    # P == 0), times own_scale = 1 / T (x beta for JS).
    # js: beta P (lp - lm - S_P); kl_forward: P (lp - lq - S_P); kl_reverse: P - Q; kl_symmetric: both.
    if KIND == 2:
        g = (prob_p - prob_q) * inv_t
    else:
        g = (t_p - s_p * prob_p) * own_scale
        if KIND == 3:
            g += (prob_p - prob_q) * inv_t
    return g


@triton.jit
def _grad_b(prob_p, prob_q, t_q, s_q, own_scale, inv_t, KIND: tl.constexpr):
    # d loss / d logit_q: js (1-beta) Q (lq - lm - S_Q); kl_forward Q - P; kl_reverse
    # Q (lq - lp - S_Q); kl_symmetric both.
    if KIND == 1:
        g = (prob_q - prob_p) * inv_t
    else:
        g = (t_q - s_q * prob_q) * own_scale
        if KIND == 3:
            g += (prob_q - prob_p) * inv_t
    return g


@triton.jit
def _divergence_fwd_kernel(
    p_ptr,
    q_ptr,
    ref_ptr,
    mask_ptr,
    loss_ptr,
    stats_ptr,
    gp_ptr,
    gq_ptr,
    V,
    stride_p,
    stride_q,
    stride_gp,
    stride_gq,
    inv_t,
    beta,
    c_p,
    c_q,
    KIND: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GP: tl.constexpr,
    WRITE_GQ: tl.constexpr,
    FUSED_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_REF:
        p_row = tl.load(ref_ptr + row).to(tl.int64)
    else:
        p_row = row
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    else:
        active = row >= 0
    # masked-out rows run none of the passes below: nothing read
    limit = tl.where(active, V, 0)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    lanes = tl.arange(0, BLOCK)
    scale = inv_t
    if KIND == 0:
        own_a = beta * inv_t
        own_b = (1.0 - beta) * inv_t
    else:
        own_a = inv_t
        own_b = inv_t

    # pass 1: log-sum-exp of both rows.
    m_a = tl.full([BLOCK], _M_INIT, tl.float32)
    m_b = tl.full([BLOCK], _M_INIT, tl.float32)
    s_a = tl.zeros([BLOCK], tl.float32)
    s_b = tl.zeros([BLOCK], tl.float32)
    for start in range(0, limit, BLOCK):
        offs = start + lanes
        m_a, s_a = _online_lse_update(m_a, s_a, _load_row(p_base, offs, limit, scale))
        m_b, s_b = _online_lse_update(m_b, s_b, _load_row(q_base, offs, limit, scale))
    sh_a, ls_a = _lse_finish(m_a, s_a)
    sh_b, ls_b = _lse_finish(m_b, s_b)

    # pass 2: S_P = sum P (logP - xp), S_Q = sum Q (logQ - xq); gradients free of them, if fused.
    acc_p = tl.zeros([BLOCK], tl.float32)
    acc_q = tl.zeros([BLOCK], tl.float32)
    for start in range(0, limit, BLOCK):
        offs = start + lanes
        a = _load_row(p_base, offs, limit, scale)
        b = _load_row(q_base, offs, limit, scale)
        prob_p, prob_q, t_p, t_q = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
        acc_p += t_p
        acc_q += t_q
        if FUSED_GRAD:
            if WRITE_GP:
                g = _grad_a(prob_p, prob_q, t_p, 0.0, own_a, inv_t, KIND)
                tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
            if WRITE_GQ:
                g = _grad_b(prob_p, prob_q, t_q, 0.0, own_b, inv_t, KIND)
                tl.store(gq_ptr + row * stride_gq + offs, g.to(gq_ptr.dtype.element_ty), mask=offs < V)
    s_p = tl.sum(acc_p, 0)
    s_q = tl.sum(acc_q, 0)
    if KIND == 0:
        loss = beta * s_p + (1.0 - beta) * s_q
    elif KIND == 1:
        loss = s_p
    elif KIND == 2:
        loss = s_q
    else:
        loss = s_p + s_q
    # masked-out rows store 0 sums (their lse is -inf)
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    tl.store(stats_ptr + row * 4 + 0, sh_a + ls_a)
    tl.store(stats_ptr + row * 4 + 1, sh_b + ls_b)
    tl.store(stats_ptr + row * 4 + 2, tl.where(active, s_p, 0.0))
    tl.store(stats_ptr + row * 4 + 3, tl.where(active, s_q, 0.0))

    # masked-out rows: only zeros into the stored gradients (the op's outputs must be defined);
    # nothing read. The loop runs V - limit = V elements for them and none for active rows.
    if WRITE_GP or WRITE_GQ:
        zeros = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V - limit, BLOCK):
            offs = start + lanes
            if WRITE_GP:
                tl.store(gp_ptr + row * stride_gp + offs, zeros.to(gp_ptr.dtype.element_ty), mask=offs < V)
            if WRITE_GQ:
                tl.store(gq_ptr + row * stride_gq + offs, zeros.to(gq_ptr.dtype.element_ty), mask=offs < V)

    # pass 3: gradients that need the row sums.
    if not FUSED_GRAD:
        for start in range(0, limit, BLOCK):
            offs = start + lanes
            a = _load_row(p_base, offs, limit, scale)
            b = _load_row(q_base, offs, limit, scale)
            prob_p, prob_q, t_p, t_q = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            if WRITE_GP:
                g = _grad_a(prob_p, prob_q, t_p, s_p, own_a, inv_t, KIND)
                tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
            if WRITE_GQ:
                g = _grad_b(prob_p, prob_q, t_q, s_q, own_b, inv_t, KIND)
                tl.store(gq_ptr + row * stride_gq + offs, g.to(gq_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _divergence_grad_p_shared_kernel(
    p_ptr,
    q_ptr,
    order_ptr,
    start_ptr,
    count_ptr,
    mask_ptr,
    grad_rows_ptr,
    stats_ptr,
    gp_ptr,
    V,
    stride_p,
    stride_q,
    stride_gp,
    inv_t,
    beta,
    c_p,
    c_q,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grad_p[n] = sum over copies r with ref[r] == n of grad_rows[r] * d loss_r / d logit_p.
    # One program per P row n; its copies are order[start[n] : start[n] + count[n]].
    n = tl.program_id(0).to(tl.int64)
    first = tl.load(start_ptr + n)
    count = tl.load(count_ptr + n)
    lanes = tl.arange(0, BLOCK)
    p_base = p_ptr + n * stride_p
    scale = inv_t
    if KIND == 0:
        own_a = beta * inv_t
    else:
        own_a = inv_t
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        a = _load_row(p_base, offs, V, scale)  # once per chunk, shared by all copies
        acc = tl.zeros([BLOCK], tl.float32)
        for j in range(first, first + count):
            r = tl.load(order_ptr + j).to(tl.int64)
            if HAS_MASK:
                active = tl.load(mask_ptr + r) != 0
            else:
                active = r >= 0
            b = _load_row(q_ptr + r * stride_q, offs, tl.where(active, V, 0), scale)
            lse_a = tl.load(stats_ptr + r * 4 + 0)
            lse_b = tl.load(stats_ptr + r * 4 + 1)
            s_p = tl.load(stats_ptr + r * 4 + 2)
            prob_p, prob_q, t_p, t_q = _row_terms(a, b, lse_a, 0.0, lse_b, 0.0, c_p, c_q, KIND)
            g = _grad_a(prob_p, prob_q, t_p, s_p, own_a, inv_t, KIND)
            w = tl.load(grad_rows_ptr + r).to(tl.float32)
            acc += tl.where(active, g * w, 0.0)
        tl.store(gp_ptr + n * stride_gp + offs, acc.to(gp_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _scale_rows_kernel(
    src_ptr, scale_ptr, mask_ptr, dst_ptr, V, stride_src, stride_dst, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr
):
    # dst[r, :] = src[r, :] * scale[r]  in fp32, stored in dst's dtype. Masked-out rows read
    # nothing (their src is 0) and store 0.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row).to(tl.float32)
    limit = V
    if HAS_MASK:
        limit = tl.where(tl.load(mask_ptr + row) != 0, V, 0)
    x = tl.load(src_ptr + row * stride_src + offs, mask=offs < limit, other=0.0).to(tl.float32)
    tl.store(dst_ptr + row * stride_dst + offs, (x * scale).to(dst_ptr.dtype.element_ty), mask=offs < V)


def _mix_coefs(beta: float):
    # c_p, c_q of _row_terms
    return math.log(beta), math.log1p(-beta)


def forward(p, q, ref_index, mask, spec):
    """``spec``: a ``modkern.ops.divergence.DivergenceSpec`` (kind, beta, 1/T, which gradients)."""
    beta, inv_temperature, need_grad_q = spec.beta, spec.inv_temperature, spec.need_grad_q
    rows, vocab = q.shape
    kind_id = spec.kind_id
    acc = accumulation_dtype(p)
    loss = torch.empty(rows, dtype=acc, device=q.device)
    stats = torch.empty(rows, 4, dtype=acc, device=q.device)
    write_gp = spec.stores_grad_p(ref_index)
    # stored unscaled until the backward: fp32 for fp16 logits (see saved_grad_dtype)
    grad_p = torch.empty_like(p, dtype=saved_grad_dtype(p.dtype)) if write_gp else p.new_empty(0)
    grad_q = torch.empty_like(q, dtype=saved_grad_dtype(q.dtype)) if need_grad_q else q.new_empty(0)
    # Gradients free of the row sums: kl_forward's Q - P and kl_reverse's P - Q.
    fused = (not write_gp or kind_id == 2) and (not need_grad_q or kind_id == 1)
    if rows == 0:
        return loss, stats, grad_p, grad_q
    block = _block_v(vocab)
    c_p, c_q = _mix_coefs(beta)
    _divergence_fwd_kernel[(rows,)](
        p,
        q,
        ref_index if ref_index is not None else q,
        mask if mask is not None else q,
        loss,
        stats,
        grad_p if write_gp else q,
        grad_q if need_grad_q else q,
        vocab,
        p.stride(0),
        q.stride(0),
        grad_p.stride(0) if write_gp else 0,
        grad_q.stride(0) if need_grad_q else 0,
        float(inv_temperature),
        float(beta),
        c_p,
        c_q,
        KIND=kind_id,
        HAS_REF=ref_index is not None,
        HAS_MASK=mask is not None,
        WRITE_GP=write_gp,
        WRITE_GQ=need_grad_q,
        FUSED_GRAD=fused,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return loss, stats, grad_p, grad_q


def _scale_rows(saved, grad_rows, mask, dtype):
    out = torch.empty(saved.shape, dtype=dtype, device=saved.device)
    rows, vocab = saved.shape
    if rows == 0:
        return out
    block = min(_block_v(vocab), 2048)
    _scale_rows_kernel[(rows, triton.cdiv(vocab, block))](
        saved,
        grad_rows,
        mask if mask is not None else grad_rows,
        out,
        vocab,
        saved.stride(0),
        out.stride(0),
        HAS_MASK=mask is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out


def _copies_by_reference(ref_index, num_p_rows):
    """On-device CSR of the copies of each P row: (order, start, count). No host sync."""
    order = torch.argsort(ref_index, stable=True)
    count = torch.zeros(num_p_rows, dtype=torch.int64, device=ref_index.device)
    count.scatter_add_(0, ref_index, torch.ones_like(ref_index))
    start = torch.cumsum(count, 0) - count
    return order, start, count


def backward(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec):
    """p and q are read only on the shared-P path (ref_index with P's gradient)."""
    beta, inv_temperature = spec.beta, spec.inv_temperature
    need_grad_p, need_grad_q = spec.need_grad_p, spec.need_grad_q
    grad_q = _scale_rows(saved_grad_q, grad_rows, mask, q.dtype) if need_grad_q else q.new_empty(0)
    if not need_grad_p:
        return p.new_empty(0), grad_q
    if ref_index is None:
        return _scale_rows(saved_grad_p, grad_rows, mask, p.dtype), grad_q
    num_p_rows, vocab = p.shape
    grad_p = torch.empty_like(p)
    if num_p_rows == 0:
        return grad_p, grad_q
    order, start, count = _copies_by_reference(ref_index, num_p_rows)
    block = _block_v(vocab)
    c_p, c_q = _mix_coefs(beta)
    _divergence_grad_p_shared_kernel[(num_p_rows,)](
        p,
        q,
        order,
        start,
        count,
        mask if mask is not None else grad_rows,
        grad_rows,
        stats,
        grad_p,
        vocab,
        p.stride(0),
        q.stride(0),
        grad_p.stride(0),
        float(inv_temperature),
        float(beta),
        c_p,
        c_q,
        KIND=spec.kind_id,
        HAS_MASK=mask is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return grad_p, grad_q
