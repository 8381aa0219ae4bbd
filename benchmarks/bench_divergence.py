"""``fused_js`` / ``fused_kl``: forward, forward+backward with one gradient (q) and with two (p, q).

Providers: modkern per backend; the eager reference (``modkern.reference``); ``torch.compile`` of
the reference; Liger-Kernel (``log_softmax`` of both logits - counted in its time - then
``liger_jsd`` / ``liger_kl_div``; Liger returns no gradient for its target, so it has no
two-gradient case).

Bytes (SPEC §4, R rows x V vocabulary, e bytes per element): forward 2·R·V·e (read P and Q);
one gradient 3·R·V·e (+ write dQ); two gradients 4·R·V·e (+ write dP).
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import DEVICE, ON_CUDA, compiled, cycling, liger_status, measure, provider_params, rotation_sets

import modkern
from modkern import reference

# MODKERN_BENCH_PLAN=gpu: collect the GPU cases on any machine (gpu_check.sh --dry-run checks its selections)
if ON_CUDA or os.environ.get("MODKERN_BENCH_PLAN") == "gpu":
    SHAPES = [(r, v) for r in (1024, 4096) for v in (32064, 152064)]
    DTYPES = (torch.bfloat16, torch.float32)
else:  # smoke-test sizes: the CPU run checks that the suite works, it measures nothing useful
    SHAPES = [(256, 4096)]
    DTYPES = (torch.float32,)

# mode -> (number of gradients, grad_mode); the "_forward_grads" modes time the one-read forward
# that writes the gradients (modkern-triton only: elsewhere it is the same forward + backward)
MODES = {
    "fwd": (0, "backward"),
    "fwd_bwd_q": (1, "backward"),
    "fwd_bwd_pq": (2, "backward"),
    "fwd_bwd_q_forward_grads": (1, "forward"),
    "fwd_bwd_pq_forward_grads": (2, "forward"),
}
OPS = {
    "fused_js": (modkern.fused_js, reference.js_divergence, {"beta": 0.5}),
    "fused_kl": (modkern.fused_kl, reference.kl_divergence, {"direction": "forward"}),
}


def _liger_loss(op):
    from liger_kernel.transformers.functional import liger_jsd, liger_kl_div

    # Liger takes log-probabilities: input = log Q (student, gets the gradient), target = log P.
    # log_softmax stays in the logits' dtype (what costs Liger least).
    if op == "fused_js":
        return lambda p, q: liger_jsd(torch.log_softmax(q, -1), torch.log_softmax(p, -1), beta=0.5)
    return lambda p, q: liger_kl_div(
        torch.log_softmax(q, -1), torch.log_softmax(p, -1), reduction="batchmean", log_target=True
    )


def _loss_fn(provider, op, grad_mode="backward"):
    fused, ref, kwargs = OPS[op]
    if provider.startswith("modkern-"):
        backend = provider.split("-", 1)[1]
        return lambda p, q: fused(p, q, backend=backend, grad_mode=grad_mode, **kwargs)
    if provider == "eager":
        return lambda p, q: ref(p, q, **kwargs)
    if provider == "compile":
        f = compiled(ref)
        return lambda p, q: f(p, q, **kwargs)
    if provider == "liger":
        return _liger_loss(op)
    raise AssertionError(provider)


def _call(loss_fn, p, q, n_grads):
    if n_grads == 0:
        return lambda: loss_fn(p, q)
    wrt = (q,) if n_grads == 1 else (p, q)
    return lambda: torch.autograd.grad(loss_fn(p, q), wrt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"R{s[0]}xV{s[1]}")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("provider", provider_params(liger=liger_status()))
def test_divergence(benchmark, provider, op, mode, shape, dtype):
    n_grads, grad_mode = MODES[mode]
    if provider == "liger" and n_grads == 2:
        pytest.skip("Liger's JSD / KL return no gradient for the target (p) logits")
    if grad_mode == "forward" and provider != "modkern-triton":
        pytest.skip("grad_mode='forward' has its own kernel on the Triton backend only")
    rows, vocab = shape
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (2 + n_grads) * rows * vocab * elem
    loss_fn = _loss_fn(provider, op, grad_mode)

    calls = []
    for _ in range(rotation_sets(2 * rows * vocab * elem)):
        p = torch.randn(rows, vocab, device=DEVICE, dtype=dtype).mul_(3).requires_grad_(n_grads == 2)
        q = torch.randn(rows, vocab, device=DEVICE, dtype=dtype).mul_(3).requires_grad_(n_grads >= 1)
        calls.append(_call(loss_fn, p, q, n_grads))
    fn = cycling(calls)

    measure(
        benchmark,
        fn,
        bytes_moved=bytes_moved,
        info=dict(op=op, mode=mode, provider=provider, shape=f"R={rows} V={vocab}", dtype=str(dtype)[6:]),
    )
