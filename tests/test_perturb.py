"""perturb: forward against the float64 reference, gradients against autograd of the reference."""

import pytest
import torch
from conftest import DEVICE, backend_params

import modkern
from modkern.ops.perturb.reference import perturb as ref_perturb

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_inputs(shape=(3, 5, 37), embeds_dtype=torch.float32, delta_dtype=torch.float32):
    embeds = torch.randn(shape, device=DEVICE).to(embeds_dtype)
    delta = (torch.randn(shape, device=DEVICE) * 0.05).to(delta_dtype)
    mask = torch.rand(shape[:-1], device=DEVICE) > 0.4
    mask.view(-1)[0] = True
    if shape[0] > 1:
        mask[1] = False  # a sample with an empty mask
    # delta off the mask is ignored, NaN included
    delta = torch.where(mask[..., None], delta, torch.full_like(delta, float("nan")))
    return embeds, delta, mask


def expected_forward(embeds, delta, mask):
    # float64 truth on the very same (already rounded) inputs, then the one rounding to embeds.dtype.
    return ref_perturb(embeds.double(), delta.double(), mask).to(embeds.dtype)


def assert_one_rounding(out, embeds, delta, mask):
    """out equals the float64 result up to the final cast: identical for fp32, within one ulp of the
    low-precision dtype (the interpreter truncates fp32 -> bf16 instead of rounding)."""
    exact = ref_perturb(embeds.double(), delta.double(), mask)
    assert out.dtype == embeds.dtype and torch.isfinite(out).all()
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[embeds.dtype]
    err = (out.double() - exact).abs()
    assert (err <= ulp * exact.abs() + 1e-30).all(), err.max()
    # Unmasked tokens are the embeddings, bit for bit.
    keep = ~mask[..., None].expand_as(out)
    assert torch.equal(out[keep], embeds[keep])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("embeds_dtype", DTYPES)
def test_forward(backend, embeds_dtype, delta_dtype):
    embeds, delta, mask = make_inputs(embeds_dtype=embeds_dtype, delta_dtype=delta_dtype)
    out = modkern.perturb(embeds, delta, mask, backend=backend)
    assert_one_rounding(out, embeds, delta, mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(1, 7, 5), (2, 3, 4, 33), (9, 4100)])
def test_forward_shapes(backend, shape):
    embeds, delta, mask = make_inputs(shape, embeds_dtype=torch.bfloat16)
    out = modkern.perturb(embeds, delta, mask.float(), backend=backend)  # mask as 0/1 numbers
    assert_one_rounding(out, embeds, delta, mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "embeds_dtype,delta_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
)
@pytest.mark.parametrize("which", ["both", "delta", "embeds"])
def test_gradients_match_autograd_of_reference(backend, embeds_dtype, delta_dtype, which):
    embeds, delta, mask = make_inputs(embeds_dtype=embeds_dtype, delta_dtype=delta_dtype)
    grad_out = torch.randn(embeds.shape, device=DEVICE).to(embeds_dtype)

    def run(fn):
        e = embeds.clone().requires_grad_(which in ("both", "embeds"))
        d = delta.clone().requires_grad_(which in ("both", "delta"))
        fn(e, d).backward(grad_out)
        return e.grad, d.grad

    got_e, got_d = run(lambda e, d: modkern.perturb(e, d, mask, backend=backend))
    ref_e, ref_d = run(lambda e, d: ref_perturb(e, d, mask))
    for got, ref, dtype in ((got_e, ref_e, embeds_dtype), (got_d, ref_d, delta_dtype)):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == embeds.shape
        # The gradients are copies of grad_out (masked, cast once): exact for fp32 targets,
        # one ulp of the target dtype otherwise (interpreter truncation).
        ulp = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(got.double(), ref.double(), rtol=ulp, atol=0)
    if got_d is not None:
        assert (got_d[~mask] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_expanded_incoming_gradient(backend):
    """(x * w).sum().backward() hands the op a stride-0 gradient."""
    embeds, delta, mask = make_inputs(embeds_dtype=torch.bfloat16)
    delta = torch.nan_to_num(delta).requires_grad_()
    modkern.perturb(embeds, delta, mask, backend=backend).sum().backward()
    torch.testing.assert_close(delta.grad, mask[..., None].float().expand_as(delta), rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    embeds, delta, mask = make_inputs((2, 3, 8), embeds_dtype=torch.bfloat16)
    delta = torch.nan_to_num(delta)
    torch.library.opcheck(
        torch.ops.modkern.perturb_fwd, (embeds.requires_grad_(), delta.requires_grad_(), mask, backend)
    )
    torch.library.opcheck(
        torch.ops.modkern.perturb_fwd, (embeds.detach(), delta.detach().requires_grad_(), mask, backend)
    )
    grad_out = torch.randn(2, 3, 8, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.modkern.perturb_bwd, (grad_out, mask, torch.float32, backend))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()

    def step(embeds, delta, mask, w):
        out = modkern.perturb(embeds, delta, mask, backend="torch")
        return (out.float() * w).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    embeds, delta, mask = make_inputs(embeds_dtype=torch.bfloat16)
    delta = torch.nan_to_num(delta)
    w = torch.randn(embeds.shape, device=embeds.device)
    grads = []
    for fn in (step, compiled):
        d = delta.clone().requires_grad_()
        loss = fn(embeds, d, mask, w)
        (g,) = torch.autograd.grad(loss, d)
        grads.append((loss, g))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)), ValueError, "delta"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, 4)), ValueError, "mask"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64), torch.randn(2, 3, 4), torch.ones(2, 3)), TypeError, "embeds"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int8), torch.ones(2, 3)), TypeError, "delta"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta"), torch.ones(2, 3)), ValueError, "delta"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, device="meta")), ValueError, "mask"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), None), TypeError, "mask"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        modkern.perturb(*args)
