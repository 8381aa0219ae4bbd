"""What both Triton designs of the divergence family share.

The per-row math as ``@triton.jit`` helpers (online log-sum-exp, the KL accumulation, the
per-element terms and gradients of each kind, the row span of a compared row) and the arguments
every divergence kernel takes. ``divergence.py`` (two passes: a forward, then a backward that
recomputes the gradients) and ``divergence_one_read.py`` (one read that also writes the gradients,
``grad_mode="forward"``) build their kernels from these. Notation: per compared row r,
``a = p[ref[r]] / T``, ``b = q[r] / T``; c = log2(e) / T where a helper works in base 2.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

try:  # the fast log2 (PTX lg2.approx) of the compiled kernels; the interpreter has no libdevice
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - depends on the triton build
    _libdevice = None


# Compiled kernels take log2 through lg2.approx (libdevice fast_log2f); the interpreter (numpy) and
# triton builds without libdevice use tl.log2. See fast_log2 for the accuracy argument.
FAST_LOG = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") != "1" and _libdevice is not None and hasattr(_libdevice, "fast_log2f")
)
LN2 = tl.constexpr(math.log(2.0))
LOG2E = tl.constexpr(1.0 / math.log(2.0))
# Start of the running max: finite, so x - m is never -inf - -inf (no guard per element).
M_INIT = tl.constexpr(-3.4028234663852886e38)
FLT_MAX = tl.constexpr(3.4028234663852886e38)

# exp / log go through exp2 / log2 (one MUFU op each: ex2.approx.ftz, lg2.approx.ftz); tl.exp is
# ex2.approx without ftz, which adds a denormal fix-up of ~3 instructions per call (a probability
# below 2^-126 flushes to 0: 0 log 0 = 0). The logits stay in natural units, a = logit / T, as in
# the torch backend (exact for T = 1 or 0.5): scaling them by log2(e) rounded every element, and
# JS's log P - log M - S_P (|log P - log M| <= log(1/beta)) lost ~6x precision to it.


@triton.jit
def load_row(base, offs, limit, scale):
    # Lanes at or past ``limit`` read -inf (probability exactly 0). ``limit`` is V for an active
    # row; masked-out rows run none of the loops. ``scale`` = 1 / T.
    x = tl.load(base + offs, mask=offs < limit, other=float("-inf"))
    return x.to(tl.float32) * scale


@triton.jit
def load_block(base, offs, scale):
    # A whole block inside the row: no mask.
    return tl.load(base + offs).to(tl.float32) * scale


@triton.jit
def fast_log2(x):
    # log2 x for the per-element log M's log(1 + e), e in [0, 1]: x in [1, 2].
    # Compiled: lg2.approx.ftz.f32, one MUFU op (the precise logf was ~60 instructions), absolute
    # error ~2^-22 in log2 on [1, 2] (PTX ISA). With e from ex2.approx (relative error ~2^-22),
    # log M carries < 4e-7 absolute error, below the ~1e-6 that the fp32 rounding of the logits
    # puts into log P near the top entries. (log M = log(beta P + (1 - beta) Q) from P and Q would
    # save a MUFU op, but P = exp(log P) carries |log P| x 2^-24 relative error from rounding
    # log P * log2(e): JS's gradients, whose log P - log M - S_P cancels, came out ~10x less
    # accurate.) tests/test_divergence.py holds every
    # backend's fp32 gradients within 1.5e-4 relative L2 error of float64 on peaked rows.
    if FAST_LOG:
        return _libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def online_lse_update(m, s, x, c):
    # Per-lane online log-sum-exp of c * x (c = log2(e) / T > 0, x the raw logits: the max of x
    # is the max of x / T) with ONE exp per element: 2^(-c |x - m|) rescales whichever of the
    # running sum (when x raises the max) and the new term (otherwise) sits below the max.
    # m starts finite (M_INIT), so a -inf x gives 2^-inf = 0 and never -inf - -inf; a NaN x
    # makes the sum NaN.
    d = x - m
    e = tl.exp2(-tl.abs(d) * c)
    s = tl.where(d > 0, s * e + 1.0, s + e)
    return tl.maximum(m, x), s


@triton.jit
def lse_finish(m, s, inv_t):
    # The row's log-sum-exp of a = x / T as (shift, log-sum): lse = shift + ls. Kept apart so
    # that log P = (a - shift) - ls: shift = max(x) / T is the same rounded product as the max
    # a, so a - shift is exact (Sterbenz) and ls is O(1) with full relative precision. Forming
    # shift + ls first (~20 for peaked logits) rounds at ulp(20) ~ 2e-6: the error that made the
    # kernels' fp32 gradients ~4x less accurate than float64 allows. A row that saw nothing
    # keeps ls = log(0) = -inf. (Once per row: the precise tl.exp / tl.log.)
    mx = tl.max(m, 0)
    return mx * inv_t, tl.log(tl.sum(s * tl.exp((m - mx) * inv_t), 0))


@triton.jit
def online_kl_update(m, s, u, x, t, c, WITH_U: tl.constexpr):
    # online_lse_update (the same expressions for m, s: the stats' log-sum-exps are the
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
def kl_finish(m, s, u, inv_t):
    # lse_finish's (shift, logsum) - the same expression - and the row sums S = sum e^(a - shift)
    # and U = sum e^(a - shift) t (t = x - y - c0): E_P[a - b] = (U / S + c0) / T.
    mx = tl.max(m, 0)
    w = tl.exp((m - mx) * inv_t)
    big_s = tl.sum(s * w, 0)
    big_u = tl.sum(tl.where(w == 0, 0.0, u * w), 0)
    return mx * inv_t, tl.log(big_s), big_s, big_u


@triton.jit
def row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND: tl.constexpr):
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
        lm = hi + fast_log2(1.0 + tl.exp2((tl.minimum(u, v) - hi) * LOG2E)) * LN2
        prob_p = tl.exp2(lp * LOG2E)
        t_p = prob_p * tl.maximum(lp - lm, -FLT_MAX)
        prob_q = tl.exp2(lq * LOG2E)
        t_q = prob_q * tl.maximum(lq - lm, -FLT_MAX)
    else:
        prob_p = tl.exp2(lp * LOG2E)
        prob_q = tl.exp2(lq * LOG2E)
        t_p = tl.where(prob_p == 0, 0.0, prob_p * (lp - lq))
        t_q = tl.where(prob_q == 0, 0.0, prob_q * (lq - lp))
    return prob_p, prob_q, t_p, t_q


@triton.jit
def grad_a(prob_p, prob_q, t_p, s_p, own_scale, inv_t, KIND: tl.constexpr):
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
def grad_b(prob_p, prob_q, t_q, s_q, own_scale, inv_t, KIND: tl.constexpr):
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
def row_span(row, ref_ptr, mask_ptr, V, HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr):
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


def mix_coefs(beta: float):
    # c_p, c_q of row_terms
    return math.log(beta), math.log1p(-beta)


def row_args(p, q, ref_index, mask, spec) -> dict:
    """The keyword arguments every divergence kernel takes: both logits, the optional row maps
    (an unused pointer stands in for an absent one), the vocabulary, the strides and the spec."""
    c_p, c_q = mix_coefs(spec.beta)
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


def grad_args(grad_p, grad_q, write_gp: bool, write_gq: bool, q) -> dict:
    """The gradient outputs of the kernels that write them (``q`` stands in for one not written)."""
    return dict(
        gp_ptr=grad_p if write_gp else q,
        gq_ptr=grad_q if write_gq else q,
        stride_gp=grad_p.stride(0) if write_gp else 0,
        stride_gq=grad_q.stride(0) if write_gq else 0,
        WRITE_GP=write_gp,
        WRITE_GQ=write_gq,
    )
