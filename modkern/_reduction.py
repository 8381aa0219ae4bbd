"""The ``reduction=`` / ``num_items`` convention shared by the ops and the references."""

from __future__ import annotations

import torch

from modkern.checks import count_divisor


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str, num_items=None) -> torch.Tensor:
    """Reduce per-row losses (already 0 on masked-out rows).

    ``"none"`` returns ``rows``; ``"sum"`` their sum; ``"mean"`` the sum divided by ``num_items``
    when given (Hugging Face's ``num_items_in_batch``; a tensor count is clamped to at least 1 on
    the device), else by the number of counted rows (``mask.sum()``, or all rows), clamped to at
    least 1 so that an all-masked batch gives 0, not NaN. Computed on device: no host
    synchronization.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(num_items, mask, rows.numel(), total.device, total.dtype)


def mean_divisor(num_items, counted: torch.Tensor | None, n_rows: int, device, dtype):
    """The divisor of a mean over rows: ``num_items`` when given (a tensor count is clamped to at
    least 1 on the device: an empty batch gives 0, not 0/0), else the number of counted rows
    (``counted.sum()``, or ``n_rows`` when every row counts), at least 1. No host synchronization.
    """
    if num_items is None:
        if counted is None:
            return max(n_rows, 1)
        return counted.sum().clamp_min(1).to(dtype)
    if isinstance(num_items, torch.Tensor):
        return count_divisor(num_items, device, dtype)  # NaN for a bad count that was not readable
    return float(num_items)
