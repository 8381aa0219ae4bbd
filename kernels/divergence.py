"""Triton kernels of the divergence family (``fused_js`` / ``fused_kl``).

Same losses and gradients as ``modkern.ops.divergence.torch_impl`` (its docstring has the table).
Per compared row r, with ``a = p[ref[r]] / T`` and ``b = q[r] / T``:

    forward   JS   pass 1  online max / sum-exp per lane of a and b (one exp per element)
                           -> (shift, logsum) per row, lse = shift + logsum
                   pass 2  log P = (a - shift_a) - logsum_a, log Q likewise, P, Q, log M
                           -> S_P, S_Q, loss
              KL   one pass: pass 1's statistics plus U = sum e^(a - m) (x - y - c0), rescaled
                           with the running max -> S_P = KL(P||Q) (S_Q likewise), loss
              stats[r] = (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q)
    backward  one pass: the wanted gradient(s) of row r from a, b and stats[r], times the incoming
              grad_rows[r] / T -> grad_p[r], grad_q[r] (masked-out rows: zeros, nothing read)

Why recompute the gradients in the backward rather than store them in the forward (bytes per
element of one [R, V] operand, bf16 = 2 bytes; the static model in benchmarks/static_model.py
counts the same from the compiled code):
    stored (the CUDA backend's, and this backend's before):
        fwd reads a, b twice (8), + a third pass (4) when a gradient needs the row sums (JS,
        KL's own side), writes each gradient (2); bwd reads and writes each gradient (4)
        -> JS / KL with both gradients 24 B, KL with a detached P 14 B
    recomputed: fwd reads a, b twice (8; KL once, 4); bwd reads a, b once (4) and writes each
        gradient (2) -> both gradients 16 B (KL 12), one gradient 14 B (KL 10)
against the minimal 8 / 6 B (SPEC §4). The backward needs no third pass (the row sums are in the
stats), nothing [R, V] lives between the forward and the backward but the logits themselves, and
the incoming gradient scales each row before its single rounding to the output dtype (fp16 needs
no fp32 staging of unscaled gradients). ``ref_index`` with a gradient for P: several Q rows share
one P row, so each P row's gradient is a sum over its copies, computed by one program per P row
looping over its copies (an on-device CSR built with argsort / scatter_add / cumsum - no atomics,
deterministic, no [R, V] temporary).

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

from modkern.constants import STATS_WIDTH, accumulation_dtype

# float64 logits run the PyTorch backend (modkern.ops.dispatch.SUPPORTED_DTYPES). The forward stores
# no gradient: the backward recomputes them from p, q and the row statistics
# (modkern.ops.divergence.api.STORES_GRADIENTS).

# Widest block of the vocabulary one program handles per loop iteration. Rows wider than this
# loop; tests lower it to exercise many iterations.
BLOCK_V_MAX = 4096
# The backward's programs cover this many blocks of a row each (rows split over programs).
BWD_BLOCKS_PER_PROGRAM = 4


# Compiled kernels take log2 through lg2.approx (libdevice fast_log2f); the interpreter (numpy) and
# triton builds without libdevice use tl.log2. See _fast_log2 for the accuracy argument.
_FAST_LOG = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") != "1" and _libdevice is not None and hasattr(_libdevice, "fast_log2f")
)
_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = tl.constexpr(1.0 / math.log(2.0))
# Start of the running max: finite, so x - m is never -inf - -inf (no guard per element).
_M_INIT = tl.constexpr(-3.4028234663852886e38)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


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
def _load_block(base, offs, scale):
    # A whole block inside the row: no mask.
    return tl.load(base + offs).to(tl.float32) * scale


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
def _online_lse_update(m, s, x, c):
    # Per-lane online log-sum-exp of c * x (c = log2(e) / T > 0, x the raw logits: the max of x
    # is the max of x / T) with ONE exp per element: 2^(-c |x - m|) rescales whichever of the
    # running sum (when x raises the max) and the new term (otherwise) sits below the max.
    # m starts finite (_M_INIT), so a -inf x gives 2^-inf = 0 and never -inf - -inf; a NaN x
    # makes the sum NaN.
    d = x - m
    e = tl.exp2(-tl.abs(d) * c)
    s = tl.where(d > 0, s * e + 1.0, s + e)
    return tl.maximum(m, x), s


@triton.jit
def _lse_finish(m, s, inv_t):
    # The row's log-sum-exp of a = x / T as (shift, log-sum): lse = shift + ls. Kept apart so
    # that log P = (a - shift) - ls: shift = max(x) / T is the same rounded product as the max
    # a, so a - shift is exact (Sterbenz) and ls is O(1) with full relative precision. Forming
    # shift + ls first (~20 for peaked logits) rounds at ulp(20) ~ 2e-6: the error that made the
    # kernels' fp32 gradients ~4x less accurate than float64 allows. A row that saw nothing
    # keeps ls = log(0) = -inf. (Once per row: the precise tl.exp / tl.log.)
    mx = tl.max(m, 0)
    return mx * inv_t, tl.log(tl.sum(s * tl.exp((m - mx) * inv_t), 0))


@triton.jit
def _online_kl_update(m, s, u, x, t, c, WITH_U: tl.constexpr):
    # _online_lse_update (the same expressions for m, s: the stats' log-sum-exps are the
    # two-pass ones - identical in the interpreter) plus, when WITH_U, the running
    # u = sum e^((x_i - m) / T) t_i with t = x - y - c0 from the raw logits (x - y is exact for
    # bf16 / fp16 logits), rescaled like s when x raises the max (two FMAs, three selects). A weight
    # e that underflows to 0 adds 0 (0 * inf: an entry with p = -inf, whatever q is) and drops
    # the history it rescales (an entry whose probability underflows is 0, as in the two-pass
    # P (log P - log Q)). A NaN t leaves u NaN; the row is NaN anyway through the other sum.
    d = x - m
    e = tl.exp2(-tl.abs(d) * c)
    up = d > 0
    s = tl.where(up, s * e + 1.0, s + e)
    if WITH_U:
        u = tl.where(e == 0, tl.where(up, t, u), tl.where(up, tl.fma(u, e, t), tl.fma(e, t, u)))
    return tl.maximum(m, x), s, u


@triton.jit
def _kl_finish(m, s, u, inv_t):
    # _lse_finish's (shift, logsum) - the same expression - and the row sums S = sum e^(a - shift)
    # and U = sum e^(a - shift) t (t = x - y - c0): E_P[a - b] = (U / S + c0) / T.
    mx = tl.max(m, 0)
    w = tl.exp((m - mx) * inv_t)
    big_s = tl.sum(s * w, 0)
    big_u = tl.sum(tl.where(w == 0, 0.0, u * w), 0)
    return mx * inv_t, tl.log(big_s), big_s, big_u


@triton.jit
def _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND: tl.constexpr):
    # log-probabilities, probabilities, and each side's term P (log P - x), where JS compares both
    # logs with log M = logaddexp(log P + log beta, log Q + log(1 - beta)) (c_p, c_q = log beta,
    # log(1 - beta)) and KL(P||Q) compares log P with log Q and vice versa.
    # 0 log 0 = 0; a NaN P (NaN logit) propagates, so a broken row is NaN, never a silent 0. JS:
    # log P - log M <= -log beta is never +inf, and it is -inf or NaN (-inf - -inf) only where
    # P == 0, so flooring it at -FLT_MAX (maximum returns the non-NaN operand) gives
    # 0 * -FLT_MAX = 0 there in one instruction. KL: log P - log Q is +inf where Q underflows to 0,
    # and P may be 0 there too: the explicit select.
    # JS forms log M before the probabilities: fewer values live at once (the one-read kernel
    # holds the terms of 32 columns per thread under a register cap).
    lp = (a - sh_a) - ls_a
    lq = (b - sh_b) - ls_b
    if KIND == 0:
        u = lp + c_p
        v = lq + c_q
        hi = tl.maximum(u, v)
        lm = hi + _fast_log2(1.0 + tl.exp2((tl.minimum(u, v) - hi) * _LOG2E)) * _LN2
        prob_p = tl.exp2(lp * _LOG2E)
        t_p = prob_p * tl.maximum(lp - lm, -_FLT_MAX)
        prob_q = tl.exp2(lq * _LOG2E)
        t_q = prob_q * tl.maximum(lq - lm, -_FLT_MAX)
    else:
        prob_p = tl.exp2(lp * _LOG2E)
        prob_q = tl.exp2(lq * _LOG2E)
        t_p = tl.where(prob_p == 0, 0.0, prob_p * (lp - lq))
        t_q = tl.where(prob_q == 0, 0.0, prob_q * (lq - lp))
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
def _row_span(row, ref_ptr, mask_ptr, V, HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr):
    # The P row compared with Q row ``row`` (ref_index, or the same row), whether the row counts,
    # and how many of its columns to read: V, or 0 for a masked-out row (its loops run no iteration).
    if HAS_REF:
        p_row = tl.load(ref_ptr + row).to(tl.int64)
    else:
        p_row = row
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    else:
        active = row >= 0
    return p_row, active, tl.where(active, V, 0)


@triton.jit
def _divergence_fwd_kernel(
    p_ptr,
    q_ptr,
    ref_ptr,
    mask_ptr,
    loss_ptr,
    stats_ptr,
    V,
    stride_p,
    stride_q,
    inv_t,
    beta,
    c_p,
    c_q,
    KIND: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Per row: the loss and the statistics the backward recomputes the gradients from,
    # stats[r] = (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q) (lse = shift + logsum).
    row = tl.program_id(0).to(tl.int64)
    # masked-out rows run none of the passes below: nothing read
    p_row, active, limit = _row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    lanes = tl.arange(0, BLOCK)

    # Whole blocks load unmasked (a masked load first fills its registers with the -inf default:
    # ~5 instructions per element pair); the last partial block, if any, is one masked step.
    full = (limit // BLOCK) * BLOCK
    c = inv_t * _LOG2E
    if KIND == 0:
        # JS: two passes. log M = log(beta P + (1 - beta) Q) needs both rows' log-sum-exps at
        # every element (not a sum of per-element terms that a running max can rescale).
        # pass 1: log-sum-exp of both rows (of the raw logits, scaled by 1/T inside).
        m_a = tl.full([BLOCK], _M_INIT, tl.float32)
        m_b = tl.full([BLOCK], _M_INIT, tl.float32)
        s_a = tl.zeros([BLOCK], tl.float32)
        s_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, full, BLOCK):
            offs = start + lanes
            m_a, s_a = _online_lse_update(m_a, s_a, _load_block(p_base, offs, 1.0), c)
            m_b, s_b = _online_lse_update(m_b, s_b, _load_block(q_base, offs, 1.0), c)
        if full < limit:
            offs = full + lanes
            m_a, s_a = _online_lse_update(m_a, s_a, _load_row(p_base, offs, limit, 1.0), c)
            m_b, s_b = _online_lse_update(m_b, s_b, _load_row(q_base, offs, limit, 1.0), c)
        sh_a, ls_a = _lse_finish(m_a, s_a, inv_t)
        sh_b, ls_b = _lse_finish(m_b, s_b, inv_t)

        # pass 2: S_P = sum P (logP - xp), S_Q = sum Q (logQ - xq).
        acc_p = tl.zeros([BLOCK], tl.float32)
        acc_q = tl.zeros([BLOCK], tl.float32)
        for start in range(0, full, BLOCK):
            offs = start + lanes
            a = _load_block(p_base, offs, inv_t)
            b = _load_block(q_base, offs, inv_t)
            _, _, t_p, t_q = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            acc_p += t_p
            acc_q += t_q
        if full < limit:
            offs = full + lanes
            a = _load_row(p_base, offs, limit, inv_t)
            b = _load_row(q_base, offs, limit, inv_t)
            _, _, t_p, t_q = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            acc_p += t_p
            acc_q += t_q
        s_p = tl.where(active, tl.sum(acc_p, 0), 0.0)
        s_q = tl.where(active, tl.sum(acc_q, 0), 0.0)
    else:
        # KL: one pass. Next to each row's online log-sum-exp, the running U_P = sum e^(a - m_a)
        # (x - y - c0) (U_Q likewise with y - x + c0): KL(P||Q) = E_P[a - b] - (lse_a - lse_b)
        #   = U_P / S_P / T - log(S_P / S_Q) + (c0 / T - (shift_a - shift_b)),
        # with S the sums whose logs are the stats' logsums. The logs' difference is taken as the
        # log of the ratio (one rounding at the size of the result, not two at ulp(log S) ~ 1e-6
        # for wide rows), so that near-identical rows (KL ~ 1e-6) keep their precision.
        m_a = tl.full([BLOCK], _M_INIT, tl.float32)
        m_b = tl.full([BLOCK], _M_INIT, tl.float32)
        s_a = tl.zeros([BLOCK], tl.float32)
        s_b = tl.zeros([BLOCK], tl.float32)
        u_a = tl.zeros([BLOCK], tl.float32)
        u_b = tl.zeros([BLOCK], tl.float32)
        # U sums x - y - c0 with c0 the mean of the finite x - y of the row's first block: a
        # common offset of the two rows' logits (which the lse difference absorbs) then cancels
        # before the weighting, not after it (an offset of 1 cost the symmetric loss ~3% at
        # KL ~ 2e-6). Any c0 gives the same sums in exact arithmetic. The first block (masked:
        # it may be the whole row) is peeled off the loop to find c0.
        offs = lanes
        x = _load_row(p_base, offs, limit, 1.0)
        y = _load_row(q_base, offs, limit, 1.0)
        d0 = x - y
        finite = tl.abs(d0) < float("inf")
        c0 = tl.sum(tl.where(finite, d0, 0.0), 0) / tl.maximum(tl.sum(finite.to(tl.float32), 0), 1.0)
        t = d0 - c0
        m_a, s_a, u_a = _online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
        m_b, s_b, u_b = _online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        for start in range(BLOCK, full, BLOCK):
            offs = start + lanes
            x = _load_block(p_base, offs, 1.0)
            y = _load_block(q_base, offs, 1.0)
            t = (x - y) - c0
            m_a, s_a, u_a = _online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
            m_b, s_b, u_b = _online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        if (full < limit) & (full > 0):
            offs = full + lanes
            x = _load_row(p_base, offs, limit, 1.0)
            y = _load_row(q_base, offs, limit, 1.0)
            t = (x - y) - c0
            m_a, s_a, u_a = _online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
            m_b, s_b, u_b = _online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        sh_a, ls_a, big_sa, big_ua = _kl_finish(m_a, s_a, u_a, inv_t)
        sh_b, ls_b, big_sb, big_ub = _kl_finish(m_b, s_b, u_b, inv_t)
        # Only the sums the kind's loss and gradients use (the backward reads S_P for
        # kl_forward / symmetric, S_Q for kl_reverse / symmetric); the other is stored as 0.
        if KIND != 2:
            s_p = (big_ua / big_sa * inv_t - tl.log(big_sa / big_sb)) + (c0 * inv_t - (sh_a - sh_b))
            s_p = tl.where(active, s_p, 0.0)
        else:
            s_p = tl.full([], 0.0, tl.float32)
        if KIND != 1:
            s_q = (big_ub / big_sb * inv_t - tl.log(big_sb / big_sa)) - (c0 * inv_t - (sh_a - sh_b))
            s_q = tl.where(active, s_q, 0.0)
        else:
            s_q = tl.full([], 0.0, tl.float32)
    if KIND == 0:
        loss = beta * s_p + (1.0 - beta) * s_q
    elif KIND == 1:
        loss = s_p
    elif KIND == 2:
        loss = s_q
    else:
        # S_P + S_Q = E_P[a - b] - E_Q[a - b]: the shifts, log-ratios and c0 cancel exactly here
        # (summed as computed, log(S_P / S_Q) + log(S_Q / S_P) left ~6e-8 of rounding).
        loss = tl.where(active, (big_ua / big_sa + big_ub / big_sb) * inv_t, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 6 + 0, sh_a)
    tl.store(stats_ptr + row * 6 + 1, ls_a)
    tl.store(stats_ptr + row * 6 + 2, sh_b)
    tl.store(stats_ptr + row * 6 + 3, ls_b)
    tl.store(stats_ptr + row * 6 + 4, s_p)
    tl.store(stats_ptr + row * 6 + 5, s_q)


@triton.jit
def _divergence_bwd_kernel(
    p_ptr,
    q_ptr,
    ref_ptr,
    mask_ptr,
    grad_rows_ptr,
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
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # The gradients of row r, times the incoming grad_rows[r], in one read of both logit rows:
    # log P, log Q from the forward's (shift, logsum), the row sums S_P, S_Q from its stats.
    # Program (r, c) covers columns [c * CHUNK, (c + 1) * CHUNK) - no element depends on another
    # here, so the rows split into many programs (no last-wave tail at a few thousand rows).
    # Masked-out rows read nothing and store zeros.
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * CHUNK
    p_row, active, limit = _row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    lanes = tl.arange(0, BLOCK)
    w = tl.load(grad_rows_ptr + row).to(tl.float32)
    sh_a = tl.load(stats_ptr + row * 6 + 0)
    ls_a = tl.load(stats_ptr + row * 6 + 1)
    sh_b = tl.load(stats_ptr + row * 6 + 2)
    ls_b = tl.load(stats_ptr + row * 6 + 3)
    s_p = tl.load(stats_ptr + row * 6 + 4)
    s_q = tl.load(stats_ptr + row * 6 + 5)
    w_t = w * inv_t
    if KIND == 0:
        own_a = beta * w_t
        own_b = (1.0 - beta) * w_t
    else:
        own_a = w_t
        own_b = w_t
    for start in range(c0, tl.minimum(c0 + CHUNK, limit), BLOCK):
        offs = start + lanes
        a = _load_row(p_base, offs, limit, inv_t)
        b = _load_row(q_base, offs, limit, inv_t)
        prob_p, prob_q, t_p, t_q = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
        if WRITE_GP:
            g = _grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            g = _grad_b(prob_p, prob_q, t_q, s_q, own_b, w_t, KIND)
            tl.store(gq_ptr + row * stride_gq + offs, g.to(gq_ptr.dtype.element_ty), mask=offs < V)
    zeros = tl.zeros([BLOCK], tl.float32)
    for start in range(c0, tl.minimum(c0 + CHUNK, V - limit), BLOCK):  # masked-out rows only
        offs = start + lanes
        if WRITE_GP:
            tl.store(gp_ptr + row * stride_gp + offs, zeros.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            tl.store(gq_ptr + row * stride_gq + offs, zeros.to(gq_ptr.dtype.element_ty), mask=offs < V)


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
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        a = _load_row(p_base, offs, V, inv_t)  # once per chunk, shared by all copies
        acc = tl.zeros([BLOCK], tl.float32)
        for j in range(first, first + count):
            r = tl.load(order_ptr + j).to(tl.int64)
            if HAS_MASK:
                active = tl.load(mask_ptr + r) != 0
            else:
                active = r >= 0
            b = _load_row(q_ptr + r * stride_q, offs, tl.where(active, V, 0), inv_t)
            sh_a = tl.load(stats_ptr + r * 6 + 0)
            ls_a = tl.load(stats_ptr + r * 6 + 1)
            sh_b = tl.load(stats_ptr + r * 6 + 2)
            ls_b = tl.load(stats_ptr + r * 6 + 3)
            s_p = tl.load(stats_ptr + r * 6 + 4)
            w_t = tl.load(grad_rows_ptr + r).to(tl.float32) * inv_t
            if KIND == 0:
                own_a = beta * w_t
            else:
                own_a = w_t
            prob_p, prob_q, t_p, _ = _row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            g = _grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            acc += tl.where(active, g, 0.0)
        tl.store(gp_ptr + n * stride_gp + offs, acc.to(gp_ptr.dtype.element_ty), mask=offs < V)


# ------------------------------------------------------------------------------------------------
# One read: the forward that also writes the gradients (``grad_mode="forward"``)
#
# The recomputing pair above reads every logit twice per training step (forward, then backward):
# 8 + 2 per gradient bytes per bf16 element pair against SPEC §4's 4 + 2. Here one pass writes the
# loss and the gradients of the reduced loss (times ``weight``: 1 for "sum", 1 / count for
# "mean"); the backward only multiplies them by the incoming scalar, in place, and skips even
# that on the device when it is 1 (``_scale_inplace_kernel``).
#
# A row of V = 152064 does not fit one program, and its gradients need the row's log-sum-exps
# (and, for JS and KL's own side, the row sums S = sum P (log P - x)) before any element can be
# written. So row r is split over NCHUNK programs, program (r, j) holding tile j of both rows from
# its single load to its stores, and the programs of a row exchange per-tile partials through
# global memory:
#
#   round 1   tile max and sum of 2^(c (x - max)) of both rows -> the row's (shift, logsum)
#   round 2   (only when a wanted gradient reads S) the tile sums of P (log P - x) -> S_P, S_Q
#
# What limits this design is residency, not bytes (benchmarks/static_model.py): an SM streams
# only as many tiles as its registers hold, each held for its load latency plus the exchange
# rounds. So a program holds its tiles raw, in the logits' dtype (a bf16 tile in half the
# registers of an fp32 copy), and converts them again after each round - re-deriving P, Q and the
# terms costs MUFU and instruction issue, which have room, where holding them would cost
# registers, which have none - and one round costs one L2 round trip: each partial is a
# self-validating 64-bit word (two fp32 values, never all-zero bits: a (max, sum) pair has a
# non-zero max or a sum >= 1, and a zero row-sum partial is published as -0.0), written with one
# relaxed atomic exchange into zeroed scratch and polled with relaxed atomic reads of the row's
# words - no flag, no release fence, no second load of the values.
#
# A partner whose words are still 0 after SPIN_POLLS polls is not waited for: the program loads
# that tile and computes the partner's partial itself with the same jit function over the same
# tile, so the result does not depend on which program computed a partial. Nothing relies on
# co-residency or launch order: no deadlock is possible, and under the interpreter (programs run
# one after another, SPIN_POLLS = 0) every program computes its later partners' partials itself -
# the tests exercise both ways. Program ids run tile-fastest, so a row's programs are adjacent in
# launch order and, on a GPU, resident together: the fallback loads are the exception (the static
# model assumes none).
#
# The per-tile loss partials go to ``partials`` [R * NCHUNK, 2] (P's and Q's side) and the row
# losses are their sums (a [R, NCHUNK] torch reduction). Masked-out rows read nothing, write zero
# gradients, zero partials, and exchange nothing.

FUSED_BLOCK = 4096  # columns of a row per program (the tile it holds), halved for fp32
# 32 columns per thread (4 warps for a bf16 tile): the per-program work (the tile reductions, the
# exchange, combining the row's partials) spread over more columns than at 16 per thread, for ~60%
# more registers per thread - the same per column.
FUSED_COLUMNS_PER_THREAD = 32
# Register cap so that 3 programs of 4 warps share an SM (sm_90: 168 x 128 x 3 <= 65536): JS with
# both gradients holds 4 values per column across round 2 and compiles to 168 registers without
# spills (benchmarks/static_model.py); uncapped, ptxas takes ~180 and fits only 2 programs.
FUSED_MAXNREG = 168
# Polls of the partners' words before computing a missing partial from memory (0 in the
# interpreter, where a later program cannot run while an earlier one waits).
SPIN_POLLS = 0 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 4096
# Set only by benchmarks/static_model.py, which compiles the kernel a second time without the
# fallback branch to count the instructions of the path every program takes. A kernel launched
# with it would use a missing partial as 0: never set it elsewhere.
_STATIC_MODEL_COMMON_PATH = False


@triton.jit
def _load_raw(base, offs, V):
    # One tile of raw logits in their own dtype (what a program holds across the exchanges);
    # columns at or past V read -inf (probability exactly 0).
    return tl.load(base + offs, mask=offs < V, other=float("-inf"))


@triton.jit
def _tile_lse(xr, c):
    # Round 1 of one raw tile: its max of the logits (floored at _M_INIT, so that an all -inf tile
    # gives 2^-inf = 0 and not NaN) and the sum of 2^(c (x - max)), c = log2(e) / T.
    x = xr.to(tl.float32)
    mx = tl.maximum(tl.max(x, 0), _M_INIT)
    return mx, tl.sum(tl.exp2((x - mx) * c), 0)


@triton.jit
def _tile_terms(xr, yr, sh_a, ls_a, sh_b, ls_b, inv_t, c_p, c_q, KIND: tl.constexpr):
    # _row_terms of one raw tile pair: a = x / T, log P = (a - shift) - logsum with shift = the
    # row's max(x) / T, as in the two-pass kernels.
    return _row_terms(xr.to(tl.float32) * inv_t, yr.to(tl.float32) * inv_t, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)


@triton.jit
def _word(hi, lo):
    # Two fp32 values as one int64 (hi's bits above lo's), published with one 64-bit atomic.
    h = hi.to(tl.uint32, bitcast=True).to(tl.int64)
    lo_bits = lo.to(tl.uint32, bitcast=True).to(tl.int64)
    return (h << 32) | lo_bits


@triton.jit
def _unword(w):
    # _word's inverse: (hi, lo) as fp32.
    hi = (w >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = (w & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _nonzero_bits(v):
    # v with +0.0 published as -0.0: the same value in every sum, but a word with a set bit.
    return tl.where(v == 0.0, -tl.abs(v), v)


@triton.jit
def _poll(ptrs, polled, is_own, mine):
    # One poll of the [NCHUNK_P2, WIDTH] words: relaxed atomic reads of the partners', this
    # program's own as it published them.
    return tl.where(is_own[:, None], mine, tl.atomic_add(ptrs, 0, mask=polled[:, None], sem="relaxed"))


@triton.jit
def _await_words(
    words_ptr, first, own, own0, own1, WIDTH: tl.constexpr, NCHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, SPIN
):
    # The WIDTH (1 or 2) words of each of the row's NCHUNK programs (first = the row's first
    # program id), polled with relaxed atomic reads up to SPIN times while one is 0 (unpublished).
    # All the words of a poll are one [NCHUNK_P2, WIDTH] atomic, so their L2 round trips overlap.
    # The program's own words (own = its chunk index; own0, own1 = the words it published) are
    # taken as they are, not polled: its own exchange may still be on its way to L2. Returns
    # (chunk index vector, which programs' words are all published, the words of column 0 and of
    # column WIDTH - 1).
    idx = tl.arange(0, NCHUNK_P2)
    valid = idx < NCHUNK
    polled = valid & (idx != own)
    col = tl.arange(0, WIDTH)[None, :]
    ptrs = words_ptr + (first + idx)[:, None] * WIDTH + col
    mine = tl.where(col == 0, own0, own1)
    w = _poll(ptrs, polled, idx == own, mine)
    polls = 0
    while (tl.sum(tl.sum(tl.where(polled[:, None] & (w == 0), 1, 0), 1), 0) > 0) & (polls < SPIN):
        w = _poll(ptrs, polled, idx == own, mine)
        polls += 1
    have = valid & (tl.min(tl.where(w != 0, 1, 0), 1) > 0)
    if WIDTH == 2:
        w0, w1 = tl.split(w)
    else:
        w0 = tl.sum(w, 1)
        w1 = w0
    return idx, have, w0, w1


@triton.jit
def _any_missing(idx, have, NCHUNK: tl.constexpr):
    # Whether one of the row's NCHUNK partials is not in ``have``.
    return tl.sum(tl.where(have | (idx >= NCHUNK), 0, 1), 0) > 0


@triton.jit
def _model_keeps_the_check(part_ptr, pid):
    # The fallback's stand-in in the variant the static model compiles (FALLBACK=False, never
    # launched): a side effect so that the "is a partial missing" check every program runs stays in
    # the counted code.
    tl.store(part_ptr + pid * 2, float("nan"))


@triton.jit
def _divergence_fused_kernel(
    p_ptr,
    q_ptr,
    ref_ptr,
    mask_ptr,
    weight_ptr,
    gp_ptr,
    gq_ptr,
    lse_words_ptr,
    sum_words_ptr,
    part_ptr,
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
    NEED_S: tl.constexpr,
    NCHUNK: tl.constexpr,
    NCHUNK_P2: tl.constexpr,
    SPIN,
    BLOCK: tl.constexpr,
    FALLBACK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NCHUNK
    first = row * NCHUNK
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    p_row, active, limit = _row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    c = inv_t * _LOG2E
    if active:
        xr = _load_raw(p_base, offs, V)
        yr = _load_raw(q_base, offs, V)
        mx, sx = _tile_lse(xr, c)
        my, sy = _tile_lse(yr, c)
        # round 1: the row's log-sum-exps
        if NCHUNK > 1:
            word_x = _word(mx, sx)
            word_y = _word(my, sy)
            tl.atomic_xchg(lse_words_ptr + pid * 2, word_x, sem="relaxed")
            tl.atomic_xchg(lse_words_ptr + pid * 2 + 1, word_y, sem="relaxed")
            idx, have, wx, wy = _await_words(
                lse_words_ptr, first, pid - first, word_x, word_y, 2, NCHUNK, NCHUNK_P2, SPIN
            )
            mxs, sxs = _unword(wx)
            mys, sys = _unword(wy)
            if _any_missing(idx, have, NCHUNK):  # the fallback (on a GPU, the exception)
                if FALLBACK:
                    for i in range(NCHUNK):
                        if _any_missing(idx, have | (idx != i), NCHUNK):
                            o = i * BLOCK + tl.arange(0, BLOCK)
                            mxi, sxi = _tile_lse(_load_raw(p_base, o, V), c)
                            myi, syi = _tile_lse(_load_raw(q_base, o, V), c)
                            mxs = tl.where(idx == i, mxi, mxs)
                            sxs = tl.where(idx == i, sxi, sxs)
                            mys = tl.where(idx == i, myi, mys)
                            sys = tl.where(idx == i, syi, sys)
                else:
                    _model_keeps_the_check(part_ptr, pid)
            valid = idx < NCHUNK
            big_mx = tl.max(tl.where(valid, mxs, _M_INIT), 0)
            big_my = tl.max(tl.where(valid, mys, _M_INIT), 0)
            ls_a = tl.log(tl.sum(tl.where(valid, sxs * tl.exp((mxs - big_mx) * inv_t), 0.0), 0))
            ls_b = tl.log(tl.sum(tl.where(valid, sys * tl.exp((mys - big_my) * inv_t), 0.0), 0))
        else:
            big_mx = mx
            big_my = my
            ls_a = tl.log(sx)
            ls_b = tl.log(sy)
        sh_a = big_mx * inv_t
        sh_b = big_my * inv_t
        prob_p, prob_q, t_p, t_q = _tile_terms(xr, yr, sh_a, ls_a, sh_b, ls_b, inv_t, c_p, c_q, KIND)
        # the loss reads S_P (JS, KL(P||Q), symmetric) and S_Q (JS, KL(Q||P), symmetric): an unread
        # side's terms are never formed
        part_p = tl.sum(t_p, 0) if KIND != 2 else 0.0
        part_q = tl.sum(t_q, 0) if KIND != 1 else 0.0
        tl.store(part_ptr + pid * 2 + 0, part_p)
        tl.store(part_ptr + pid * 2 + 1, part_q)
        # round 2: the row sums S_P, S_Q, when a wanted gradient reads them
        s_p = part_p
        s_q = part_q
        if NEED_S and NCHUNK > 1:
            word_s = _word(_nonzero_bits(part_p), _nonzero_bits(part_q))
            tl.atomic_xchg(sum_words_ptr + pid, word_s, sem="relaxed")
            idx, have, ws, ws_ = _await_words(
                sum_words_ptr, first, pid - first, word_s, word_s, 1, NCHUNK, NCHUNK_P2, SPIN
            )
            sps, sqs = _unword(ws)
            if _any_missing(idx, have, NCHUNK):
                if FALLBACK:
                    for i in range(NCHUNK):
                        if _any_missing(idx, have | (idx != i), NCHUNK):
                            o = i * BLOCK + tl.arange(0, BLOCK)
                            xi = _load_raw(p_base, o, V)
                            yi = _load_raw(q_base, o, V)
                            _, _, tpi, tqi = _tile_terms(xi, yi, sh_a, ls_a, sh_b, ls_b, inv_t, c_p, c_q, KIND)
                            sps = tl.where(idx == i, tl.sum(tpi, 0), sps)
                            sqs = tl.where(idx == i, tl.sum(tqi, 0), sqs)
                    # this program's own terms again, from its tile reloaded (an L2 hit): on this
                    # path they are not held across the partners' terms, which would double the
                    # registers the kernel needs everywhere
                    xr = _load_raw(p_base, offs, V)
                    yr = _load_raw(q_base, offs, V)
                    prob_p, prob_q, t_p, t_q = _tile_terms(xr, yr, sh_a, ls_a, sh_b, ls_b, inv_t, c_p, c_q, KIND)
                else:
                    _model_keeps_the_check(part_ptr, pid)
            s_p = tl.sum(tl.where(idx < NCHUNK, sps, 0.0), 0)
            s_q = tl.sum(tl.where(idx < NCHUNK, sqs, 0.0), 0)
        w_t = tl.load(weight_ptr).to(tl.float32) * inv_t
        if KIND == 0:
            own_a = beta * w_t
            own_b = (1.0 - beta) * w_t
        else:
            own_a = w_t
            own_b = w_t
        if WRITE_GP:
            g = _grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            g = _grad_b(prob_p, prob_q, t_q, s_q, own_b, w_t, KIND)
            tl.store(gq_ptr + row * stride_gq + offs, g.to(gq_ptr.dtype.element_ty), mask=offs < V)
    else:
        tl.store(part_ptr + pid * 2 + 0, 0.0)
        tl.store(part_ptr + pid * 2 + 1, 0.0)
        zeros = tl.zeros([BLOCK], tl.float32)
        if WRITE_GP:
            tl.store(gp_ptr + row * stride_gp + offs, zeros.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            tl.store(gq_ptr + row * stride_gq + offs, zeros.to(gq_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _scale_inplace_kernel(g_ptr, x_ptr, n, BLOCK: tl.constexpr):
    # x *= g for the gradients the one-read forward stored; nothing read or written when g == 1
    # (the common loss.backward() of the reduced loss), decided on the device: no host sync.
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=offs < n)


def _mix_coefs(beta: float):
    # c_p, c_q of _row_terms
    return math.log(beta), math.log1p(-beta)


def _row_args(p, q, ref_index, mask, spec) -> dict:
    """The keyword arguments every divergence kernel takes: both logits, the optional row maps
    (an unused pointer stands in for an absent one), the vocabulary, the strides and the spec."""
    c_p, c_q = _mix_coefs(spec.beta)
    return dict(
        p_ptr=p,
        q_ptr=q,
        ref_ptr=ref_index if ref_index is not None else q,
        mask_ptr=mask if mask is not None else q,
        V=q.shape[1],
        stride_p=p.stride(0),
        stride_q=q.stride(0),
        inv_t=float(spec.inv_temperature),
        beta=float(spec.beta),
        c_p=c_p,
        c_q=c_q,
        KIND=spec.kind_id,
        HAS_REF=ref_index is not None,
        HAS_MASK=mask is not None,
    )


def _grad_args(grad_p, grad_q, write_gp: bool, write_gq: bool, q) -> dict:
    """The gradient outputs of the kernels that write them (``q`` stands in for one not written)."""
    return dict(
        gp_ptr=grad_p if write_gp else q,
        gq_ptr=grad_q if write_gq else q,
        stride_gp=grad_p.stride(0) if write_gp else 0,
        stride_gq=grad_q.stride(0) if write_gq else 0,
        WRITE_GP=write_gp,
        WRITE_GQ=write_gq,
    )


def forward(p, q, ref_index, mask, spec):
    """``spec``: a ``modkern.ops.divergence.DivergenceSpec`` (kind, beta, 1/T, which gradients).

    Returns (loss [R], stats [R, 6], [0], [0]): this backend stores no gradient (STORES_GRADIENTS)."""
    rows, vocab = q.shape
    acc = accumulation_dtype(p)
    loss = torch.empty(rows, dtype=acc, device=q.device)
    stats = torch.empty(rows, STATS_WIDTH, dtype=acc, device=q.device)
    if rows == 0:
        return loss, stats, p.new_empty(0), q.new_empty(0)
    block = _block_v(vocab)
    _divergence_fwd_kernel[(rows,)](
        **_row_args(p, q, ref_index, mask, spec),
        loss_ptr=loss,
        stats_ptr=stats,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return loss, stats, p.new_empty(0), q.new_empty(0)


def _copies_by_reference(ref_index, num_p_rows):
    """On-device CSR of the copies of each P row: (order, start, count). No host sync."""
    order = torch.argsort(ref_index, stable=True)
    count = torch.zeros(num_p_rows, dtype=torch.int64, device=ref_index.device)
    count.scatter_add_(0, ref_index, torch.ones_like(ref_index))
    start = torch.cumsum(count, 0) - count
    return order, start, count


def backward(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec):
    """Recomputes the wanted gradients from p, q and the forward's stats, times ``grad_rows``."""
    rows, vocab = q.shape
    write_gp = spec.need_grad_p and ref_index is None
    write_gq = spec.need_grad_q
    grad_p = torch.empty_like(p) if spec.need_grad_p else p.new_empty(0)
    grad_q = torch.empty_like(q) if write_gq else q.new_empty(0)
    block = _block_v(vocab)
    c_p, c_q = _mix_coefs(spec.beta)
    grad_rows = grad_rows.to(stats.dtype).contiguous()
    if rows > 0 and (write_gp or write_gq):
        chunk = block * BWD_BLOCKS_PER_PROGRAM
        _divergence_bwd_kernel[(rows, triton.cdiv(vocab, chunk))](
            **_row_args(p, q, ref_index, mask, spec),
            **_grad_args(grad_p, grad_q, write_gp, write_gq, q),
            grad_rows_ptr=grad_rows,
            stats_ptr=stats,
            BLOCK=block,
            CHUNK=chunk,
            num_warps=_num_warps(block),
        )
    if spec.need_grad_p and ref_index is not None and p.shape[0] > 0:
        order, start, count = _copies_by_reference(ref_index, p.shape[0])
        _divergence_grad_p_shared_kernel[(p.shape[0],)](
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
            float(spec.inv_temperature),
            float(spec.beta),
            c_p,
            c_q,
            KIND=spec.kind_id,
            HAS_MASK=mask is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return grad_p, grad_q


def _fused_block(vocab: int, element_size: int) -> int:
    # Columns per program of the one-read kernel: FUSED_BLOCK, halved for fp32 tiles (twice the
    # registers of bf16 ones), fewer for a narrower row.
    return max(16, min(triton.next_power_of_2(vocab), FUSED_BLOCK // (2 if element_size == 4 else 1)))


def _fused_launch(block: int, element_size: int) -> dict:
    # num_warps (and the register cap) of the one-read kernel for a tile of ``block`` columns: fp32
    # tiles hold half the columns per thread (twice the registers per column).
    columns = FUSED_COLUMNS_PER_THREAD // (2 if element_size == 4 else 1)
    options = {"num_warps": max(1, min(8, block // (32 * columns)))}
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        options["maxnreg"] = FUSED_MAXNREG
    return options


def forward_with_grads(p, q, ref_index, mask, weight, spec):
    """One read of the logits: per-row losses and the gradients of ``weight * sum(losses)``.

    ``weight``: 0-dim fp32 tensor on the logits' device. Returns (loss_rows [R] fp32, grad_p
    [N, V] or [0], grad_q [R, V] or [0]) in the logits' dtype. A P gradient with ``ref_index``
    (several Q rows sharing a P row) is not handled here (the caller routes it to the recomputing
    backward)."""
    if spec.need_grad_p and ref_index is not None:
        raise ValueError("forward_with_grads: a P gradient with ref_index needs the recomputing backward")
    rows, vocab = q.shape
    write_gp, write_gq = spec.need_grad_p, spec.need_grad_q
    grad_p = torch.empty_like(p) if write_gp else p.new_empty(0)
    grad_q = torch.empty_like(q) if write_gq else q.new_empty(0)
    acc = accumulation_dtype(p)
    if rows == 0:
        return torch.zeros(0, dtype=acc, device=q.device), grad_p, grad_q
    block = _fused_block(vocab, p.element_size())
    nchunk = triton.cdiv(vocab, block)
    programs = rows * nchunk
    need_s = spec.grads_read_row_sums
    partials = torch.empty(programs, 2, dtype=acc, device=q.device)
    # zeroed scratch: the round-1 words (2 per program), then the round-2 words (1 per program);
    # a one-tile row exchanges nothing and its pointers go unread
    n_words = (2 + int(need_s)) * programs if nchunk > 1 else 1
    words = torch.zeros(n_words, dtype=torch.int64, device=q.device)
    _divergence_fused_kernel[(programs,)](
        **_row_args(p, q, ref_index, mask, spec),
        **_grad_args(grad_p, grad_q, write_gp, write_gq, q),
        weight_ptr=weight,
        lse_words_ptr=words,
        sum_words_ptr=words[2 * programs :] if need_s and nchunk > 1 else words,
        part_ptr=partials,
        NEED_S=need_s,
        NCHUNK=nchunk,
        NCHUNK_P2=triton.next_power_of_2(nchunk),
        SPIN=SPIN_POLLS,
        BLOCK=block,
        FALLBACK=not _STATIC_MODEL_COMMON_PATH,
        **_fused_launch(block, p.element_size()),
    )
    side = partials.view(rows, nchunk, 2).sum(1)
    return spec.row_loss(side[:, 0], side[:, 1]), grad_p, grad_q


SCALE_BLOCK = 4096


def scale_(grad_scale, *tensors):
    """``t *= grad_scale`` for each tensor, in place; nothing moves when ``grad_scale == 1``
    (decided on the device). ``grad_scale``: a 1-element tensor on the tensors' device."""
    g = grad_scale.reshape(1).to(torch.float32)
    for t in tensors:
        if t.numel():
            _scale_inplace_kernel[(triton.cdiv(t.numel(), SCALE_BLOCK),)](
                g, t, t.numel(), BLOCK=SCALE_BLOCK, num_warps=8
            )
