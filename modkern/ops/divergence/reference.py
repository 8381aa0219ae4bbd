"""Reference Jensen-Shannon and Kullback-Leibler divergences between softmax distributions.

With ``P = softmax(p_logits / T)`` and ``Q = softmax(q_logits / T)`` over the last dimension:

* ``KL(P||Q) = sum_v P_v (log P_v - log Q_v)``, with ``0 * log 0 = 0``;
* ``M = beta P + (1 - beta) Q`` and ``JS_beta = beta KL(P||M) + (1 - beta) KL(Q||M)``.

Row ``r`` of Q is compared with row ``ref_index[r]`` of P (the identity when ``ref_index`` is
None). Masked-out rows give 0. The expansion ``p[ref_index]`` below is exactly the copy the fused
kernels avoid; here readability wins.
"""

from __future__ import annotations

import math

import torch

from modkern._reduction import reduce_rows


def _safe(log_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # log x where x > 0, else 0: makes 0 * log 0 = 0 in the value *and* keeps autograd free of
    # inf * 0 = NaN on entries whose probability is exactly 0.
    return torch.where(x > 0, log_x, torch.zeros_like(log_x))


def _rows(p_logits, q_logits, temperature, mask, ref_index):
    v = q_logits.shape[-1]
    p = p_logits.reshape(-1, v)
    q = q_logits.reshape(-1, v)
    if ref_index is not None:
        p = p[ref_index.reshape(-1).long()]
    log_p = torch.log_softmax(p / temperature, dim=-1)
    log_q = torch.log_softmax(q / temperature, dim=-1)
    m = None if mask is None else mask.reshape(-1).bool()
    return log_p, log_q, m


def _finish(rows, m, reduction, num_items, leading_shape):
    if m is not None:
        rows = torch.where(m, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(leading_shape)
    return reduce_rows(rows, m, reduction, num_items)


def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(A||B) from log-probabilities, with 0 log 0 = 0."""
    a = log_a.exp()
    return (a * (_safe(log_a, a) - _safe(log_b, a))).sum(-1)


def kl_divergence(
    p_logits,
    q_logits,
    *,
    direction="forward",
    temperature=1.0,
    mask=None,
    ref_index=None,
    reduction="mean",
    num_items=None,
):
    """``direction``: ``"forward"`` KL(P||Q), ``"reverse"`` KL(Q||P), ``"symmetric"`` their sum."""
    log_p, log_q, m = _rows(p_logits, q_logits, temperature, mask, ref_index)
    if direction == "forward":
        rows = kl_rows(log_p, log_q)
    elif direction == "reverse":
        rows = kl_rows(log_q, log_p)
    elif direction == "symmetric":
        rows = kl_rows(log_p, log_q) + kl_rows(log_q, log_p)
    else:
        raise ValueError(f"direction must be 'forward', 'reverse' or 'symmetric', got {direction!r}")
    return _finish(rows, m, reduction, num_items, q_logits.shape[:-1])


def js_divergence(
    p_logits,
    q_logits,
    *,
    beta=0.5,
    temperature=1.0,
    mask=None,
    ref_index=None,
    reduction="mean",
    num_items=None,
):
    """Generalized Jensen-Shannon divergence ``beta KL(P||M) + (1-beta) KL(Q||M)``."""
    log_p, log_q, m = _rows(p_logits, q_logits, temperature, mask, ref_index)
    # log M = logsumexp(log beta + log P, log(1-beta) + log Q): exact where a probability underflows.
    # Where both probabilities are exactly 0, log M = -inf is never used (0 log 0 = 0), but
    # logaddexp(-inf, -inf) has a NaN gradient: feed it zeros there instead.
    unused = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = torch.zeros_like(log_p)
    log_m = torch.logaddexp(
        torch.where(unused, zero, log_p + math.log(beta)), torch.where(unused, zero, log_q + math.log1p(-beta))
    )
    rows = beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)
    return _finish(rows, m, reduction, num_items, q_logits.shape[:-1])
