"""``masked_adv_step`` (raw+linf, l2+l2) and ``perturb`` (forward; forward+backward to delta).

Providers: modkern per backend; the eager reference (``modkern.ops.adv_step.reference``);
``torch.compile`` of the reference.

Bytes (SPEC §4; N = B·L·H elements, e_d / e_g / e_x bytes per delta / grad / embeds element,
the mask is bool [B, L]):

- step: read delta, grad, mask; write delta: N·(2·e_d + e_g) + B·L. The per-sample ``l2`` needs a
  reduction before the update (a second read, or the analytic norm); the count stays the minimal
  one, so ``l2+l2`` cannot reach the copy bandwidth.
- perturb forward: read embeds, delta, mask; write out: N·(2·e_x + e_d) + B·L.
- perturb forward+backward to delta: + read the output gradient and the mask, write dDelta:
  N·(3·e_x + 2·e_d) + 2·B·L.
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import DEVICE, ON_CUDA, compiled, cycling, measure, modkern_op, nbytes, provider_params, rotation_sets

try:
    from modkern import reference as ref
except ImportError:  # pragma: no cover - lands with issue 3
    ref = None

# MODKERN_BENCH_PLAN=gpu: collect the GPU cases on any machine (gpu_check.sh --dry-run checks its selections)
if ON_CUDA or os.environ.get("MODKERN_BENCH_PLAN") == "gpu":
    SHAPE = (18, 1000, 4096)  # LLaVA-1.5-7B PGD batch (SPEC §3): 74M elements
    DELTA_DTYPES = (torch.float32, torch.bfloat16)
else:  # smoke-test size; one delta dtype keeps the torch.compile warm-ups few
    SHAPE = (4, 128, 512)
    DELTA_DTYPES = (torch.float32,)
GRAD_DTYPE = torch.bfloat16
EMBED_DTYPE = torch.bfloat16
ALPHA, EPSILON = 0.1, 1e-3
STEP_CONFIGS = {"raw+linf": ("raw", "linf"), "l2+l2": ("l2", "l2")}

_step_op, _step_missing = modkern_op("masked_adv_step")
_perturb_op, _perturb_missing = modkern_op("perturb")
_REF_MISSING = None if ref is not None else "modkern.ops.adv_step.reference is not importable yet"


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _shape_label():
    b, seq, h = SHAPE
    return f"B={b} L={seq} H={h}"


def _mask():
    b, seq, _ = SHAPE
    return torch.rand(b, seq, device=DEVICE) < 0.6


def _check_reference(provider):
    if provider in ("eager", "compile") and _REF_MISSING:
        pytest.skip(_REF_MISSING)


@pytest.mark.parametrize("delta_dtype", DELTA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
@pytest.mark.parametrize("provider", provider_params(op_available=_step_missing))
def test_masked_adv_step(benchmark, provider, config, delta_dtype):
    _check_reference(provider)
    step, norm = STEP_CONFIGS[config]
    kwargs = dict(alpha=ALPHA, epsilon=EPSILON, step=step, norm=norm)
    if provider.startswith("modkern-"):
        backend = provider.split("-", 1)[1]
        op = lambda d, g, m: _step_op(d, g, m, inplace=True, backend=backend, **kwargs)
    else:
        f = ref.masked_adv_step if provider == "eager" else compiled(ref.masked_adv_step)
        op = lambda d, g, m: f(d, g, m, **kwargs)

    calls, bytes_moved = [], None
    for _ in range(rotation_sets(nbytes(torch.empty(SHAPE, dtype=delta_dtype)) * 2)):
        delta = (torch.rand(SHAPE, device=DEVICE) * 2 - 1).mul_(EPSILON).to(delta_dtype)
        grad = torch.randn(SHAPE, device=DEVICE, dtype=GRAD_DTYPE)
        mask = _mask()
        bytes_moved = 2 * nbytes(delta) + nbytes(grad) + nbytes(mask)
        calls.append(lambda d=delta, g=grad, m=mask: op(d, g, m))
    fn = cycling(calls)
    measure(
        benchmark,
        fn,
        bytes_moved=bytes_moved,
        info=dict(
            op="masked_adv_step",
            mode=config,
            provider=provider,
            shape=_shape_label(),
            dtype=f"delta {_dtype_id(delta_dtype)}, grad {_dtype_id(GRAD_DTYPE)}",
        ),
    )


@pytest.mark.parametrize("delta_dtype", DELTA_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd_delta"])
@pytest.mark.parametrize("provider", provider_params(op_available=_perturb_missing))
def test_perturb(benchmark, provider, mode, delta_dtype):
    _check_reference(provider)
    if provider.startswith("modkern-"):
        backend = provider.split("-", 1)[1]
        op = lambda x, d, m: _perturb_op(x, d, m, backend=backend)
    else:
        op = ref.perturb if provider == "eager" else compiled(ref.perturb)

    with_grad = mode == "fwd_bwd_delta"
    calls, bytes_moved = [], None
    for _ in range(rotation_sets(nbytes(torch.empty(SHAPE, dtype=EMBED_DTYPE)) * 2)):
        embeds = torch.randn(SHAPE, device=DEVICE, dtype=EMBED_DTYPE)
        delta = (torch.rand(SHAPE, device=DEVICE) * 2 - 1).mul_(EPSILON).to(delta_dtype)
        mask = _mask()
        bytes_moved = 2 * nbytes(embeds) + nbytes(delta) + nbytes(mask)
        if with_grad:
            delta.requires_grad_(True)
            grad_out = torch.randn(SHAPE, device=DEVICE, dtype=EMBED_DTYPE)
            bytes_moved += nbytes(grad_out) + nbytes(delta) + nbytes(mask)
            calls.append(
                lambda x=embeds, d=delta, m=mask, go=grad_out: torch.autograd.grad(op(x, d, m), d, grad_outputs=go)[0]
            )
        else:
            calls.append(lambda x=embeds, d=delta, m=mask: op(x, d, m))
    fn = cycling(calls)
    measure(
        benchmark,
        fn,
        bytes_moved=bytes_moved,
        info=dict(
            op="perturb",
            mode=mode,
            provider=provider,
            shape=_shape_label(),
            dtype=f"embeds {_dtype_id(EMBED_DTYPE)}, delta {_dtype_id(delta_dtype)}",
        ),
    )
