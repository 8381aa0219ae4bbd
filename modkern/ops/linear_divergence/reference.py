"""Reference fused-linear divergences: the LM head's full logits, then the reference divergence.

``logits = hidden @ weight.T (+ bias)`` for both branches, then
:func:`modkern.reference.kl_divergence` / :func:`modkern.reference.js_divergence`. The full
``[rows, V]`` logits exist here - exactly what ``modkern.fused_linear_kl`` / ``_js`` avoid.
"""

from __future__ import annotations

import torch.nn.functional as F

from modkern.ops.divergence.reference import js_divergence, kl_divergence


def _logits(hidden, weight, bias, detach):
    logits = F.linear(hidden, weight, bias)
    return logits.detach() if detach else logits


def linear_kl_divergence(p_hidden, q_hidden, weight, bias=None, *, detach_p_logits=False, **kwargs):
    """``kl_divergence`` of the two branches' logits (``kwargs`` as there)."""
    p = _logits(p_hidden, weight, bias, detach_p_logits)
    return kl_divergence(p, F.linear(q_hidden, weight, bias), **kwargs)


def linear_js_divergence(p_hidden, q_hidden, weight, bias=None, *, detach_p_logits=False, **kwargs):
    """``js_divergence`` of the two branches' logits (``kwargs`` as there)."""
    p = _logits(p_hidden, weight, bias, detach_p_logits)
    return js_divergence(p, F.linear(q_hidden, weight, bias), **kwargs)
