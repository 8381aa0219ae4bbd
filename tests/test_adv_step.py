"""masked_adv_step: every backend against the float64 reference (modkern.ops.adv_step.reference)."""

import pytest
import torch
from conftest import DEVICE, backend_params

import modkern
from modkern.ops.adv_step.reference import masked_adv_step as ref_step

STEPS = ("raw", "sign", "l2", "l2_token", "linf")
NORMS = ("linf", "l2", "l2_token", None)
EPS, ALPHA = 0.05, 0.03

# Tolerances, relative to the reference's magnitude (|out - ref| <= RTOL * (|ref| + max|ref|/50)):
# fp32: the kernels accumulate norms over <= a few hundred elements in fp32 (error ~ sqrt(n) * 6e-8)
#       and the analytic L2 norm adds a few ulps; 1e-5 leaves a wide margin.
# bf16 / fp16 delta: the result is rounded once to the storage dtype (half an ulp, 2^-9 / 2^-12
#       relative) and the Triton interpreter truncates fp32 -> bf16 casts (a full ulp, 2^-8), on
#       top of the fp32 arithmetic: 2^-7 for bf16 and 2^-10 for fp16.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-12}


def assert_close_to_ref(out, ref, dtype):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item() / 50 + 1e-30
    err = (out - ref).abs()
    bound = RTOL[dtype] * (ref.abs() + scale)
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, worst excess {(err - bound).max().item():.3e}"


def make_inputs(B=4, L=5, H=37, delta_dtype=torch.float32, grad_dtype=torch.float32, poison=True):
    """Random delta (samples at different scales, so L2 projections both fire and do not), random
    grad and mask, with sample 1 fully masked out and sample 2's gradient all zero (when B > 2)."""
    scale = torch.tensor([EPS, 1e-4, EPS / 3, 2 * EPS, EPS])[:B].repeat((B + 4) // 5)[:B]
    delta = torch.randn(B, L, H, device=DEVICE) * scale.to(DEVICE)[:, None, None]
    grad = torch.randn(B, L, H, device=DEVICE)
    mask = torch.rand(B, L, device=DEVICE) > 0.3
    mask[0, 0] = True
    if B > 2:
        mask[1] = False
        grad[2] = 0.0
    if poison:  # whatever lies off the mask must not leak into the result
        delta = torch.where(mask[..., None], delta, torch.full_like(delta, float("nan")))
        grad = torch.where(mask[..., None], grad, torch.full_like(grad, float("nan")))
    return delta.to(delta_dtype), grad.to(grad_dtype), mask


def reference(delta, grad, mask, step, norm, alpha=ALPHA, eps=EPS):
    return ref_step(delta.double(), grad.double(), mask, alpha=alpha, epsilon=eps, step=step, norm=norm)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("step", STEPS)
def test_every_step_and_norm(backend, step, norm):
    delta, grad, mask = make_inputs()
    expected = reference(delta, grad, mask, step, norm)
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, step=step, norm=norm, backend=backend)
    assert out is delta  # inplace by default; every element was NaN or stale before
    assert_close_to_ref(out, expected, torch.float32)
    # Empty-mask sample: exactly 0. Zero-gradient sample: finite, only projected.
    assert (out[1] == 0).all()
    assert torch.isfinite(out[2]).all()


def test_reference_projection_is_exercised():
    # Guards the inputs above: the L2 projection must clip some samples and leave others alone.
    delta, grad, mask = make_inputs()
    norms = reference(delta, grad, mask, "raw", "l2").norm(dim=(1, 2))
    assert (norms - EPS).abs().min() < 1e-9 and (norms < EPS * 0.9).any()
    clamped = reference(delta, grad, mask, "raw", "linf").abs()
    assert (clamped == EPS).any() and (clamped < EPS).any()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "delta_dtype,grad_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
)
@pytest.mark.parametrize("step,norm", [("raw", "linf"), ("l2", "l2"), ("l2_token", "l2_token"), ("linf", None)])
def test_dtypes(backend, delta_dtype, grad_dtype, step, norm):
    delta, grad, mask = make_inputs(B=3, L=7, H=24, delta_dtype=delta_dtype, grad_dtype=grad_dtype)
    expected = reference(delta, grad, mask, step, norm)  # the same (rounded) inputs, in float64
    out = modkern.masked_adv_step(
        delta, grad, mask, alpha=ALPHA, epsilon=EPS, step=step, norm=norm, inplace=False, backend=backend
    )
    assert out.dtype == delta_dtype and out.shape == delta.shape
    assert_close_to_ref(out, expected, delta_dtype)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("step", STEPS)
def test_triton_several_h_chunks(monkeypatch, step, norm):
    """H = 37 split into 16-wide chunks: the looped path (per-token stats pass, analytic token norm)."""
    if "triton" not in modkern.available_backends(DEVICE):
        pytest.skip("triton cannot run on this device")
    import modkern.kernels.adv_step as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_H", 16)
    delta, grad, mask = make_inputs(B=3, L=6, H=37)
    expected = reference(delta, grad, mask, step, norm)
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, step=step, norm=norm, backend="triton")
    assert_close_to_ref(out, expected, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("step,norm", [("raw", "linf"), ("l2", "l2"), ("linf", "l2_token")])
def test_batch_of_one_and_long_rows(backend, step, norm):
    delta, grad, mask = make_inputs(B=1, L=67, H=5)
    expected = reference(delta, grad, mask, step, norm)
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, step=step, norm=norm, backend=backend)
    assert_close_to_ref(out, expected, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bfloat16])
def test_mask_as_numbers(backend, mask_dtype):
    delta, grad, mask = make_inputs()
    expected = modkern.masked_adv_step(
        delta, grad, mask, alpha=ALPHA, epsilon=EPS, step="l2", norm="l2", inplace=False, backend=backend
    )
    out = modkern.masked_adv_step(
        delta, grad, mask.to(mask_dtype), alpha=ALPHA, epsilon=EPS, step="l2", norm="l2", inplace=False, backend=backend
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_grad_and_delta(backend, layout):
    B, L, H = 3, 6, 20
    delta, _, mask = make_inputs(B, L, H, poison=False)
    if layout == "transposed":
        grad = torch.randn(B, H, L, device=DEVICE).transpose(1, 2)
    elif layout == "strided":
        grad = torch.randn(B, L, 2 * H, device=DEVICE)[..., ::2]
    else:  # what (x * w).sum().backward() hands back: stride 0
        grad = torch.randn(1, 1, H, device=DEVICE).expand(B, L, H)
    assert not grad.is_contiguous()
    # A strided delta, updated in place through its strides.
    storage = torch.zeros(B, L, H + 3, device=DEVICE)
    strided_delta = storage[..., :H]
    strided_delta.copy_(delta)
    expected = reference(delta, grad, mask, "l2", "l2_token")
    out = modkern.masked_adv_step(
        strided_delta, grad, mask, alpha=ALPHA, epsilon=EPS, step="l2", norm="l2_token", backend=backend
    )
    assert out is strided_delta
    assert_close_to_ref(out, expected, torch.float32)
    assert (storage[..., H:] == 0).all()  # nothing written outside the view


@pytest.mark.parametrize("backend", backend_params())
def test_inplace_and_not(backend):
    delta, grad, mask = make_inputs(poison=False)
    before = delta.clone()
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, inplace=False, backend=backend)
    assert out.data_ptr() != delta.data_ptr()
    torch.testing.assert_close(delta, before, rtol=0, atol=0)
    again = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, inplace=True, backend=backend)
    assert again is delta
    torch.testing.assert_close(delta, out, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_leaf_requiring_grad_updated_like_an_optimizer(backend):
    # Like any in-place torch op: refused with grad mode on, allowed under no_grad (as optimizers do).
    delta, grad, mask = make_inputs(poison=False)
    delta.requires_grad_()
    expected = reference(delta.detach(), grad, mask, "raw", "linf")
    with pytest.raises(ValueError, match="delta requires grad"):
        modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, backend=backend)
    with torch.no_grad():
        out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, backend=backend)
    assert out is delta and delta.requires_grad and delta.grad_fn is None
    assert_close_to_ref(delta.detach(), expected, torch.float32)
    new = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, inplace=False, backend=backend)
    assert not new.requires_grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("step,norm", [("raw", "linf"), ("l2", "l2"), ("linf", "l2_token")])
def test_alpha_epsilon_as_tensors(backend, step, norm):
    delta, grad, mask = make_inputs(poison=False)
    alpha_t = torch.tensor(ALPHA, device=DEVICE)
    eps_t = torch.tensor(EPS, dtype=torch.float64, device=DEVICE)
    expected = reference(delta, grad, mask, step, norm)
    out = modkern.masked_adv_step(
        delta, grad, mask, alpha=alpha_t, epsilon=eps_t, step=step, norm=norm, inplace=False, backend=backend
    )
    assert_close_to_ref(out, expected, torch.float32)


def test_no_projection_accepts_no_epsilon():
    delta, grad, mask = make_inputs(poison=False)
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=None, step="sign", norm=None, inplace=False)
    assert_close_to_ref(out, reference(delta, grad, mask, "sign", None), torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("inplace", [True, False])
def test_opcheck(backend, inplace):
    delta, grad, mask = make_inputs(B=2, L=3, H=8, poison=False)
    op = torch.ops.modkern.masked_adv_step_inplace if inplace else torch.ops.modkern.masked_adv_step
    for step, norm in [("raw", "linf"), ("l2", "l2")]:
        # (delta, grad, mask, alpha, alpha_t, epsilon, epsilon_t, step, norm, backend): the public order
        torch.library.opcheck(op, (delta.clone(), grad, mask, ALPHA, None, EPS, None, step, norm, backend))
        torch.library.opcheck(
            op,
            (
                delta.clone(),
                grad,
                mask,
                0.0,
                torch.tensor(ALPHA, device=DEVICE),
                0.0,
                torch.tensor(EPS, device=DEVICE),
                step,
                norm,
                backend,
            ),
        )


@pytest.mark.parametrize("inplace", [True, False])
def test_compile_fullgraph_no_recompile_per_value(inplace):
    """torch.compile traces through the ops; new alpha / epsilon tensor values reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def pgd(delta, grad, mask, alpha, eps):
        return modkern.masked_adv_step(
            delta, grad, mask, alpha=alpha, epsilon=eps, step="l2", norm="l2", inplace=inplace, backend="torch"
        )

    compiled = torch.compile(pgd, backend=counter, fullgraph=True)
    for alpha, eps in [(0.03, 0.05), (0.1, 0.02), (0.01, 0.5)]:
        delta, grad, mask = make_inputs(poison=False)
        expected = reference(delta, grad, mask, "l2", "l2", alpha=alpha, eps=eps)
        out = compiled(delta, grad, mask, torch.tensor(alpha, device=DEVICE), torch.tensor(eps, device=DEVICE))
        assert_close_to_ref(out, expected, torch.float32)
        if inplace:
            assert_close_to_ref(delta, expected, torch.float32)
    assert counter.frame_count == 1


def test_compile_inductor_inplace_step():
    """The paper's step under Inductor: the functionalized mutation must still land in delta."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def pgd(delta, grad, mask, alpha, eps):
        modkern.masked_adv_step(delta, grad, mask, alpha=alpha, epsilon=eps, backend="torch")
        return delta * 2

    delta, grad, mask = make_inputs(poison=False)
    expected = reference(delta, grad, mask, "raw", "linf")
    doubled = pgd(delta, grad, mask, torch.tensor(ALPHA), torch.tensor(EPS))
    assert_close_to_ref(delta, expected, torch.float32)
    assert_close_to_ref(doubled, 2 * expected, torch.float32)


# ----------------------------------------------------------------------------------- bad input
def _call(**overrides):
    delta, grad, mask = make_inputs(B=2, L=3, H=4, poison=False)
    kwargs = dict(delta=delta, grad=grad, mask=mask, alpha=ALPHA, epsilon=EPS)
    kwargs.update(overrides)
    args = (kwargs.pop("delta"), kwargs.pop("grad"), kwargs.pop("mask"))
    return modkern.masked_adv_step(*args, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(grad=torch.randn(2, 3, 5)), ValueError, "grad"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, "mask"),
        (dict(delta=torch.randn(3, 4)), ValueError, "delta"),
        (dict(delta=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "delta"),
        (dict(grad=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "grad"),
        (dict(mask=[[True] * 3] * 2), TypeError, "mask"),
        (dict(grad=torch.randn(2, 3, 4, device="meta")), ValueError, "grad"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "mask"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=-1e-3), ValueError, "epsilon"),
        (dict(epsilon=None), TypeError, "epsilon"),
        (dict(epsilon=torch.ones(2)), ValueError, "epsilon"),
        (dict(epsilon=torch.tensor(0.1, device="meta")), ValueError, "epsilon"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(epsilon=float("inf")), ValueError, "epsilon must be finite"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha="0.1"), TypeError, "alpha"),
        (dict(step="fgsm"), ValueError, "step"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(norm="none"), ValueError, "norm"),
        (dict(inplace="yes"), TypeError, "inplace"),
        (dict(backend="cuda_graphs"), ValueError, "backend"),
        (dict(delta=torch.zeros(1, 3, 4).expand(2, 3, 4)), ValueError, "delta"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("step,norm", [("raw", "linf"), ("l2", "l2"), ("l2_token", "l2_token"), ("linf", None)])
def test_float64_delta_with_float_alpha_epsilon_is_exact(backend, step, norm):
    # Python-float alpha / epsilon must not cost fp64 precision (float kernel arguments are fp32)
    delta, grad, mask = make_inputs(B=3, L=6, H=19, delta_dtype=torch.float64, grad_dtype=torch.float64)
    alpha, eps = 0.1234567891234, 0.0512345678912
    out = modkern.masked_adv_step(
        delta, grad, mask, alpha=alpha, epsilon=eps, step=step, norm=norm, inplace=False, backend=backend
    )
    assert_close_to_ref(out, reference(delta, grad, mask, step, norm, alpha=alpha, eps=eps), torch.float64)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("step,norm", [("raw", "linf"), ("raw", "l2"), ("l2_token", "l2_token"), ("linf", "linf")])
def test_nan_gradient_propagates_like_the_reference(backend, step, norm):
    # a NaN gradient (a diverged model) must surface as NaN in delta, never as a finite +-eps
    delta, grad, mask = make_inputs(B=3, L=4, H=16, poison=False)
    mask[0, 1] = True
    grad[0, 1, 3] = float("nan")
    expected = reference(delta, grad, mask, step, norm)
    out = modkern.masked_adv_step(
        delta, grad, mask, alpha=ALPHA, epsilon=EPS, step=step, norm=norm, inplace=False, backend=backend
    )
    assert bool(torch.isnan(expected[0, 1, 3]))
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert_close_to_ref(out[finite], expected[finite], torch.float32)
