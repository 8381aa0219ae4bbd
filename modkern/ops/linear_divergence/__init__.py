"""``fused_linear_kl`` / ``fused_linear_js``: the divergence of the LM-head logits of two branches,
from their hidden states, chunk by chunk over rows.

``api`` (custom ops, autograd, the public functions and the chunked losses the objective uses) and
``reference`` (the float64 spec); it runs the divergence family's backends chunk by chunk.
"""

from modkern.ops.linear_divergence.api import (
    default_chunk_size,
    fused_linear_js,
    fused_linear_kl,
    linear_losses,
    linear_losses_fwd,
    token_ce_rows,
)

__all__ = [
    "default_chunk_size",
    "fused_linear_js",
    "fused_linear_kl",
    "linear_losses",
    "linear_losses_fwd",
    "token_ce_rows",
]
