"""Triton kernels of the masked PGD step (``modkern.masked_adv_step``).

Math (SPEC §1, ``modkern.ops.adv_step.reference``), per sample b, token l, feature h, with
``sel = mask[b, l] != 0``:

    g      = grad on selected tokens, 0 elsewhere
    d0     = sign(g) for step "sign", else g                      (elementwise)
    d      = d0 * s_b * t_bl                                      (the step direction)
             s_b  = 1 / max(||g_b||, 1e-12)   step "l2"     (per-sample L2 of the masked block)
                  = 1 / max(max|g_b|, 1e-12)  step "linf"
                  = 1                          otherwise
             t_bl = 1 / max(||g_bl||, 1e-12)  step "l2_token" (per-token L2 over H), else 1
    new    = (delta + alpha * d) on selected tokens, 0 elsewhere
    out    = clamp(new, -eps, eps)                              norm "linf"
           = new * eps / max(||new_b||, eps)                    norm "l2"       (per sample)
           = new * eps / max(||new_bl||, eps)                   norm "l2_token" (per token)
           = new                                                norm None

Design, argued by bytes moved (N = B*L*H elements; D, G = bytes per element of delta, grad):

* raw / sign / l2_token steps with linf / l2_token / no projection need nothing beyond one token
  row, so one kernel does it in one pass: read delta and grad, write delta - the minimum,
  N*(2D + G). Each program owns ``ROWS`` whole tokens (the H loop re-reads a token from L1/L2, not
  HBM, when H needs more than one chunk), so per-token norms are local. Unselected tokens are
  written as 0 without being read (masked loads), so a sparse mask moves even fewer bytes.
* Per-sample quantities (step l2 / linf, norm l2) need a reduction over the whole sample before
  any element can be updated. We use a split reduction: ``_adv_stats_kernel`` writes, per
  (sample, chunk of tokens), the partial sums below into a tiny ``[B, chunks, 4]`` buffer; then
  ``_adv_update_kernel`` reduces its sample's partials (a few KB, from L2) and updates. Partial
  sums instead of atomics keep the result deterministic, and there is no host sync nor a Python
  loop over samples.
* The L2 projection needs ||delta + c*d0||_b, and for the l2 / linf steps c = alpha * s_b is known
  only after the gradient's reduction. Computing the norm directly would take three passes: stats
  of grad (G); delta' and its norm (D + G); the update (2D + G): N*(3D + 3G). Instead the stats pass
  gathers, in the same read, the three inner products of the analytic norm
      ||delta + c*d0||^2 = ||delta||^2 + 2c <delta, d0> + c^2 ||d0||^2
  (with t_bl folded into d0 per token for step l2_token), so l2 + l2 costs N*(D + G) for the stats
  plus N*(2D + G) for the update = N*(3D + 2G): one read of grad less (16 instead of 18 bytes per
  element for fp32 delta / bf16 grad) and one launch less. The l2 / linf steps with a linf
  projection skip delta in the stats pass: N*(2D + 2G). The analytic form loses accuracy only
  through cancellation when ||delta'|| << ||delta|| + ||alpha*d||, which means ||delta'|| is far
  below eps (no rescale happens) or the rescale factor is ~1; it is clamped at 0 before the sqrt.
  ``l2_token`` projections use the same identity per token when a token spans several H chunks and
  the exact norm from registers otherwise.

Partials per (sample, chunk): P0 = sum d0'^2, P1 = sum delta*d0', P2 = sum delta^2 (selected tokens
only; d0' = d0 * t_bl), P3 = max |g|. Offsets are int64; any strides (non-contiguous grad,
in-place update of a strided delta). ``alpha`` / ``eps`` arrive either as Python floats (not
specialized, so no recompilation per value) or as pointers to 0-dim device tensors (no host sync).
Arithmetic is fp32, or fp64 for an fp64 ``delta``; float kernel arguments are fp32, so for an fp64
``delta`` the launcher turns float ``alpha`` / ``eps`` into fp64 0-dim device tensors (``torch.full``:
a fill kernel, no host sync) to keep full fp64 precision. NaN gradients propagate (``_max``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modkern.constants import NORM_CODES, STEP_CODES  # the leaf module of shared constants

TINY = 1e-12

# Tiling: each program owns ROWS tokens x min(next_pow2(H), MAX_BLOCK_H) features (~TILE_ELEMS
# elements). MAX_BLOCK_H is a module attribute so tests can force several H chunks.
MAX_BLOCK_H = 8192
TILE_ELEMS = 8192
MAX_PARTIAL_BLOCK = 1024


@triton.jit
def _max(a, b):
    # NaN-propagating max / min: a NaN gradient (a diverged model) makes delta NaN, as in the
    # PyTorch reference, instead of being clamped to a finite -eps (tl.maximum drops NaN by default).
    # The max |g| reductions keep tl.max (NaN-dropping on the GPU); the linf step adds 0 * P0 (the
    # sum of squares, NaN whenever a gradient is) to carry the NaN instead.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scalar(ptr, value, IS_PTR: tl.constexpr, ACC: tl.constexpr):
    if IS_PTR:
        return tl.load(ptr).to(ACC)
    else:
        return value


@triton.jit
def _load_tile(
    delta_ptr,
    grad_ptr,
    d_rows,
    g_rows,
    sdh,
    sgh,
    cols,
    hmask,
    sel,
    LOAD_DELTA: tl.constexpr,
    STEP: tl.constexpr,
    ACC: tl.constexpr,
):
    """delta (0 off the mask) and d0 = g or sign(g) (0 off the mask) for one [ROWS, BLOCK_H] tile."""
    ld = sel[:, None] & hmask[None, :]
    g = tl.load(grad_ptr + g_rows[:, None] + cols[None, :] * sgh, mask=ld, other=0.0).to(ACC)
    if STEP == 1:
        g = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(ACC)
    if LOAD_DELTA:
        delta = tl.load(delta_ptr + d_rows[:, None] + cols[None, :] * sdh, mask=ld, other=0.0).to(ACC)
    else:
        delta = tl.zeros_like(g)
    return delta, g


@triton.jit
def _token_stats(
    delta_ptr,
    grad_ptr,
    d_rows,
    g_rows,
    sdh,
    sgh,
    sel,
    H,
    LOAD_DELTA: tl.constexpr,
    STEP: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_H_CHUNKS: tl.constexpr,
):
    """Per token: A = sum d0^2, Bv = sum delta*d0, C = sum delta^2, M = max |d0| over H."""
    A = tl.zeros([ROWS], ACC)
    Bv = tl.zeros([ROWS], ACC)
    C = tl.zeros([ROWS], ACC)
    M = tl.zeros([ROWS], ACC)
    for k in range(NUM_H_CHUNKS):
        cols = (k * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        hmask = cols < H
        delta, d0 = _load_tile(delta_ptr, grad_ptr, d_rows, g_rows, sdh, sgh, cols, hmask, sel, LOAD_DELTA, STEP, ACC)
        A += tl.sum(d0 * d0, 1)
        Bv += tl.sum(delta * d0, 1)
        C += tl.sum(delta * delta, 1)
        M = tl.maximum(M, tl.max(tl.abs(d0), 1))
    return A, Bv, C, M


@triton.jit
def _token_scale(A, STEP: tl.constexpr):
    """t_bl: 1 / max(||g_bl||, 1e-12) for step l2_token, else 1."""
    if STEP == 3:
        return 1.0 / _max(tl.sqrt(A), 1e-12)
    else:
        return tl.full(A.shape, 1.0, A.dtype)


@triton.jit
def _rows_of_program(mask_ptr, smb, sml, L, ROWS: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_c.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < L
    sel = (tl.load(mask_ptr + b * smb + rows * sml, mask=row_ok, other=0) != 0) & row_ok
    return pid_c, b, rows, row_ok, sel


@triton.jit
def _adv_stats_kernel(
    delta_ptr,
    grad_ptr,
    mask_ptr,
    part_ptr,
    L,
    H,
    sdb,
    sdl,
    sdh,
    sgb,
    sgl,
    sgh,
    smb,
    sml,
    LOAD_DELTA: tl.constexpr,
    STEP: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_H_CHUNKS: tl.constexpr,
):
    # Program (chunk c, sample b) -> part[b, c, :] = (P0, P1, P2, P3) over its ROWS tokens.
    pid_c, b, rows, row_ok, sel = _rows_of_program(mask_ptr, smb, sml, L, ROWS)
    d_rows = b * sdb + rows * sdl
    g_rows = b * sgb + rows * sgl
    A, Bv, C, M = _token_stats(
        delta_ptr, grad_ptr, d_rows, g_rows, sdh, sgh, sel, H, LOAD_DELTA, STEP, ACC, ROWS, BLOCK_H, NUM_H_CHUNKS
    )
    t = _token_scale(A, STEP)
    out = part_ptr + (b * tl.num_programs(0) + pid_c) * 4
    tl.store(out + 0, tl.sum(A * t * t, 0))
    tl.store(out + 1, tl.sum(Bv * t, 0))
    tl.store(out + 2, tl.sum(C, 0))
    tl.store(out + 3, tl.max(M, 0))


@triton.jit
def _update_and_store(
    out_ptr, o_rows, cols, soh, hmask, row_ok, sel, delta, d0, coef, proj_b, proj_t, e, NORM: tl.constexpr
):
    """new = delta + coef * d0, projected (linf clamp, l2 factor proj_b, l2_token factors proj_t;
    proj_t None = from this tile's own rows, when the tile holds whole tokens), 0 off the mask."""
    new = delta + coef[:, None] * d0
    if NORM == 1:
        new = _min(_max(new, -e), e)
    if NORM == 2:
        new = new * proj_b
    if NORM == 3:
        if proj_t is None:
            new = new * (e / _max(tl.sqrt(tl.sum(new * new, 1)), e))[:, None]
        else:
            new = new * proj_t[:, None]
    new = tl.where(sel[:, None], new, 0.0)
    tl.store(
        out_ptr + o_rows[:, None] + cols[None, :] * soh,
        new.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & hmask[None, :],
    )


@triton.jit
def _adv_update_kernel(
    delta_ptr,
    grad_ptr,
    mask_ptr,
    out_ptr,
    part_ptr,
    alpha_ptr,
    alpha,
    eps_ptr,
    eps,
    L,
    H,
    NC,
    sdb,
    sdl,
    sdh,
    sgb,
    sgl,
    sgh,
    smb,
    sml,
    sob,
    sol,
    soh,
    STEP: tl.constexpr,
    NORM: tl.constexpr,
    ALPHA_IS_PTR: tl.constexpr,
    EPS_IS_PTR: tl.constexpr,
    NEED_SAMPLE: tl.constexpr,
    NEED_TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_H_CHUNKS: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    pid_c, b, rows, row_ok, sel = _rows_of_program(mask_ptr, smb, sml, L, ROWS)
    d_rows = b * sdb + rows * sdl
    g_rows = b * sgb + rows * sgl
    o_rows = b * sob + rows * sol
    a = _scalar(alpha_ptr, alpha, ALPHA_IS_PTR, ACC)
    e = _scalar(eps_ptr, eps, EPS_IS_PTR, ACC)

    # Per-sample factors from the partials of sample b: c = alpha * s_b; proj_b for norm l2.
    c = a
    proj_b = 1.0
    if NEED_SAMPLE:
        offs = tl.arange(0, PART_BLOCK)
        s0 = tl.zeros([PART_BLOCK], ACC)
        s1 = tl.zeros([PART_BLOCK], ACC)
        s2 = tl.zeros([PART_BLOCK], ACC)
        s3 = tl.zeros([PART_BLOCK], ACC)
        for c0 in range(0, NC, PART_BLOCK):
            idx = c0 + offs
            ok = idx < NC
            p = part_ptr + (b * NC + idx) * 4
            s0 += tl.load(p + 0, mask=ok, other=0.0)
            s1 += tl.load(p + 1, mask=ok, other=0.0)
            s2 += tl.load(p + 2, mask=ok, other=0.0)
            s3 = tl.maximum(s3, tl.load(p + 3, mask=ok, other=0.0))
        P0 = tl.sum(s0, 0)
        P1 = tl.sum(s1, 0)
        P2 = tl.sum(s2, 0)
        P3 = tl.max(s3, 0)
        if STEP == 2:
            c = a / _max(tl.sqrt(P0), 1e-12)
        if STEP == 4:
            c = a / _max(P3 + 0.0 * P0, 1e-12)  # (+ 0 * P0: NaN when a gradient is NaN)
        if NORM == 2:
            n2 = _max(P2 + 2.0 * c * P1 + c * c * P0, 0.0)
            proj_b = e / _max(tl.sqrt(n2), e)

    if NUM_H_CHUNKS == 1:
        # The whole token fits one tile: read once, everything from registers.
        cols = tl.arange(0, BLOCK_H).to(tl.int64)
        hmask = cols < H
        delta, d0 = _load_tile(delta_ptr, grad_ptr, d_rows, g_rows, sdh, sgh, cols, hmask, sel, True, STEP, ACC)
        coef = c * _token_scale(tl.sum(d0 * d0, 1), STEP)
        _update_and_store(out_ptr, o_rows, cols, soh, hmask, row_ok, sel, delta, d0, coef, proj_b, None, e, NORM)
    else:
        coef = tl.full([ROWS], 1.0, ACC) * c
        proj_t = tl.full([ROWS], 1.0, ACC)
        if NEED_TOKEN:
            A, Bv, C, M = _token_stats(
                delta_ptr, grad_ptr, d_rows, g_rows, sdh, sgh, sel, H, NORM == 3, STEP, ACC, ROWS, BLOCK_H, NUM_H_CHUNKS
            )
            coef = c * _token_scale(A, STEP)
            if NORM == 3:
                n2 = _max(C + 2.0 * coef * Bv + coef * coef * A, 0.0)
                proj_t = e / _max(tl.sqrt(n2), e)
        for k in range(NUM_H_CHUNKS):
            cols = (k * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
            hmask = cols < H
            delta, d0 = _load_tile(delta_ptr, grad_ptr, d_rows, g_rows, sdh, sgh, cols, hmask, sel, True, STEP, ACC)
            _update_and_store(out_ptr, o_rows, cols, soh, hmask, row_ok, sel, delta, d0, coef, proj_b, proj_t, e, NORM)


def _tiling(L: int, H: int):
    block_h = min(triton.next_power_of_2(H), MAX_BLOCK_H)
    rows = max(1, min(triton.next_power_of_2(L), TILE_ELEMS // block_h))
    return rows, block_h, triton.cdiv(H, block_h), triton.cdiv(L, rows)


def _scalar_args(name, value, value_t, stand_in) -> dict:
    """A scalar kernel argument: by pointer (a 0-dim tensor on the device) or by value (a float)."""
    return {
        f"{name}_ptr": stand_in if value_t is None else value_t,
        name: 0.0 if value_t is not None else float(value),
        f"{name.upper()}_IS_PTR": value_t is not None,
    }


def step(delta, grad, mask, out, alpha, alpha_t, epsilon, epsilon_t, step, norm):
    """Write one masked PGD step of ``delta [B, L, H]`` into ``out`` (which may be ``delta``).

    Same contract as ``modkern.ops.adv_step.torch_impl.step``: ``mask`` bool ``[B, L]``; ``alpha_t``
    / ``epsilon_t`` 0-dim tensors on the device (used instead of the floats when given); ``step``
    / ``norm`` names (``norm`` ``"none"`` for no projection). Two launches at most: the per-sample
    statistics (when the step or the projection needs a norm over the sample), then the update.
    """
    B, L, H = delta.shape
    if delta.numel() == 0:
        return out
    step_code, norm_code = STEP_CODES[step], NORM_CODES[norm]
    acc_torch = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if acc_torch == torch.float64:  # float kernel arguments are fp32: pass fp64 scalars by pointer
        as_t = lambda v, t: torch.full((), v, dtype=torch.float64, device=delta.device) if t is None else t  # noqa: E731
        alpha_t, epsilon_t = as_t(alpha, alpha_t), as_t(epsilon, epsilon_t)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    rows, block_h, chunks_h, nc = _tiling(L, H)
    tiles = dict(
        delta_ptr=delta,
        grad_ptr=grad,
        mask_ptr=mask,
        L=L,
        H=H,
        **dict(
            zip(
                ("sdb", "sdl", "sdh", "sgb", "sgl", "sgh", "smb", "sml"),
                (*delta.stride(), *grad.stride(), *mask.stride()),
            )
        ),
        STEP=step_code,
        ACC=tl.float64 if acc_torch == torch.float64 else tl.float32,
        ROWS=rows,
        BLOCK_H=block_h,
        NUM_H_CHUNKS=chunks_h,
        num_warps=8 if rows * block_h >= 4096 else 4,
    )
    need_sample = step_code in (2, 4) or norm_code == 2
    part = delta  # never read without the sample statistics
    if need_sample:
        part = torch.empty((B, nc, 4), dtype=acc_torch, device=delta.device)
        _adv_stats_kernel[(nc, B)](**tiles, part_ptr=part, LOAD_DELTA=norm_code == 2)
    _adv_update_kernel[(nc, B)](
        **tiles,
        **_scalar_args("alpha", alpha, alpha_t, delta),
        **_scalar_args("eps", epsilon, epsilon_t, delta),
        out_ptr=out,
        part_ptr=part,
        NC=nc,
        **dict(zip(("sob", "sol", "soh"), out.stride())),
        NORM=norm_code,
        NEED_SAMPLE=need_sample,
        NEED_TOKEN=step_code == 3 or norm_code == 3,
        PART_BLOCK=min(triton.next_power_of_2(nc), MAX_PARTIAL_BLOCK),
    )
    return out
