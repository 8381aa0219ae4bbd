"""PyTorch backend of the divergence family (same contract as ``modkern.kernels.divergence``).

Per compared row, with ``a = p_logits[ref[r]] / T`` and ``b = q_logits[r] / T``,
``log P = log_softmax(a)``, ``log Q = log_softmax(b)`` (max subtracted first, see ``_log_softmax``):

=============  ==========================  ===================================================
kind           loss                        d loss / d a  (times 1/T for the logits)
=============  ==========================  ===================================================
kl_forward     S_P = sum P (logP - logQ)   P (logP - logQ - S_P)        ; d/db = Q - P
kl_reverse     S_Q = sum Q (logQ - logP)   P - Q                        ; d/db = Q (logQ - logP - S_Q)
kl_symmetric   S_P + S_Q                   sum of the two rows above
js             beta S_P + (1-beta) S_Q     beta P (logP - logM - S_P)   ; d/db = (1-beta) Q (logQ - logM - S_Q)
=============  ==========================  ===================================================

where for ``js`` ``S_P = KL(P||M)``, ``S_Q = KL(Q||M)``, ``log M = logaddexp(log beta + logP,
log(1-beta) + logQ)``. ``stats[r] = (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q)`` with
``logsumexp(a) = shift_a + logsum_a``.

The forward returns the per-row losses and the gradients of each row's loss; the backward scales
them by the incoming per-row gradient. With ``ref_index`` the gradient for P is recomputed in the
backward (it sums over the copies that share a reference row).
"""

from __future__ import annotations

import math

import torch

from modkern.ops.dispatch import accumulation_dtype, saved_grad_dtype
from modkern.ops.divergence import composed

# The forward stores each row's gradients (unscaled); the backward scales them
# (modkern.ops.divergence.api.STORES_GRADIENTS).


def _zero_where_zero(x: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    # 0 * log 0 = 0; NaN probabilities (from NaN logits) propagate instead of reading as 0.
    return torch.where(prob == 0, torch.zeros_like(x), x)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """``(x - max) - log(sum(exp(x - max)))``: the max is subtracted first and exactly (Sterbenz).

    ``torch.log_softmax`` on CPU forms ``x - (max + log-sum)``; with peaked logits (max ~ 20) that
    sum rounds at ulp(20) ~ 2e-6, which showed up as ~2.6e-4 relative L2 error in the fp32 JS
    gradients (T = 0.5, beta = 0.8, logits of std 3) against float64. An all -inf row keeps
    shift 0 (-inf - 0 = -inf, no NaN); NaN rows stay NaN.
    """
    shift = x.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isinf(shift) & (shift < 0), torch.zeros_like(shift), shift)
    z = x - shift
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def _shift_logsum(x: torch.Tensor) -> torch.Tensor:
    """[rows, 2]: (shift, log-sum) with logsumexp = shift + log-sum (stats layout)."""
    shift = x.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isinf(shift) & (shift < 0), torch.zeros_like(shift), shift)
    return torch.cat([shift, torch.log(torch.exp(x - shift).sum(dim=-1, keepdim=True))], dim=1)


def _terms(a, b, kind: str, beta: float):
    """Log-probabilities, probabilities, what each side's log is compared with, and the row sums
    S_P / S_Q (the loss is ``spec.row_loss(S_P, S_Q)``)."""
    log_p = _log_softmax(a)
    log_q = _log_softmax(b)
    prob_p, prob_q = log_p.exp(), log_q.exp()
    if kind == "js":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        ref_p = ref_q = log_m
    else:
        log_m = None
        ref_p, ref_q = log_q, log_p
    s_p = _zero_where_zero(prob_p * (log_p - ref_p), prob_p).sum(-1)
    s_q = _zero_where_zero(prob_q * (log_q - ref_q), prob_q).sum(-1)
    return log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q


def _row_grads(kind, beta, log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q, want_a, want_b):
    """Gradients of each row's loss w.r.t. the scaled logits a and b (before the 1/T factor)."""
    ga = gb = None
    if want_a:
        own = _zero_where_zero(prob_p * (log_p - ref_p - s_p[:, None]), prob_p)
        ga = {
            "js": lambda: beta * own,
            "kl_forward": lambda: own,
            "kl_reverse": lambda: prob_p - prob_q,
            "kl_symmetric": lambda: own + (prob_p - prob_q),
        }[kind]()
    if want_b:
        own = _zero_where_zero(prob_q * (log_q - ref_q - s_q[:, None]), prob_q)
        gb = {
            "js": lambda: (1.0 - beta) * own,
            "kl_forward": lambda: prob_q - prob_p,
            "kl_reverse": lambda: own,
            "kl_symmetric": lambda: own + (prob_q - prob_p),
        }[kind]()
    return ga, gb


def _gather_p(p, ref_index):
    return p if ref_index is None else p.index_select(0, ref_index)


def forward(p, q, ref_index, mask, spec):
    """``spec``: a ``modkern.ops.divergence.DivergenceSpec`` (kind, beta, 1/T, which gradients)."""
    kind, beta, inv_temperature = spec.kind, spec.beta, spec.inv_temperature
    need_grad_q = spec.need_grad_q
    acc = accumulation_dtype(p)
    a = _gather_p(p, ref_index).to(acc) * inv_temperature
    b = q.to(acc) * inv_temperature
    log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q = _terms(a, b, kind, beta)
    loss = spec.row_loss(s_p, s_q)
    store_p = spec.stores_grad_p(ref_index)
    ga, gb = _row_grads(kind, beta, log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q, store_p, need_grad_q)
    active = None if mask is None else mask[:, None]
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    stats = torch.cat([_shift_logsum(a), _shift_logsum(b), s_p[:, None], s_q[:, None]], dim=1)

    def finish(g, dtype):
        if g is None:
            return q.new_empty(0)
        g = g * inv_temperature
        if active is not None:
            g = torch.where(active, g, torch.zeros_like(g))
        return g.to(saved_grad_dtype(dtype))

    return loss, stats, finish(ga, p.dtype), finish(gb, q.dtype)


def _scale_rows(saved: torch.Tensor, grad_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (saved.to(grad_rows.dtype) * grad_rows[:, None]).to(dtype)


def backward(grad_rows, p, q, ref_index, mask, stats, saved_grad_p, saved_grad_q, spec):
    """p and q are read only on the shared-P path (ref_index with P's gradient)."""
    kind, beta, inv_temperature = spec.kind, spec.beta, spec.inv_temperature
    need_grad_p, need_grad_q = spec.need_grad_p, spec.need_grad_q
    grad_rows = grad_rows.to(accumulation_dtype(p))
    if mask is not None:
        grad_rows = torch.where(mask, grad_rows, torch.zeros_like(grad_rows))
    grad_q = _scale_rows(saved_grad_q, grad_rows, q.dtype) if need_grad_q else q.new_empty(0)
    if not need_grad_p:
        return p.new_empty(0), grad_q
    if ref_index is None:
        return _scale_rows(saved_grad_p, grad_rows, p.dtype), grad_q
    # Recompute each copy's gradient for its reference row and sum the copies (index_add_).
    acc = accumulation_dtype(p)
    a = _gather_p(p, ref_index).to(acc) * inv_temperature
    b = q.to(acc) * inv_temperature
    log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q = _terms(a, b, kind, beta)
    ga, _ = _row_grads(kind, beta, log_p, log_q, prob_p, prob_q, ref_p, ref_q, s_p, s_q, True, False)
    contrib = ga * (grad_rows[:, None] * inv_temperature)
    if mask is not None:
        contrib = torch.where(mask[:, None], contrib, torch.zeros_like(contrib))
    grad_p = torch.zeros(p.shape, dtype=acc, device=p.device).index_add_(0, ref_index, contrib)
    return grad_p.to(p.dtype), grad_q


def forward_with_grads(p, q, ref_index, mask, weight, spec):
    """The forward, then the backward with ``weight`` as every row's incoming gradient."""
    return composed.forward_with_grads(forward, backward, p, q, ref_index, mask, weight, spec)


scale_ = composed.scale_
