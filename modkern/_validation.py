"""Argument checks shared by every op and backend.

Every public op validates its arguments here, before any kernel runs, so that bad input gives a
``TypeError`` / ``ValueError`` naming the argument instead of a Triton crash or a silent
broadcast. None of these checks reads tensor data (no host synchronization).
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_tensor(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {t.dtype}")
    return t


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {items[0][0]} is on {device}: all tensors must be on one device"
            )
    return device


def check_positive_number(name: str, value, *, allow_tensor: bool = True, open_upper: float | None = None):
    """A Python number > 0 (and < ``open_upper`` if given), or a 0-dim float tensor (not read)."""
    if isinstance(value, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a Python number, got a tensor")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if open_upper is not None and not value < open_upper:
        raise ValueError(f"{name} must be < {open_upper}, got {value}")
    return float(value)


def check_open_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1), got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_row_vector(name: str, t, rows: int, leading_shape, device) -> torch.Tensor:
    """A per-row tensor given as ``[rows]`` or with the leading shape of the rows; flattened."""
    check_tensor(name, t)
    if tuple(t.shape) != tuple(leading_shape) and tuple(t.shape) != (rows,):
        shapes = f"{tuple(leading_shape)} or ({rows},)" if tuple(leading_shape) != (rows,) else f"({rows},)"
        raise ValueError(f"{name} must have shape {shapes} (one entry per row), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
    return t.reshape(rows)


def check_mask(name: str, mask, rows: int, leading_shape, device) -> torch.Tensor | None:
    """Row mask as a contiguous bool ``[rows]`` tensor (bool or 0/1 numbers accepted)."""
    if mask is None:
        return None
    mask = check_row_vector(name, mask, rows, leading_shape, device)
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
        mask = mask != 0
    return mask.contiguous()


def check_num_items(num_items):
    """``num_items``: None, a positive int, or a 0-dim tensor (used as the mean's divisor)."""
    if num_items is None or isinstance(num_items, torch.Tensor):
        if isinstance(num_items, torch.Tensor):
            if num_items.dim() != 0:
                raise ValueError(f"num_items must be an int or a 0-dim tensor, got shape {tuple(num_items.shape)}")
            if num_items.dtype == torch.bool or num_items.dtype.is_complex:
                raise TypeError(f"num_items must be a real number, got a tensor of dtype {num_items.dtype}")
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be an int or a 0-dim tensor, got {type(num_items).__name__}")
    if num_items <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    return num_items


def check_token_mask(name: str, mask, shape, device) -> torch.Tensor:
    """A per-token mask of exactly ``shape`` on ``device`` (bool, or numbers where nonzero selects), as bool."""
    check_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one entry per token), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the embeddings are on {device}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_scalar_on(name: str, value, device) -> tuple[float, torch.Tensor | None]:
    """A Python number > 0, or a 0-dim real tensor on ``device`` (its value is not read: no sync).

    Returns ``(value, None)`` for a number and ``(0.0, tensor)`` for a tensor, the form the
    registered ops take (a float argument would be specialized by ``torch.compile``, a tensor not).
    """
    value = check_positive_number(name, value)
    if not isinstance(value, torch.Tensor):
        return value, None
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
    return 0.0, value
