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

This module is the backend that ``modkern.ops.dispatch`` loads for ``backend="triton"``: the
two-pass design here (``forward``, ``backward``), the one-read design's ``forward_with_grads`` and
``scale_`` from ``divergence_one_read.py``, the shared row math from ``divergence_common.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modkern.constants import STATS_WIDTH, accumulation_dtype

from .divergence_common import (
    LOG2E,
    M_INIT,
    grad_a,
    grad_args,
    grad_b,
    kl_finish,
    load_block,
    load_row,
    lse_finish,
    mix_coefs,
    online_kl_update,
    online_lse_update,
    row_args,
    row_span,
    row_terms,
)
from .divergence_one_read import forward_with_grads, scale_

__all__ = ["forward", "backward", "forward_with_grads", "scale_"]

# float64 logits run the PyTorch backend (the Impl dtypes that modkern.ops.divergence.api registers). The forward stores
# no gradient: the backward recomputes them from p, q and the row statistics
# (modkern.ops.divergence.api.STORES_GRADIENTS).

# Widest block of the vocabulary one program handles per loop iteration. Rows wider than this
# loop; tests lower it to exercise many iterations.
BLOCK_V_MAX = 4096
# The backward's programs cover this many blocks of a row each (rows split over programs).
BWD_BLOCKS_PER_PROGRAM = 4


def block_v(vocab: int) -> int:
    return max(16, min(triton.next_power_of_2(vocab), BLOCK_V_MAX))


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


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
    p_row, active, limit = row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
    p_base = p_ptr + p_row * stride_p
    q_base = q_ptr + row * stride_q
    lanes = tl.arange(0, BLOCK)

    # Whole blocks load unmasked (a masked load first fills its registers with the -inf default:
    # ~5 instructions per element pair); the last partial block, if any, is one masked step.
    full = (limit // BLOCK) * BLOCK
    c = inv_t * LOG2E
    if KIND == 0:
        # JS: two passes. log M = log(beta P + (1 - beta) Q) needs both rows' log-sum-exps at
        # every element (not a sum of per-element terms that a running max can rescale).
        # pass 1: log-sum-exp of both rows (of the raw logits, scaled by 1/T inside).
        m_a = tl.full([BLOCK], M_INIT, tl.float32)
        m_b = tl.full([BLOCK], M_INIT, tl.float32)
        s_a = tl.zeros([BLOCK], tl.float32)
        s_b = tl.zeros([BLOCK], tl.float32)
        for start in range(0, full, BLOCK):
            offs = start + lanes
            m_a, s_a = online_lse_update(m_a, s_a, load_block(p_base, offs, 1.0), c)
            m_b, s_b = online_lse_update(m_b, s_b, load_block(q_base, offs, 1.0), c)
        if full < limit:
            offs = full + lanes
            m_a, s_a = online_lse_update(m_a, s_a, load_row(p_base, offs, limit, 1.0), c)
            m_b, s_b = online_lse_update(m_b, s_b, load_row(q_base, offs, limit, 1.0), c)
        sh_a, ls_a = lse_finish(m_a, s_a, inv_t)
        sh_b, ls_b = lse_finish(m_b, s_b, inv_t)

        # pass 2: S_P = sum P (logP - xp), S_Q = sum Q (logQ - xq).
        acc_p = tl.zeros([BLOCK], tl.float32)
        acc_q = tl.zeros([BLOCK], tl.float32)
        for start in range(0, full, BLOCK):
            offs = start + lanes
            a = load_block(p_base, offs, inv_t)
            b = load_block(q_base, offs, inv_t)
            _, _, t_p, t_q = row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            acc_p += t_p
            acc_q += t_q
        if full < limit:
            offs = full + lanes
            a = load_row(p_base, offs, limit, inv_t)
            b = load_row(q_base, offs, limit, inv_t)
            _, _, t_p, t_q = row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
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
        m_a = tl.full([BLOCK], M_INIT, tl.float32)
        m_b = tl.full([BLOCK], M_INIT, tl.float32)
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
        x = load_row(p_base, offs, limit, 1.0)
        y = load_row(q_base, offs, limit, 1.0)
        d0 = x - y
        finite = tl.abs(d0) < float("inf")
        c0 = tl.sum(tl.where(finite, d0, 0.0), 0) / tl.maximum(tl.sum(finite.to(tl.float32), 0), 1.0)
        t = d0 - c0
        m_a, s_a, u_a = online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
        m_b, s_b, u_b = online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        for start in range(BLOCK, full, BLOCK):
            offs = start + lanes
            x = load_block(p_base, offs, 1.0)
            y = load_block(q_base, offs, 1.0)
            t = (x - y) - c0
            m_a, s_a, u_a = online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
            m_b, s_b, u_b = online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        if (full < limit) & (full > 0):
            offs = full + lanes
            x = load_row(p_base, offs, limit, 1.0)
            y = load_row(q_base, offs, limit, 1.0)
            t = (x - y) - c0
            m_a, s_a, u_a = online_kl_update(m_a, s_a, u_a, x, t, c, KIND != 2)
            m_b, s_b, u_b = online_kl_update(m_b, s_b, u_b, y, -t, c, KIND != 1)
        sh_a, ls_a, big_sa, big_ua = kl_finish(m_a, s_a, u_a, inv_t)
        sh_b, ls_b, big_sb, big_ub = kl_finish(m_b, s_b, u_b, inv_t)
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
    p_row, active, limit = row_span(row, ref_ptr, mask_ptr, V, HAS_REF, HAS_MASK)
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
        a = load_row(p_base, offs, limit, inv_t)
        b = load_row(q_base, offs, limit, inv_t)
        prob_p, prob_q, t_p, t_q = row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
        if WRITE_GP:
            g = grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            tl.store(gp_ptr + row * stride_gp + offs, g.to(gp_ptr.dtype.element_ty), mask=offs < V)
        if WRITE_GQ:
            g = grad_b(prob_p, prob_q, t_q, s_q, own_b, w_t, KIND)
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
        a = load_row(p_base, offs, V, inv_t)  # once per chunk, shared by all copies
        acc = tl.zeros([BLOCK], tl.float32)
        for j in range(first, first + count):
            r = tl.load(order_ptr + j).to(tl.int64)
            if HAS_MASK:
                active = tl.load(mask_ptr + r) != 0
            else:
                active = r >= 0
            b = load_row(q_ptr + r * stride_q, offs, tl.where(active, V, 0), inv_t)
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
            prob_p, prob_q, t_p, _ = row_terms(a, b, sh_a, ls_a, sh_b, ls_b, c_p, c_q, KIND)
            g = grad_a(prob_p, prob_q, t_p, s_p, own_a, w_t, KIND)
            acc += tl.where(active, g, 0.0)
        tl.store(gp_ptr + n * stride_gp + offs, acc.to(gp_ptr.dtype.element_ty), mask=offs < V)


def forward(p, q, ref_index, mask, spec):
    """``spec``: a ``modkern.ops.divergence.DivergenceSpec`` (kind, beta, 1/T, which gradients).

    Returns (loss [R], stats [R, 6], [0], [0]): this backend stores no gradient (STORES_GRADIENTS)."""
    rows, vocab = q.shape
    acc = accumulation_dtype(p)
    loss = torch.empty(rows, dtype=acc, device=q.device)
    stats = torch.empty(rows, STATS_WIDTH, dtype=acc, device=q.device)
    if rows == 0:
        return loss, stats, p.new_empty(0), q.new_empty(0)
    block = block_v(vocab)
    _divergence_fwd_kernel[(rows,)](
        **row_args(p, q, ref_index, mask, spec),
        loss_ptr=loss,
        stats_ptr=stats,
        BLOCK=block,
        num_warps=num_warps_for(block),
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
    block = block_v(vocab)
    c_p, c_q = mix_coefs(spec.beta)
    grad_rows = grad_rows.to(stats.dtype).contiguous()
    if rows > 0 and (write_gp or write_gq):
        chunk = block * BWD_BLOCKS_PER_PROGRAM
        _divergence_bwd_kernel[(rows, triton.cdiv(vocab, chunk))](
            **row_args(p, q, ref_index, mask, spec),
            **grad_args(grad_p, grad_q, write_gp, write_gq, q),
            grad_rows_ptr=grad_rows,
            stats_ptr=stats,
            BLOCK=block,
            CHUNK=chunk,
            num_warps=num_warps_for(block),
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
            num_warps=num_warps_for(block),
        )
    return grad_p, grad_q
