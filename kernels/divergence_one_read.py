"""The one-read Triton design of the divergence family (``grad_mode="forward"``).

One pass over the logits writes the per-row losses and the gradients of ``weight * sum(losses)``;
the backward only scales them (``scale_``). The design, its exchange protocol and why it is
residency-bound are in the comment below; the shared row math is ``divergence_common.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from modkern.constants import accumulation_dtype

from .divergence_common import (
    LOG2E,
    M_INIT,
    grad_a,
    grad_args,
    grad_b,
    row_args,
    row_span,
    row_terms,
)

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
STATIC_MODEL_COMMON_PATH = False


@triton.jit
def _load_raw(base, offs, V):
    # One tile of raw logits in their own dtype (what a program holds across the exchanges);
    # columns at or past V read -inf (probability exactly 0).
    return tl.load(base + offs, mask=offs < V, other=float("-inf"))


@triton.jit
def _tile_lse(xr, c):
    # Round 1 of one raw tile: its max of the logits (floored at M_INIT, so that an all -inf tile
    # gives 2^-inf = 0 and not NaN) and the sum of 2^(c (x - max)), c = log2(e) / T.
    x = xr.to(tl.float32)
    mx = tl.maximum(tl.max(x, 0), M_INIT)
    return mx, tl.sum(tl.exp2((x - mx) * c), 0)


@triton.jit
def _tile_terms(xr, yr, sh_a, ls_a, sh_b, ls_b, inv_t, c_p, c_q, KIND: tl.constexpr):
    # row_terms of one raw tile pair: a = x / T, log P = (a - shift) - logsum with shift = the
    # row's max(x) / T, as in the two-pass kernels.
    return row_terms(xr.to(tl.float32) * inv_t, yr.to(tl.float32) * inv_t, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)


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
    p_row, active, limit = row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    c = inv_t * LOG2E
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
            big_mx = tl.max(tl.where(valid, mxs, M_INIT), 0)
            big_my = tl.max(tl.where(valid, mys, M_INIT), 0)
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
            g = grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            g = grad_b(prob_p, prob_q, t_q, s_q, own_b, w_t, KIND)
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


def fused_block(vocab: int, element_size: int) -> int:
    # Columns per program of the one-read kernel: FUSED_BLOCK, halved for fp32 tiles (twice the
    # registers of bf16 ones), fewer for a narrower row.
    return max(16, min(triton.next_power_of_2(vocab), FUSED_BLOCK // (2 if element_size == 4 else 1)))


def fused_launch(block: int, element_size: int) -> dict:
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
    block = fused_block(vocab, p.element_size())
    nchunk = triton.cdiv(vocab, block)
    programs = rows * nchunk
    need_s = spec.grads_read_row_sums
    partials = torch.empty(programs, 2, dtype=acc, device=q.device)
    # zeroed scratch: the round-1 words (2 per program), then the round-2 words (1 per program);
    # a one-tile row exchanges nothing and its pointers go unread
    n_words = (2 + int(need_s)) * programs if nchunk > 1 else 1
    words = torch.zeros(n_words, dtype=torch.int64, device=q.device)
    _divergence_fused_kernel[(programs,)](
        **row_args(p, q, ref_index, mask, spec),
        **grad_args(grad_p, grad_q, write_gp, write_gq, q),
        weight_ptr=weight,
        lse_words_ptr=words,
        sum_words_ptr=words[2 * programs :] if need_s and nchunk > 1 else words,
        part_ptr=partials,
        NEED_S=need_s,
        NCHUNK=nchunk,
        NCHUNK_P2=triton.next_power_of_2(nchunk),
        SPIN=SPIN_POLLS,
        BLOCK=block,
        FALLBACK=not STATIC_MODEL_COMMON_PATH,
        **fused_launch(block, p.element_size()),
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
