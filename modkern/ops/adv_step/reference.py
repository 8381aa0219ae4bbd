"""Reference PGD step on embeddings (the executable spec of ``masked_adv_step``).

Written for reading, not speed: every function runs in the dtype it is given (pass float64 for
ground truth) and follows SPEC §1 step by step.

``masked_adv_step`` - one projected-gradient update of a perturbation ``delta [B, L, H]``
restricted to the tokens selected by ``mask [B, L]`` (nonzero = selected):

1. ``g = grad`` on selected tokens, 0 elsewhere (``torch.where``, so a NaN/inf in the gradient of an
   unselected token cannot leak in, as ``grad * mask`` would let it);
2. step direction ``d``: ``raw`` g; ``sign`` sign(g); ``l2`` g / max(||g_b||_2, 1e-12) per sample b
   over its (L x H) block; ``l2_token`` g / max(||g_bl||_2, 1e-12) per token; ``linf``
   g / max(max|g_b|, 1e-12) per sample;
3. ``delta' = delta + alpha * d``, restricted to the selected tokens;
4. projection: ``linf`` clamp to [-eps, eps]; ``l2`` scale sample b by eps / ||delta'_b||_2 when that
   norm exceeds eps; ``l2_token`` the same per token; ``None`` nothing.

SPEC §1 writes the restriction to the mask after the projection. Here it comes before it, which
makes the ``l2`` projection the exact Euclidean projection onto the feasible set
``{||delta_b|| <= eps, delta = 0 outside the mask}``. The two orders agree whenever ``delta`` is
already 0 outside the mask - always the case in the PGD loop, where ``delta`` comes from
``init_delta`` (zero outside the mask) and from earlier steps; for ``linf`` / ``l2_token`` / ``None``
they agree for every input (the projection acts per element or per token).

Every division is guarded (1e-12 floors, ``eps / max(norm, eps)``), so a sample with an empty mask
or an all-zero gradient stays finite.
"""

from __future__ import annotations

import torch

STEPS = ("raw", "sign", "l2", "l2_token", "linf")
NORMS = ("linf", "l2", "l2_token", None)
TINY = 1e-12


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_adv_step(delta, grad, mask, *, alpha, epsilon, step="raw", norm="linf"):
    """``delta'`` (a new tensor, in the dtype of ``delta``) after one masked PGD step.

    ``alpha`` / ``epsilon``: Python numbers or 0-dim tensors. ``epsilon`` is unused when ``norm``
    is None.
    """
    sel = _as_bool(mask)[..., None]  # [B, L, 1]
    g = torch.where(sel, grad.to(delta.dtype), torch.zeros((), dtype=delta.dtype, device=delta.device))

    if step == "raw":
        d = g
    elif step == "sign":
        d = torch.sign(g)
    elif step == "l2":
        d = g / g.square().sum(dim=(1, 2), keepdim=True).sqrt().clamp_min(TINY)
    elif step == "l2_token":
        d = g / g.square().sum(dim=2, keepdim=True).sqrt().clamp_min(TINY)
    elif step == "linf":
        d = g / g.abs().amax(dim=(1, 2), keepdim=True).clamp_min(TINY)
    else:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")

    new = torch.where(sel, delta + alpha * d, torch.zeros_like(delta))

    if norm is None:
        return new
    if norm == "linf":
        return torch.clamp(new, -epsilon, epsilon)
    if norm == "l2":
        length = new.square().sum(dim=(1, 2), keepdim=True).sqrt()
    elif norm == "l2_token":
        length = new.square().sum(dim=2, keepdim=True).sqrt()
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    # eps / max(length, eps) is min(1, eps / length) without a 0/0 for an all-zero block.
    eps = torch.as_tensor(epsilon, dtype=new.dtype, device=new.device)
    return new * (eps / torch.maximum(length, eps))
