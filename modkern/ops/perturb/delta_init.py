"""``init_delta``: the random start of the PGD perturbation, inside the epsilon-ball and the mask."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from modkern import checks

INIT_NORMS = ("linf", "l2", "zero")


def _shape_and_device(shape_or_like, mask: Tensor):
    if isinstance(shape_or_like, Tensor):
        if shape_or_like.device != mask.device:
            raise ValueError(f"mask is on {mask.device} but shape_or_like is on {shape_or_like.device}")
        return tuple(shape_or_like.shape), shape_or_like.device
    if isinstance(shape_or_like, (tuple, list, torch.Size)) and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape_or_like
    ):
        return tuple(int(s) for s in shape_or_like), mask.device
    raise TypeError(f"shape_or_like must be a tensor or a shape (tuple of ints >= 0), got {shape_or_like!r}")


def init_delta(
    shape_or_like,
    mask: Tensor,
    *,
    epsilon,
    norm: str = "linf",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A random perturbation inside the epsilon-ball, zero outside the mask.

    * ``"linf"``: :math:`\delta \sim U(-\varepsilon, \varepsilon)` elementwise (the paper's), so
      :math:`|\delta| \le \varepsilon` exactly (in fp32/fp64; within one rounding of a lower
      precision ``dtype``);
    * ``"l2"``: FreeLB's start, :math:`U(-1, 1)\cdot\varepsilon / \sqrt{n_b H}` with :math:`n_b`
      the number of masked tokens of sample b (at least 1), so :math:`\|\delta_b\|_2 \le
      \varepsilon`;
    * ``"zero"``: zeros.

    Args:
        shape_or_like: ``[B, L, H]`` shape, or a tensor (e.g. the embeddings) whose shape and device
            are used (not its dtype).
        mask: ``[B, L]`` bool or 0/1 numbers (other values: ``ValueError`` on CPU; on a GPU, where
            they are not read, nonzero selects).
        epsilon: radius > 0, a number or a 0-dim tensor on the device (a tensor is checked on CPU;
            on a GPU, without a host sync, a value <= 0 or non-finite makes the start NaN).
        norm: ``"linf"``, ``"l2"`` or ``"zero"``.
        dtype: floating dtype of the result (fp32 by default: PGD state is kept in fp32).
        generator: ``torch.Generator`` on the device, for reproducible starts.

    Sampling is done in fp32 (fp64 for fp64) with plain torch ops: no host synchronization.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> delta = init_delta(embeds, mask, epsilon=1e-3, generator=g)  # fp32 [B, L, H]
    """
    checks.check_tensor("mask", mask)
    shape, device = _shape_and_device(shape_or_like, mask)
    if len(shape) != 3:
        raise ValueError(f"shape_or_like must describe [B, L, H], got shape {shape}")
    mask = checks.check_token_mask("mask", mask, shape[:2], device)
    checks.check_choice("norm", norm, INIT_NORMS)
    eps_f, eps_t = checks.check_scalar_on("epsilon", epsilon, device)
    if not isinstance(dtype, torch.dtype) or dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the perturbation is created on {device}")
    if norm == "zero":
        return torch.zeros(shape, dtype=dtype, device=device)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    eps = eps_f if eps_t is None else eps_t.to(acc)
    unit = torch.rand(shape, generator=generator, dtype=acc, device=device).mul_(2.0).sub_(1.0)  # [-1, 1)
    if norm == "linf":
        scale = eps
    else:
        # FreeLB: eps / sqrt(n_b * H), so each |x| <= eps / sqrt(n_b H) and ||delta_b||_2 <= eps.
        dims = mask.sum(dim=1).clamp_min(1).to(acc) * shape[2]
        scale = (eps / dims.sqrt())[:, None, None]
    delta = torch.where(mask[..., None], unit * scale, torch.zeros((), dtype=acc, device=device))
    return delta.to(dtype)
