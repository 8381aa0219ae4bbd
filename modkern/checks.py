"""Argument checks shared by every op and backend.

Every public op validates its arguments here, before any kernel runs, so that bad input gives a
``TypeError`` / ``ValueError`` naming the argument instead of a Triton crash or a silent
broadcast.

Values held in tensors (a 0-dim ``alpha`` / ``epsilon`` / ``num_items``, the entries of a mask) are
read only where that costs no device synchronization: CPU tensors outside ``torch.compile`` /
fake-tensor tracing (:func:`readable`). There a bad value is a ``ValueError``. On a GPU the ops
never synchronize with the host, so these values are a documented contract instead; a bad scalar
(``alpha`` or ``epsilon`` <= 0 or non-finite, a ``num_items`` that is not a whole count >= 0) turns
the result into NaN on the device (:func:`nan_unless`) - loud, and unlike a device-side assert it
cannot kill the CUDA context.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read for a check: a real CPU tensor outside tracing (no host sync)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def nan_unless(valid: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``valid``, else NaN, computed on the device: how a bad value that cannot be read
    without a host sync shows up (a NaN result instead of a silently wrong one)."""
    return torch.where(valid, value, torch.full_like(value, float("nan")))


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


def check_finite_factor(name: str, value, device):
    """``None``, a finite Python real, or a 0-dim real tensor on ``device`` (or a CPU scalar
    tensor): a constant factor of a result. A tensor's value is checked where it is readable (CPU,
    eager); elsewhere a non-finite factor makes the result non-finite by itself."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got dtype {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
        if readable(value) and not bool(torch.isfinite(value)):
            raise ValueError(f"{name} must be finite, got {value.item()}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-dim tensor, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


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


def check_reduction_args(reduction, num_items) -> None:
    """``reduction`` and its divisor ``num_items`` (only meaningful with ``"mean"``)."""
    check_reduction(reduction)
    check_num_items(num_items)
    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items is the divisor of reduction='mean'; it has no effect with reduction={reduction!r}")


def check_index_vector(name: str, t, rows: int, leading_shape, device, what: str = "an integer tensor"):
    """A per-row integer tensor (``ref_index``, ``targets``): :func:`check_row_vector`, then int64."""
    t = check_row_vector(name, t, rows, leading_shape, device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    return t.to(torch.int64).contiguous()


def check_row_vector(name: str, t, rows: int, leading_shape, device) -> torch.Tensor:
    """A per-row tensor given as ``[rows]`` or with the leading shape of the rows; flattened."""
    check_tensor(name, t)
    if tuple(t.shape) != tuple(leading_shape) and tuple(t.shape) != (rows,):
        shapes = f"{tuple(leading_shape)} or ({rows},)" if tuple(leading_shape) != (rows,) else f"({rows},)"
        raise ValueError(f"{name} must have shape {shapes} (one entry per row), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
    return t.reshape(rows)


def _check_zero_one(name: str, mask: torch.Tensor) -> None:
    """On a readable (CPU) tensor: every entry is 0 or 1 (elsewhere nonzero selects, unchecked)."""
    if mask.dtype != torch.bool and readable(mask) and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(
            f"{name} must hold only 0 and 1 (or be a bool tensor), found {bad}; "
            f"for a selection by threshold pass e.g. {name}=weights > 0"
        )


def check_mask(name: str, mask, rows: int, leading_shape, device) -> torch.Tensor | None:
    """Row mask as a contiguous bool ``[rows]`` tensor: bool, or integers 0/1.

    A floating mask is a ``TypeError``: ``mask`` selects rows, it does not weight them (a 0.5 would
    otherwise count fully). Integer entries other than 0/1 are a ``ValueError`` on CPU.
    """
    if mask is None:
        return None
    mask = check_row_vector(name, mask, rows, leading_shape, device)
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex or mask.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a bool tensor (or integers 0/1) selecting rows, got {mask.dtype}; it is not a "
                f"row weight: pass {name}=weights > 0 to select rows, or multiply reduction='none' values by weights"
            )
        _check_zero_one(name, mask)
        mask = mask != 0
    return mask.contiguous()


def _is_count(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor: ``t`` is a finite count >= 0.

    A tensor count may be fractional: Hugging Face's ``Trainer._get_num_items_in_batch`` divides
    the token count by the tensor / context / sequence-parallel sizes (``num_items / (tp * cp *
    sp)``), which leaves a float tensor that need not be whole. A Python number must be whole.
    """
    if not t.dtype.is_floating_point:
        return t >= 0
    return (t >= 0) & torch.isfinite(t)


def check_num_items(num_items):
    """``num_items``: None, a whole number > 0, or a 0-dim tensor holding a finite count >= 0.

    A tensor count of 0 is allowed (Hugging Face passes 0 for a batch without answer tokens; the
    mean is then 0). A tensor's value is checked where it is readable (CPU); on a GPU a bad count
    makes the mean NaN (:func:`count_divisor`).
    """
    if num_items is None or isinstance(num_items, torch.Tensor):
        if isinstance(num_items, torch.Tensor):
            if num_items.dim() != 0:
                raise ValueError(f"num_items must be an int or a 0-dim tensor, got shape {tuple(num_items.shape)}")
            if num_items.dtype == torch.bool or num_items.dtype.is_complex:
                raise TypeError(f"num_items must be a real number, got a tensor of dtype {num_items.dtype}")
            if readable(num_items) and not bool(_is_count(num_items)):
                raise ValueError(
                    f"num_items must be a finite count of items >= 0, got {num_items.item()} "
                    "(it is the divisor of reduction='mean', e.g. Hugging Face's num_items_in_batch)"
                )
        return num_items
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items must be an int or a 0-dim tensor, got {type(num_items).__name__}")
    if not num_items > 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    if not isinstance(num_items, numbers.Integral) and not float(num_items).is_integer():
        raise ValueError(f"num_items must be a whole number of items, got {num_items}")
    return num_items


def count_divisor(num_items: torch.Tensor, device, dtype) -> torch.Tensor:
    """A tensor ``num_items`` as the divisor of a mean: at least 1 (a count of 0 gives a mean of 0,
    not 0/0), NaN when it is not a finite count >= 0 (the device-side form of :func:`check_num_items`)."""
    n = num_items.to(device=device)
    return nan_unless(_is_count(n), n.to(dtype).clamp_min(1))


def check_token_mask(name: str, mask, shape, device) -> torch.Tensor:
    """A per-token mask of exactly ``shape`` on ``device`` (bool, or numbers where nonzero selects), as bool."""
    check_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one entry per token), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the embeddings are on {device}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    _check_zero_one(name, mask)
    return mask if mask.dtype == torch.bool else mask != 0


def check_scalar_on(name: str, value, device) -> tuple[float, torch.Tensor | None]:
    """A Python number > 0, or a 0-dim real tensor on ``device`` (or the CPU, as torch's scalar
    tensors may be) holding a finite value > 0.

    Returns ``(value, None)`` for a number and ``(0.0, tensor)`` for a tensor, the form the
    registered ops take (a float argument would be specialized by ``torch.compile``, a tensor not).
    A tensor's value is checked where it is readable (CPU, eager: ``ValueError``); elsewhere the
    returned tensor is NaN when the value is bad (no host sync), so the op's result is NaN.
    """
    value = check_positive_number(name, value)
    if not isinstance(value, torch.Tensor):
        return value, None
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got dtype {value.dtype}")
    if value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
    valid = (value > 0) & torch.isfinite(value)
    if readable(value):
        if not bool(valid):
            raise ValueError(f"{name} must be finite and > 0, got {value.item()}")
        return 0.0, value.to(device)
    # an integer tensor cannot hold NaN: as float, so a bad value still shows up as NaN
    value = value if value.dtype.is_floating_point else value.to(torch.float32)
    return 0.0, nan_unless(valid, value).to(device)
