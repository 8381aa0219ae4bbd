"""``fused_linear_js`` / ``fused_linear_kl``: the divergence from LM-head hidden states, forward + backward.

The consistency term of the robust objective with long answers: ``N`` answer rows of both branches
(``p_hidden`` the detached clean branch, ``q_hidden`` the perturbed one, which gets the gradient),
the LM-head weight ``[V, H]`` (gets the gradient), ``detach_p_logits=True``. GPU: N = 8192,
H = 4096, V = 152064, bf16 (the issue's case); CPU: a small smoke-test shape.

Providers:

- ``modkern-<backend>``: ``fused_linear_js`` / ``fused_linear_kl`` (chunks of rows from a memory
  budget; per chunk the divergence kernels of that backend);
- ``eager-chunked``: the memory-bounded way to write it in PyTorch: per chunk of rows the logits
  and the reference divergence under non-reentrant ``torch.utils.checkpoint`` (the chunk's logits
  are recomputed in the backward), chunk size as modkern's;
- ``eager-full``: the full ``[N, V]`` logits of both branches and the reference divergence;
- ``liger`` (JSD only, GPU): ``LigerFusedLinearJSD(jsd_beta=0.5)`` with the clean branch as its
  teacher (``teacher_weight = weight.detach()``).

Time: the median of one forward + backward to ``q_hidden`` and ``weight``; peak memory above
what was allocated before the call (CUDA).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _harness import DEVICE, ON_CUDA, liger_status, measure, modkern_skip_reason
from torch.utils.checkpoint import checkpoint

from modkern import fused_linear_js, fused_linear_kl, reference
from modkern.ops.linear_divergence import default_chunk_size

if ON_CUDA or os.environ.get("MODKERN_BENCH_PLAN") == "gpu":
    N, H, V, DTYPE = 8192, 4096, 152064, torch.bfloat16
else:  # smoke-test size: checks that the suite works on CPU, measures nothing useful
    N, H, V, DTYPE = 256, 128, 32064, torch.float32
CHUNK = default_chunk_size(N, V)

OPS = {
    "fused_linear_js": (fused_linear_js, reference.js_divergence, {"beta": 0.5}),
    "fused_linear_kl": (fused_linear_kl, reference.kl_divergence, {"direction": "forward"}),
}


def _inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda *shape, s: (torch.randn(*shape, generator=gen, device=DEVICE) * s).to(DTYPE)
    p = rand(N, H, s=1.0)
    q = (p.float() + 0.1 * torch.randn(N, H, generator=gen, device=DEVICE)).to(DTYPE).requires_grad_(True)
    w = rand(V, H, s=H**-0.5).requires_grad_(True)
    return p, q, w


def _eager_chunked(ref, kwargs):
    def piece(p_rows, q_rows, weight):
        p_logits = F.linear(p_rows, weight).detach()
        return ref(p_logits, F.linear(q_rows, weight), reduction="sum", **kwargs)

    def loss(p, q, w):
        total = 0.0
        for start in range(0, N, CHUNK):
            rows = slice(start, start + CHUNK)
            total = total + checkpoint(piece, p[rows], q[rows], w, use_reentrant=False)
        return total / N

    return loss


def _loss_fn(provider, op):
    fused, ref, kwargs = OPS[op]
    if provider.startswith("modkern-"):
        backend = provider.split("-", 1)[1]
        return lambda p, q, w: fused(p, q, w, detach_p_logits=True, backend=backend, **kwargs)
    if provider == "eager-chunked":
        return _eager_chunked(ref, kwargs)
    if provider == "eager-full":
        return lambda p, q, w: ref(F.linear(p, w).detach(), F.linear(q, w), **kwargs)
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.5)
    return lambda p, q, w: jsd(q, w, p, w.detach(), None)


def _providers():
    params = []
    for backend in ("torch", "triton", "cuda"):
        reason = modkern_skip_reason(backend)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(f"modkern-{backend}", marks=marks, id=f"modkern-{backend}"))
    params += [pytest.param("eager-chunked", id="eager-chunked"), pytest.param("eager-full", id="eager-full")]
    status = liger_status()
    marks = [pytest.mark.skip(reason=status)] if status != "ok" else []
    params.append(pytest.param("liger", marks=marks, id="liger"))
    return params


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("op", list(OPS))
def test_linear_divergence(benchmark, op, provider):
    if provider == "liger" and op != "fused_linear_js":
        pytest.skip("Liger's fused-linear KL takes a target distribution, not the teacher's hidden states")
    p, q, w = _inputs()
    loss_fn = _loss_fn(provider, op)

    def step():
        loss = loss_fn(p, q, w)
        grads = torch.autograd.grad(loss, (q, w))
        return (loss.detach(), *grads)

    info = dict(
        op=op,
        mode="fwd_bwd_q_w",
        provider=provider,
        shape=f"N={N} H={H} V={V} chunk={CHUNK}",
        dtype=str(DTYPE).removeprefix("torch."),
    )
    measure(benchmark, step, bytes_moved=None, info=info)
