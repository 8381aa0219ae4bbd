"""The ``reduction=`` / ``num_items`` convention shared by the ops and the references."""

from __future__ import annotations

import torch


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
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return total / num_items.to(device=total.device, dtype=total.dtype).clamp_min(1)
        return total / float(num_items)
    if mask is None:
        return total / max(rows.numel(), 1)
    return total / mask.sum().clamp_min(1).to(total.dtype)
