"""Triton kernels of ``modkern.perturb``: ``out = embeds + delta * mask`` and its delta gradient.

Math, per token row r (all leading dims flattened) and feature h, with ``sel_r = mask[r] != 0``:

    forward:   out[r, h]        = cast_embeds_dtype( fp32(embeds[r, h]) + (fp32(delta[r, h]) if sel_r else 0) )
    backward:  grad_delta[r, h] = cast_delta_dtype( grad_out[r, h] if sel_r else 0 )
               grad_embeds      = grad_out (identity: no kernel)

Bytes: the forward reads embeds and, on selected tokens only, delta (masked loads skip the rest),
and writes out once; the backward reads grad_out on selected tokens and writes grad_delta once.
Each program owns a [ROWS, BLOCK_H] tile of a 2-D grid (rows x H chunks), so the per-token mask is
read once per tile and there is no division by H per element. Offsets are int64; inputs are
contiguous ``[N, H]`` (the launcher's caller makes them so).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMS = 8192
MAX_BLOCK_H = 4096


@triton.jit
def _tile(mask_ptr, N, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    sel = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    offs = rows[:, None] * H + cols[None, :]
    inside = row_ok[:, None] & (cols < H)[None, :]
    return offs, inside, sel[:, None] & inside


@triton.jit
def _perturb_fwd_kernel(
    embeds_ptr, delta_ptr, mask_ptr, out_ptr, N, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr
):
    offs, inside, use = _tile(mask_ptr, N, H, ROWS, BLOCK_H)
    e = tl.load(embeds_ptr + offs, mask=inside, other=0.0).to(ACC)
    d = tl.load(delta_ptr + offs, mask=use, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (e + d).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _perturb_bwd_kernel(grad_out_ptr, mask_ptr, grad_delta_ptr, N, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, inside, use = _tile(mask_ptr, N, H, ROWS, BLOCK_H)
    g = tl.load(grad_out_ptr + offs, mask=use, other=0.0)
    tl.store(grad_delta_ptr + offs, g.to(grad_delta_ptr.dtype.element_ty), mask=inside)


def _launch_shape(N: int, H: int):
    block_h = min(triton.next_power_of_2(H), MAX_BLOCK_H)
    rows = max(1, min(triton.next_power_of_2(N), TILE_ELEMS // block_h))
    grid = (triton.cdiv(N, rows), triton.cdiv(H, block_h))
    return rows, block_h, grid, (8 if rows * block_h >= 4096 else 4)


def _flat_mask(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.reshape(-1)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def forward(embeds, delta, mask):
    """``embeds + delta * mask`` in fp32 (fp64 if an input is fp64), returned in ``embeds.dtype``.

    ``embeds``, ``delta``: contiguous ``[..., H]`` of one shape; ``mask``: contiguous bool
    ``embeds.shape[:-1]``.
    """
    out = torch.empty_like(embeds)
    H = embeds.shape[-1]
    N = embeds.numel() // H if H else 0
    if out.numel() == 0:
        return out
    acc = tl.float64 if torch.float64 in (embeds.dtype, delta.dtype) else tl.float32
    rows, block_h, grid, warps = _launch_shape(N, H)
    _perturb_fwd_kernel[grid](
        embeds, delta, _flat_mask(mask), out, N, H, ROWS=rows, BLOCK_H=block_h, ACC=acc, num_warps=warps
    )
    return out


def backward(grad_out, mask, delta_dtype):
    """Gradient for ``delta``: ``grad_out`` on selected tokens, 0 elsewhere, in ``delta_dtype``."""
    grad_delta = torch.empty(grad_out.shape, dtype=delta_dtype, device=grad_out.device)
    H = grad_out.shape[-1]
    N = grad_out.numel() // H if H else 0
    if grad_delta.numel() == 0:
        return grad_delta
    rows, block_h, grid, warps = _launch_shape(N, H)
    _perturb_bwd_kernel[grid](grad_out, _flat_mask(mask), grad_delta, N, H, ROWS=rows, BLOCK_H=block_h, num_warps=warps)
    return grad_delta
