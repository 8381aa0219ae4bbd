"""fused_js / fused_kl against the float64 reference, for every backend that runs here.

Tolerances (per dtype of the logits). The reference runs in float64 on the *same* (already
rounded) inputs, so the only errors are fp32 accumulation in the kernels and the rounding of the
returned gradients to the input dtype:

* losses are accumulated and returned in fp32 whatever the input dtype: rtol 2e-5 covers fp32
  summation over V <= 1e4 terms; atol 2e-6 covers rows whose divergence is ~0.
* gradients are rounded to the input dtype: fp32 rtol 1e-4; fp16 (10-bit mantissa, ulp 2^-11
  relative) rtol 2e-3; bf16 (7-bit mantissa) rtol 1.6e-2 = 2 ulp, since the Triton interpreter
  truncates fp32 -> bf16 instead of rounding (SPEC §5). Elements near 0 (e.g. P - Q with P ~ Q)
  get an absolute allowance of that same relative size times the largest gradient of the case,
  plus fp16's subnormal spacing (6e-8), plus a floor of 1e-10: terms like P (log P - log Q - S)
  subtract fp32 quantities as large as the logits (1e4 in the huge-logit test), so elements whose
  true value is below ~1e-7 * |logit| * P are numerical noise in any fp32 implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, backend_params

import modkern
import modkern.reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6

# (public function, reference, keyword arguments)
CASES = {
    "js_0.1": (modkern.fused_js, ref.js_divergence, {"beta": 0.1}),
    "js_0.5": (modkern.fused_js, ref.js_divergence, {"beta": 0.5}),
    "js_0.9": (modkern.fused_js, ref.js_divergence, {"beta": 0.9}),
    "kl_forward": (modkern.fused_kl, ref.kl_divergence, {"direction": "forward"}),
    "kl_reverse": (modkern.fused_kl, ref.kl_divergence, {"direction": "reverse"}),
    "kl_symmetric": (modkern.fused_kl, ref.kl_divergence, {"direction": "symmetric"}),
}


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every tensor the ops allocate with torch.empty / empty_like starts as NaN (floats) or -1,
    so an element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


def _logits(shape, dtype, scale=3.0, requires_grad=True):
    x = (torch.randn(shape, device=DEVICE, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def _check_grad(actual, expected, dtype, extra_atol=0.0):
    assert actual is not None and actual.dtype == dtype
    assert torch.isfinite(actual).all()
    rtol = GRAD_RTOL[dtype]
    atol = rtol * expected.abs().max().item() + (6e-8 if dtype == torch.float16 else 0.0) + 1e-10 + extra_atol
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def _compare(case, p, q, backend, weights=None, grad_atol=0.0, **kw):
    """Run op and reference with reduction='none'; compare per-row values and the gradients of
    sum(weights * rows) for every input that requires grad."""
    fn, ref_fn, ckw = CASES[case]
    kw = {**ckw, **kw}
    out = fn(p, q, reduction="none", backend=backend, **kw)
    p64 = p.detach().double().requires_grad_(p.requires_grad)
    q64 = q.detach().double().requires_grad_(q.requires_grad)
    expected = ref_fn(p64, q64, reduction="none", **kw)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    inputs = [t for t in (p, q) if t.requires_grad]
    if not inputs:
        assert not out.requires_grad
        return out
    if weights is None:
        weights = torch.rand(out.shape, device=DEVICE, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    grads64 = torch.autograd.grad((expected * weights).sum(), [t for t in (p64, q64) if t.requires_grad])
    for g, g64 in zip(grads, grads64):
        _check_grad(g, g64, p.dtype, grad_atol)
    return out


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, vocab, dtype, backend):
    p = _logits((5, vocab), dtype)
    q = _logits((5, vocab), dtype)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    out = _compare(case, p, q, backend, mask=mask)
    assert out[1].item() == 0.0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["js_0.5", "kl_forward", "kl_symmetric"])
def test_many_blocks(case, backend, monkeypatch):
    # Rows much wider than one block: force a small block so the loops run many iterations.
    if backend == "triton":
        import modkern.kernels.divergence as kd

        monkeypatch.setattr(kd, "BLOCK_V_MAX", 64)
    _compare(case, _logits((3, 1000), torch.float32), _logits((3, 1000), torch.float32), backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("case", ["js_0.5", "kl_forward", "kl_reverse"])
def test_temperature(case, temperature, backend):
    _compare(case, _logits((4, 300), torch.float32), _logits((4, 300), torch.float32), backend, temperature=temperature)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["p", "q", "none"])
def test_gradient_to_one_input(case, which, backend):
    p = _logits((4, 257), torch.bfloat16, requires_grad=which == "p")
    q = _logits((4, 257), torch.bfloat16, requires_grad=which == "q")
    _compare(case, p, q, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", range(1, 8))
@pytest.mark.parametrize("case", ["js_0.5", "kl_forward", "kl_symmetric"])
def test_ref_index(case, k, dtype, backend):
    # k perturbed copies per clean row, interleaved and shuffled, plus one P row nobody uses.
    n_clean = 3
    ref_index = torch.arange(n_clean, device=DEVICE).repeat(k)
    ref_index = ref_index[torch.randperm(ref_index.numel(), device=DEVICE)]
    p = _logits((n_clean + 1, 333), dtype)
    q = _logits((ref_index.numel(), 333), dtype)
    mask = torch.rand(ref_index.numel(), device=DEVICE) > 0.25
    _compare(case, p, q, backend, ref_index=ref_index, mask=mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["js_0.5", "kl_symmetric"])
def test_float64_inputs_are_exact(case, backend):
    # float64 logits are computed in float64 by every backend (the GPU kernels hand them to the
    # PyTorch backend): values and gradients agree with the reference to fp64 rounding.
    fn, ref_fn, kw = CASES[case]
    p, q = _logits((3, 501), torch.float64), _logits((5, 501), torch.float64)
    ref_index = torch.tensor([2, 0, 2, 1, 0], device=DEVICE)
    mask = torch.tensor([True, True, False, True, True], device=DEVICE)
    out = fn(p, q, ref_index=ref_index, mask=mask, reduction="none", backend=backend, **kw)
    expected = ref_fn(p, q, ref_index=ref_index, mask=mask, reduction="none", **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    weights = torch.rand(5, device=DEVICE, dtype=torch.float64) + 0.5
    for g, g64 in zip(
        torch.autograd.grad((out * weights).sum(), [p, q]), torch.autograd.grad((expected * weights).sum(), [p, q])
    ):
        torch.testing.assert_close(g, g64, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", backend_params())
def test_ref_index_grad_p_only_shared_rows_zero_for_unused(backend):
    p = _logits((4, 50), torch.float32)
    q = _logits((3, 50), torch.float32)
    ref_index = torch.tensor([2, 0, 2], device=DEVICE)
    loss = modkern.fused_js(p, q, ref_index=ref_index, backend=backend)
    (gp,) = torch.autograd.grad(loss, [p])
    assert torch.equal(gp[1], torch.zeros_like(gp[1])) and torch.equal(gp[3], torch.zeros_like(gp[3]))
    assert gp[0].abs().sum() > 0 and gp[2].abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_single_row(case, backend):
    _compare(case, _logits((1, 4099), torch.float32), _logits((1, 4099), torch.float32), backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_all_masked_mean_is_zero(case, backend):
    fn, _, kw = CASES[case]
    p, q = _logits((3, 100), torch.float32), _logits((3, 100), torch.float32)
    mask = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    loss = fn(p, q, mask=mask, backend=backend, **kw)
    assert loss.item() == 0.0
    gp, gq = torch.autograd.grad(loss, [p, q])
    assert torch.equal(gp, torch.zeros_like(gp)) and torch.equal(gq, torch.zeros_like(gq))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_huge_logits(case, backend):
    # Magnitude 1e4: nearly one-hot distributions; max-subtraction keeps everything finite.
    # The gradients P (log P - log Q - S) subtract fp32 quantities of the logits' size: 4 ulps of
    # the largest logit are allowed (one-hot rows have all-0 gradients, so the relative allowance
    # of _check_grad is ~0 there). The Triton KL forward's one pass computes S from x - y
    # rather than from the backward's log P - log Q: both ~1 ulp of 1e4 from float64, but no
    # longer the same rounding (an error of ~1.4 ulps of the largest logit came out).
    p = _logits((3, 500), torch.float32, scale=1e4)
    q = _logits((3, 500), torch.float32, scale=1e4)
    ulps = 2.0**-21 * max(p.detach().abs().max().item(), q.detach().abs().max().item())
    out = _compare(case, p, q, backend, grad_atol=ulps)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_minus_inf_entries(case, dtype, backend):
    # Entries at -inf have probability exactly 0 (0 log 0 = 0, zero gradient there). KL needs
    # them in both rows at once (else it is +inf); JS takes them anywhere.
    p = _logits((4, 129), dtype, requires_grad=False)
    q = _logits((4, 129), dtype, requires_grad=False)
    hole = torch.rand(4, 129, device=DEVICE) < 0.3
    p[hole] = float("-inf")
    q[hole if case.startswith("kl") else torch.rand(4, 129, device=DEVICE) < 0.3] = float("-inf")
    p.requires_grad_()
    q.requires_grad_()
    out = _compare(case, p, q, backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", backend_params())
def test_reductions_and_num_items(backend):
    p, q = _logits((2, 3, 64), torch.float32), _logits((2, 3, 64), torch.float32)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    rows = modkern.fused_kl(p, q, mask=mask, reduction="none", backend=backend)
    assert rows.shape == (2, 3) and rows[0, 1] == 0 and rows[1, 2] == 0
    expected = ref.kl_divergence(p.double(), q.double(), mask=mask, reduction="none")
    torch.testing.assert_close(rows.double(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    total = expected.sum()
    for kwargs, want in [
        ({"reduction": "sum"}, total),
        ({"reduction": "mean"}, total / 4),
        ({"reduction": "mean", "num_items": 10}, total / 10),
        ({"reduction": "mean", "num_items": torch.tensor(8, device=DEVICE)}, total / 8),
    ]:
        got = modkern.fused_kl(p, q, mask=mask, backend=backend, **kwargs)
        torch.testing.assert_close(got.double(), want, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    # Gradient of the num_items mean is the gradient of the sum divided by num_items.
    (g_sum,) = torch.autograd.grad(modkern.fused_kl(p, q, mask=mask, reduction="sum", backend=backend), [q])
    (g_mean,) = torch.autograd.grad(modkern.fused_kl(p, q, mask=mask, num_items=10, backend=backend), [q])
    torch.testing.assert_close(g_mean, g_sum / 10)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_and_expanded_inputs(backend):
    base = _logits((2, 5, 80), torch.float32, requires_grad=False)
    p = base[:, :-1]  # non-contiguous rows (a shifted view, as in next-token losses)
    q = _logits((1, 4, 80), torch.float32, requires_grad=False).expand(2, 4, 80)  # stride-0 rows
    got = modkern.fused_js(p, q, reduction="none", backend=backend)
    want = ref.js_divergence(p.double(), q.double(), reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=LOSS_RTOL, atol=LOSS_ATOL)


@pytest.mark.parametrize("backend", backend_params())
def test_backward_twice_with_retain_graph(backend):
    # Stored gradients must not be scaled in place: a second backward gives the same result.
    p, q = _logits((3, 40), torch.float32), _logits((3, 40), torch.float32)
    loss = modkern.fused_js(p, q, backend=backend) * 3.0
    g1 = torch.autograd.grad(loss, [p, q], retain_graph=True)
    g2 = torch.autograd.grad(loss, [p, q])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_autograd_function_apply(backend):
    p, q = _logits((3, 70), torch.float32), _logits((3, 70), torch.float32)
    rows = modkern.FusedDivergence.apply(p, q, None, None, "kl_forward", 0.5, 1.0, backend)
    expected = ref.kl_divergence(p.double(), q.double(), reduction="none")
    torch.testing.assert_close(rows.double(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    rows.sum().backward()
    p64, q64 = p.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    ref.kl_divergence(p64, q64, reduction="sum").backward()
    _check_grad(p.grad, p64.grad, torch.float32)
    _check_grad(q.grad, q64.grad, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph(backend):
    p = _logits((4, 96), torch.float32)
    q = _logits((4, 96), torch.float32)
    mask = torch.tensor([True, True, False, True], device=DEVICE)

    def objective(p, q):
        return modkern.fused_js(p, q, mask=mask, backend=backend) + 0.5 * modkern.fused_kl(
            p.detach(), q, mask=mask, backend=backend
        )

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    loss = compiled(p, q)
    g = torch.autograd.grad(loss, [p, q])
    loss_eager = objective(p, q)
    g_eager = torch.autograd.grad(loss_eager, [p, q])
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_cpu():
    # The default (inductor) compiler on CPU, torch backend: traces through the custom ops.
    p = _logits((3, 50), torch.float32)
    q = _logits((3, 50), torch.float32)
    compiled = torch.compile(lambda p, q: modkern.fused_kl(p, q) + modkern.fused_js(p, q), fullgraph=True)
    loss = compiled(p, q)
    loss.backward()
    want = ref.kl_divergence(p.double(), q.double()) + ref.js_divergence(p.double(), q.double())
    torch.testing.assert_close(loss.double(), want, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    p = _logits((3, 33), torch.float32)
    q = _logits((5, 33), torch.float32)
    ref_index = torch.tensor([0, 2, 1, 2, 0], device=DEVICE)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    fwd_args = (p, q, ref_index, mask, "js", 0.3, 0.5, True, True, backend)
    torch.library.opcheck(torch.ops.modkern.divergence_fwd, fwd_args)
    torch.library.opcheck(
        torch.ops.modkern.divergence_fwd, (p, q[:3], None, None, "kl_forward", 0.5, 1.0, False, True, backend)
    )
    with torch.no_grad():
        _, stats, gp, gq = torch.ops.modkern.divergence_fwd(*fwd_args)
    grad_rows = torch.rand(5, device=DEVICE)
    bwd_args = (grad_rows, p.detach(), q.detach(), ref_index, mask, stats, gp, gq, "js", 0.3, 0.5, True, True, backend)
    torch.library.opcheck(torch.ops.modkern.divergence_bwd, bwd_args)


def test_backends_agree_on_realistic_row():
    # One vocabulary-sized row (V = 32064) through every backend that runs here.
    p, q = _logits((2, 32064), torch.bfloat16), _logits((2, 32064), torch.bfloat16)
    results = [modkern.fused_js(p, q, reduction="none", backend=b) for b in modkern.available_backends(DEVICE)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=LOSS_RTOL, atol=LOSS_ATOL)


def test_js_bounded_by_ln2():
    p = _logits((6, 200), torch.float32, scale=50.0, requires_grad=False)
    q = _logits((6, 200), torch.float32, scale=50.0, requires_grad=False)
    rows = modkern.fused_js(p, q, reduction="none")
    assert (rows >= 0).all() and (rows <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("backend", backend_params())
def test_liger_jsd_cross_check(backend):
    # Liger's JSD (a Triton kernel; on CPU it runs in the interpreter like ours) takes log-probs:
    # liger_jsd(student_logp, teacher_logp, beta) = beta KL(P_t||M) + (1-beta) KL(P_s||M) with
    # M = beta P_t + (1-beta) P_s. log_softmax is idempotent, so it sees our P (teacher) and Q.
    liger_jsd = pytest.importorskip("liger_kernel.transformers.functional").liger_jsd
    p = _logits((8, 4099), torch.float32, scale=4.0, requires_grad=False)
    q = _logits((8, 4099), torch.float32, scale=0.5)
    q_liger = q.detach().clone().requires_grad_()
    want = liger_jsd(torch.log_softmax(q_liger, -1), torch.log_softmax(p, -1), beta=0.2)
    got = modkern.fused_js(p, q, beta=0.2, backend=backend)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-6)
    want.backward()
    got.backward()
    torch.testing.assert_close(q.grad, q_liger.grad, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
def test_nan_logits_give_nan_rows_not_zero(case, backend):
    # a diverged model (NaN logits) must show up as a NaN loss, never as a silent 0; a masked-out
    # row holding NaN is ignored (0 and zero gradients) like any masked row
    fn, ref_fn, kw = CASES[case]
    p, q = _logits((4, 300), torch.float32), _logits((4, 300), torch.float32)
    with torch.no_grad():
        q[0, 3] = float("nan")
        p[1, 2] = float("nan")
        q[3, 7] = float("nan")
    mask = torch.tensor([True, True, True, False], device=DEVICE)
    out = fn(p, q, mask=mask, reduction="none", backend=backend, **kw)
    expected = ref_fn(p.detach().double(), q.detach().double(), mask=mask, reduction="none", **kw)
    assert torch.isnan(expected[:2]).all()
    assert torch.isnan(out[:2]).all(), out
    assert torch.isfinite(out[2]) and float(out[3]) == 0.0
    torch.testing.assert_close(out[2].double(), expected[2], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    gp, gq = torch.autograd.grad(out[2:].sum(), [p, q])
    assert torch.isfinite(gp[2:]).all() and torch.isfinite(gq[2:]).all()
    assert float(gq[3].abs().max()) == 0.0 and float(gp[3].abs().max()) == 0.0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["js_0.5", "kl_forward", "kl_symmetric"])
def test_fp16_gradients_survive_loss_scaling(case, backend):
    # Mixed-precision fp16 training multiplies the loss by a scale (GradScaler, 2^16) so that small
    # gradients stay representable. The forward stores each row's gradient before that scale is
    # known; in fp16 its small entries (P ~ 1e-6 here) would already be subnormal or 0. They are
    # kept in fp32 (saved_grad_dtype), so the result is the fp16 rounding of the scaled gradient.
    fn, ref_fn, kw = CASES[case]
    p = _logits((3, 2000), torch.float16, scale=6.0)
    q = _logits((3, 2000), torch.float16, scale=6.0)
    scale = 1024.0  # (a larger scale overflows fp16 for kl_symmetric here: GradScaler would back off)
    (gp, gq) = torch.autograd.grad(fn(p, q, backend=backend, **kw) * scale, [p, q])
    p64, q64 = p.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    expected = torch.autograd.grad(ref_fn(p64, q64, **kw) * scale, [p64, q64])
    for g, g64 in zip((gp, gq), expected):
        assert g.dtype == torch.float16
        target = g64.half()  # the best fp16 answer
        normal = target.abs() >= 6.1e-5
        assert int(normal.sum()) > 100
        # no normal fp16 entry lost to underflow (before the fix a third of them came back 0)
        assert not bool((g[normal] == 0).any())
        # fp16 rounding of an fp32 product, within 2 fp16 ulps (rtol 2^-10), plus the absolute
        # allowance of _check_grad for entries where fp32 terms of the size of the logits cancel
        _check_grad(g, g64, torch.float16)
        rel = ((g[normal].double() - target[normal].double()).abs() / target[normal].double().abs()).median()
        assert float(rel) < 1e-3


PEAKED_CASES = {
    "js_beta0.8": (modkern.fused_js, ref.js_divergence, {"beta": 0.8}),
    "kl_forward": (modkern.fused_kl, ref.kl_divergence, {"direction": "forward"}),
    "kl_symmetric": (modkern.fused_kl, ref.kl_divergence, {"direction": "symmetric"}),
}


@pytest.mark.parametrize("case", list(PEAKED_CASES))
@pytest.mark.parametrize("backend", backend_params())
def test_fp32_gradients_on_peaked_distributions(case, backend):
    # T = 0.5, logits of std 3 (scaled logits of std 6), V = 3001: peaked rows whose top entries
    # have log P ~ 0 next to a log-sum-exp ~ 20. Every backend's fp32 gradients within 1.5e-4
    # relative L2 error of float64 (forming lse = max + log-sum before subtracting it cost the
    # kernels ~3.5e-4 and torch's CPU log_softmax ~2.6e-4; see kernels/divergence_common.py lse_finish).
    check_peaked_gradients(case, backend)


def check_peaked_gradients(case, backend, **options):
    """The peaked-row precision bar, shared with tests/test_divergence_grad_mode.py."""
    fused, reference, kw = PEAKED_CASES[case]
    gen = torch.Generator().manual_seed(1)
    p32 = (torch.randn(4, 3001, generator=gen) * 3).to(DEVICE)
    q32 = (torch.randn(4, 3001, generator=gen) * 3).to(DEVICE)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        p = p32.to(dtype).requires_grad_()
        q = q32.to(dtype).requires_grad_()
        if dtype == torch.float64:
            loss = reference(p, q, temperature=0.5, reduction="sum", **kw)
        else:
            loss = fused(p, q, temperature=0.5, reduction="sum", backend=backend, **kw, **options)
        grads[dtype] = [g.double() for g in torch.autograd.grad(loss, (p, q))]
    for name, g32, g64 in zip(("p", "q"), grads[torch.float32], grads[torch.float64]):
        err = float((g32 - g64).norm() / g64.norm())
        assert err <= 1.5e-4, f"grad {name}: relative L2 error {err:.3g} vs float64"


def _divergence_node(out, name="FusedDivergence"):
    """The first autograd node of ``out``'s graph whose type name contains ``name``."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return node
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError(f"no {name} node in the graph")


@pytest.mark.parametrize("backend", backend_params())
def test_backward_keeps_only_what_it_reads(backend):
    # A backend that stores the gradients (torch, CUDA) only scales them in the backward: the
    # logits are not kept alive (stride-0 stand-ins carry their shape) unless ref_index shares P
    # rows and P's gradient is wanted. The Triton backend recomputes every gradient from p, q and
    # the row statistics, so it keeps them whenever a gradient is wanted - and stores none.
    from modkern.ops.divergence.api import IMPLS, STORES_GRADIENTS

    stores = STORES_GRADIENTS[IMPLS.name(backend, DEVICE, (torch.float32,))]
    p = _logits((4, 64), torch.float32)
    q = _logits((4, 64), torch.float32)
    for p_in, ref_index, shared in ((p.detach(), None, False), (p, None, False), (p, [0, 1, 1, 3], True)):
        ref = None if ref_index is None else torch.tensor(ref_index, device=DEVICE)
        loss = modkern.fused_kl(p_in, q, ref_index=ref, backend=backend)
        saved = _divergence_node(loss).saved_tensors
        big = [t for t in saved if t is not None and t.dim() == 2 and t.shape[1] == 64 and t.stride(0) != 0]
        ptrs = {t.data_ptr() for t in big}
        keeps = shared or not stores
        assert (p.data_ptr() in ptrs and q.data_ptr() in ptrs) == keeps
        # stored gradients: one [R, V] per wanted gradient that is not recomputed; none on Triton
        stored = [t for t in big if t.data_ptr() not in (p.data_ptr(), q.data_ptr())]
        assert len(stored) == (0 if not stores else (1 if p_in is not p or shared else 2))
        loss.backward()


@pytest.mark.parametrize("backend", backend_params())
def test_masked_rows_are_not_read(backend):
    # Masked-out rows contribute nothing, whatever they hold: NaN logits there leave the loss and
    # every gradient finite (the Triton kernels do not even load them).
    p = _logits((5, 300), torch.float32)
    q = _logits((5, 300), torch.float32)
    with torch.no_grad():
        p[1] = float("nan")
        q[3] = float("nan")
    mask = torch.tensor([True, False, True, False, True], device=DEVICE)
    loss = modkern.fused_js(p, q, mask=mask, beta=0.3, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert (p.grad[1] == 0).all() and (q.grad[3] == 0).all()


try:  # the probe of the Triton kernels' fast log2 / exp2 (triton is optional)
    import triton
    import triton.language as tl
    from modkern.kernels.divergence_common import fast_log2

    @triton.jit
    def _fast_math_probe(x_ptr, y_ptr, log_out, exp_out, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(log_out + offs, fast_log2(tl.load(x_ptr + offs)))
        tl.store(exp_out + offs, tl.exp2(tl.load(y_ptr + offs)))

except ImportError:  # pragma: no cover - without triton
    _fast_math_probe = None


@pytest.mark.skipif(
    _fast_math_probe is None or "triton" not in modkern.available_backends(DEVICE), reason="no Triton here"
)
def test_fast_log2_and_exp2_accuracy():
    # The per-element log of the Triton kernels: lg2.approx on a GPU (tl.log2 in the interpreter),
    # on x = 1 + e, e in [0, 1]; and ex2.approx.ftz on [-30, 0]. The accuracy argument in
    # kernels/divergence_common.py (fast_log2) assumes ~2^-22 absolute (log2) / relative (exp2) error.
    n = 4096
    x = torch.linspace(1.0, 2.0, n, device=DEVICE)
    y = torch.linspace(-30.0, 0.0, n, device=DEVICE)
    lg, ex = torch.empty_like(x), torch.empty_like(y)
    _fast_math_probe[(1,)](x, y, lg, ex, N=n)
    log_err = (lg.double() - torch.log2(x.double())).abs().max().item()
    exp_err = ((ex.double() - torch.exp2(y.double())) / torch.exp2(y.double())).abs().max().item()
    assert log_err <= 2**-21, log_err
    assert exp_err <= 2**-21, exp_err


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_near_identical_rows(direction, temperature, backend):
    # The consistency loss's usual regime: Q's logits are P's plus noise of std 1.4e-3 (and a
    # common offset of 1 in half the rows): KL ~ 1e-6. The Triton forward is one pass for KL
    # (KL = E_P[a - b] - (lse_a - lse_b), kernels/divergence_common.py): the two terms cancel here.
    # Measured vs float64 (8 rows, fp32, V = 3001 / 32064, T = 1 / 0.5), relative error median
    # (max): forward / reverse one-pass 2-5% (0.5), two-pass 5-13% (0.4) - a single direction's
    # KL ~ 1e-6 is ~1e-7 absolute from the fp32 log-sum-exps alone, in any fp32 implementation;
    # symmetric (the log-sum-exps cancel) one-pass 0.3-2.5e-5 (1e-3), two-pass 1-2e-5 (1e-4).
    # Here: max absolute error of one direction 1.1-1.9e-7 Triton, 1.8-2.2e-7 torch; symmetric
    # max relative error 0.8-2.6e-4 Triton, 3.6-5.4e-5 torch.
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 6, 4099  # 4099: more than one block of the Triton kernels, and a tail
    base = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    noise = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 1.4e-3
    offset = (torch.arange(rows, dtype=torch.float64) % 2).unsqueeze(1)
    p = base.float().to(DEVICE)
    q = (base + noise + offset).float().to(DEVICE)
    kw = {"direction": direction, "temperature": temperature, "reduction": "none"}
    out = modkern.fused_kl(p, q, backend=backend, **kw).double()
    expected = ref.kl_divergence(p.double(), q.double(), **kw)
    assert float(expected.max()) < 2e-5
    err = (out - expected).abs()
    if direction == "symmetric":
        assert float((err / expected).max()) <= 1e-3, err / expected
    else:
        # a few fp32 ulps of the log-sum-exps (~10), not of the KL
        assert float(err.max()) <= 4e-7, err
