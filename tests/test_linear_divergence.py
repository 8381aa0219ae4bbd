"""fused_linear_kl / fused_linear_js (and the engine's CE): chunked LM-head divergences vs float64.

The reference (``modkern.reference.linear_*_divergence``) builds the full logits and runs the
reference divergence. Tolerances, per dtype:

* fp32: the op computes the same logits in fp32 chunk by chunk and accumulates in fp32 - values
  rtol 2e-5 (fp32 sums over V <= 1e3 terms), gradients rtol 1e-4 elementwise with an absolute
  floor of 1e-6 x the largest entry (entries that small are below fp32 cancellation of the sums).
* bf16: every logit is rounded to bf16 (8-bit mantissa, relative 2^-9) by the matmul; the float64
  reference is taken on the same bf16-rounded logits so only the op's own error is measured:
  values rtol 2e-3. The divergence op returns the logit gradients in bf16 (each rounded by up to
  2^-9 of the row's largest entry) before they are contracted over up to 2R rows into the weight /
  bias / hidden gradients (in fp32): those roundings add up to ~1-2% of the largest entry, hence
  gradients rtol 3e-2 with an absolute floor of 2.5e-2 x the largest entry.
* fp64 inputs: exact up to summation order (rtol 1e-10).

On the Triton backend the per-chunk divergence runs in the Triton interpreter: small shapes.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params

from modkern import fused_linear_js, fused_linear_kl
from modkern.ops.linear_divergence import default_chunk_size, linear_losses, linear_losses_fwd
from modkern.reference import js_divergence, kl_divergence

CASES = ["kl_forward", "kl_reverse", "kl_symmetric", "js"]
VALUE_TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-3, 1e-4), torch.float64: (1e-10, 1e-12)}
GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (3e-2, 2.5e-2), torch.float64: (1e-10, 1e-12)}


def ours(case, p, q, w, **kw):
    if case == "js":
        return fused_linear_js(p, q, w, beta=kw.pop("beta", 0.3), **kw)
    return fused_linear_kl(p, q, w, direction=case[3:], **kw)


def rounded_logits(hidden, weight, bias):
    """float64 logits rounded to the inputs' dtype as the op's matmul rounds them, differentiated in
    float64 (straight through the rounding)."""
    exact = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return exact + (exact.to(hidden.dtype).double() - exact).detach()


def reference(case, p, q, w, bias=None, *, detach_p_logits=False, **kw):
    """float64 reference on the logits the op itself computes (rounded to the inputs' dtype)."""
    kw.pop("chunk_size", None)
    kw.pop("backend", None)
    p_logits = rounded_logits(p, w, bias)
    q_logits = rounded_logits(q, w, bias)
    if detach_p_logits:
        p_logits = p_logits.detach()
    if case == "js":
        return js_divergence(p_logits, q_logits, beta=kw.pop("beta", 0.3), **kw)
    return kl_divergence(p_logits, q_logits, direction=case[3:], **kw)


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors made in a test are on the test device (the GPU where there is one)."""
    with torch.device(DEVICE):
        yield


def make(n=5, r=None, h=16, v=37, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = n if r is None else r
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64, device="cpu") * s).to(
        DEVICE, dtype
    )
    p = rand(n, h).requires_grad_(True)
    q = (p.detach()[torch.arange(r, device=DEVICE) % n] + rand(r, h, s=0.5)).requires_grad_(True)
    w = rand(v, h, s=0.5).requires_grad_(True)
    b = rand(v, s=0.3).requires_grad_(True) if bias else None
    return p, q, w, b


def leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def assert_close(actual, expected, tol):
    rtol, floor = tol
    expected = expected.double()
    atol = floor * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def check(case, p, q, w, b, dtype, **kw):
    out = ours(case, p, q, w, bias=b, **kw)
    want = reference(case, p, q, w, b, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, want, VALUE_TOL[dtype])
    ts = leaves(p, q, w, b)
    got = torch.autograd.grad(out, ts)
    exp = torch.autograd.grad(want, ts)
    for g, e, t in zip(got, exp, ts):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, e, GRAD_TOL[dtype])
    return out


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, backend):
    p, q, w, b = make(n=5, v=37, dtype=dtype)
    mask = torch.tensor([True, False, True, True, True])
    out = check(case, p, q, w, b, dtype, mask=mask, chunk_size=2, temperature=0.7, backend=backend)
    assert out > 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100, None])
@pytest.mark.parametrize("case", ["kl_forward", "js"])
def test_chunk_sizes_are_exact_in_float64(case, chunk_size):
    p, q, w, b = make(n=7, v=131, dtype=torch.float64)
    check(case, p, q, w, b, torch.float64, chunk_size=chunk_size, reduction="sum")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("case", ["kl_symmetric", "js"])
def test_ref_index(case, k, backend):
    p, q, w, b = make(n=3, r=3 * k, v=29)
    ref_index = torch.arange(3 * k) % 3
    check(case, p, q, w, b, torch.float32, ref_index=ref_index, chunk_size=4, backend=backend)


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_ref_index_more_copies(k):
    p, q, w, b = make(n=2, r=2 * k + 1, v=23, seed=k)
    ref_index = torch.randint(0, 2, (2 * k + 1,), generator=torch.Generator().manual_seed(k))
    check("kl_forward", p, q, w, b, torch.float32, ref_index=ref_index, chunk_size=3)


@pytest.mark.parametrize("which", ["p", "q", "w", "b", "pq", "wb", "none"])
def test_each_gradient_subset(which):
    p, q, w, b = make(n=4, v=19)
    for name, t in zip("pqwb", (p, q, w, b)):
        t.requires_grad_(name in which)
    if which == "none":
        out = fused_linear_js(p, q, w, bias=b)
        assert not out.requires_grad
        assert_close(out, reference("js", p, q, w, b, beta=0.5), VALUE_TOL[torch.float32])
        return
    check("js", p, q, w, b, torch.float32, chunk_size=3)


def test_detached_p_logits_send_no_gradient_through_the_clean_branch():
    p, q, w, b = make(n=4, v=19)
    kw = dict(ref_index=torch.tensor([0, 1, 1, 3]), chunk_size=2, detach_p_logits=True)
    out = fused_linear_kl(p, q, w, bias=b, **kw)
    want = reference("kl_forward", p, q, w, b, **kw)
    got = torch.autograd.grad(out, (q, w, b), retain_graph=True)
    exp = torch.autograd.grad(want, (q, w, b))
    for g, e in zip(got, exp):
        assert_close(g, e, GRAD_TOL[torch.float32])
    (gp,) = torch.autograd.grad(out, (p,), allow_unused=True, materialize_grads=True)
    assert torch.equal(gp, torch.zeros_like(p))
    # without the flag, the clean branch's logits send gradients to the weight too
    full = fused_linear_kl(p, q, w, bias=b, ref_index=kw["ref_index"], chunk_size=2)
    (gw_full,) = torch.autograd.grad(full, (w,))
    assert not torch.allclose(gw_full, got[1])


def test_single_row_masked_rows_and_reductions():
    p, q, w, b = make(n=1, v=37)
    check("kl_forward", p, q, w, b, torch.float32)
    p, q, w, b = make(n=6, v=37)
    none = torch.zeros(6, dtype=torch.bool)
    out = fused_linear_kl(p, q, w, bias=b, mask=none)
    assert float(out.detach()) == 0.0
    grads = torch.autograd.grad(out, (p, q, w, b))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    rows = fused_linear_js(p, q, w, bias=b, mask=mask, reduction="none")
    want = reference("js", p, q, w, b, beta=0.5, mask=mask, reduction="none")
    assert rows.shape == (6,) and torch.equal(rows[~mask], torch.zeros(2))
    assert_close(rows, want, VALUE_TOL[torch.float32])
    total = fused_linear_js(p, q, w, bias=b, mask=mask, reduction="sum")
    assert_close(fused_linear_js(p, q, w, bias=b, mask=mask), total / 4, VALUE_TOL[torch.float32])
    assert_close(fused_linear_js(p, q, w, bias=b, mask=mask, num_items=10), total / 10, VALUE_TOL[torch.float32])
    assert_close(
        fused_linear_js(p, q, w, bias=b, mask=mask, num_items=torch.tensor(8)), total / 8, VALUE_TOL[torch.float32]
    )


def test_divergence_and_cross_entropy_in_one_pass():
    p, q, w, b = make(n=5, v=41, dtype=torch.float64)
    targets = torch.tensor([3, -100, 40, 0, 17])
    div, ce = linear_losses(
        q, w, b, p_hidden=p, divergence="kl", targets=targets, detach_p_logits=True, chunk_size=2, temperature=2.0
    )
    loss = 0.3 * div.sum() + ce.sum()
    q_logits = F.linear(q, w, b)
    want_ce = F.cross_entropy(q_logits, targets, reduction="none")
    want = 0.3 * kl_divergence(F.linear(p, w, b).detach(), q_logits, temperature=2.0, reduction="sum") + want_ce.sum()
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-14)
    assert float(ce[1]) == 0.0
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    for g, e in zip(torch.autograd.grad(loss, (q, w, b)), torch.autograd.grad(want, (q, w, b))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
    # CE only (the attack's and the clean pass's CE on the chunked path)
    (_, ce_only) = linear_losses(q, w, b, targets=targets, chunk_size=3)
    torch.testing.assert_close(ce_only, want_ce.detach(), rtol=1e-12, atol=1e-14)


def test_default_chunk_size_fits_the_budget():
    assert default_chunk_size(8192, 152064) == (512 * 2**20) // (152064 * 32)
    assert default_chunk_size(3, 152064) == 3
    assert default_chunk_size(10**6, 10**9) == 1
    assert default_chunk_size(0, 10) == 1


def test_opcheck():
    p, q, w, b = make(n=4, v=13)
    args = (q, p, w, b, torch.tensor([1, 2, -100, 0]), torch.tensor([True, True, False, True]), None)
    torch.library.opcheck(linear_losses_fwd, (*args, "js", 0.5, 1.0, 2, False, "auto"))
    torch.library.opcheck(
        linear_losses_fwd, (*args[:-1], torch.tensor([0, 0, 3, 1]), "kl_forward", 0.5, 2.0, 3, True, "auto")
    )


def test_torch_compile_fullgraph():
    p, q, w, b = make(n=4, v=13)

    ref_index = torch.tensor([0, 0, 3, 2])

    def loss_fn(p, q, w, b):
        kl = fused_linear_kl(p, q, w, bias=b, chunk_size=3)
        return kl + fused_linear_js(p, q, w, bias=b, chunk_size=2, ref_index=ref_index, detach_p_logits=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(p, q, w, b)
    want = loss_fn(p, q, w, b)
    torch.testing.assert_close(got, want)
    for g, e in zip(torch.autograd.grad(got, (p, q, w, b)), torch.autograd.grad(want, (p, q, w, b))):
        torch.testing.assert_close(g, e)
    bad = torch.tensor([0, 0, 4, 2])  # checked inside the op, also under compile
    compiled_js = torch.compile(fused_linear_js, fullgraph=True, backend="aot_eager")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="ref_index values must lie in"):
            compiled_js(p, q, w, ref_index=bad)
    else:  # no host sync, no device-side assert: a NaN loss and NaN gradients
        loss = compiled_js(p, q, w, ref_index=bad)
        assert torch.isnan(loss)
        assert torch.isnan(torch.autograd.grad(loss, q)[0]).all()


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q=torch.randn(4, 15)), ValueError, "q_hidden has hidden size 15"),
        (dict(p=torch.randn(4, 16, dtype=torch.float64)), TypeError, "p_hidden"),
        (dict(q=torch.randn(2, 4, 16)), ValueError, "q_hidden must be 2-D"),
        (dict(w=torch.randn(13)), ValueError, "weight must be 2-D"),
        (dict(b=torch.randn(12)), ValueError, "bias must have shape"),
        (dict(p=torch.randn(3, 16)), ValueError, "p_hidden has 3 rows"),
        (dict(ref_index=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "ref_index must be an integer"),
        (dict(ref_index=torch.tensor([0, 1, 2, 4])), ValueError, "ref_index values must lie in"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(reduction="sum", num_items=4), ValueError, "num_items"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(q=[[1.0] * 16] * 4), TypeError, "q_hidden"),
    ],
)
def test_bad_input_is_named(change, exc, match):
    p, q, w, b = make(n=4, v=13, bias=True)
    args = dict(p=p.detach(), q=q.detach(), w=w.detach(), b=b.detach())
    kw = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(exc, match=match):
        fused_linear_kl(args["p"], args["q"], args["w"], bias=args["b"], **kw)


def test_engine_needs_something_to_compute():
    p, q, w, b = make(n=2, v=7)
    with pytest.raises(ValueError, match="nothing to compute"):
        linear_losses(q, w, b)
    with pytest.raises(ValueError, match="p_hidden is required"):
        linear_losses(q, w, b, divergence="js")
    with pytest.raises(TypeError, match="targets must be an integer"):
        linear_losses(q, w, b, targets=torch.zeros(2))
    with pytest.raises(ValueError, match="divergence must be"):
        linear_losses(q, w, b, p_hidden=p, divergence="tv")
