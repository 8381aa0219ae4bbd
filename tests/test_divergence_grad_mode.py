"""fused_js / fused_kl with ``grad_mode="forward"`` (the forward writes the gradients, the backward
scales them) against the float64 reference and against ``grad_mode="backward"``.

On the Triton backend this runs ``_divergence_fused_kernel``: rows split over tile programs that
exchange per-tile partials. Tests shrink its tile (``FUSED_BLOCK``) so that rows of a few hundred
columns span many programs; under the interpreter the programs run one after another, so every
program but the row's last computes some partner partials from memory (the fallback) while reading
the earlier ones as published - both ways of getting a partial are exercised in every row.

Tolerances are those of tests/test_divergence.py (same inputs, same fp32 accumulation, the
gradients rounded once to the input dtype): its ``_check_grad`` is reused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from test_divergence import (
    CASES,
    LOSS_ATOL,
    LOSS_RTOL,
    PEAKED_CASES,
    _check_grad,
    _divergence_node,
    _logits,
    check_peaked_gradients,
    poison_allocations,
)

import modkern

__all__ = ["poison_allocations"]  # the autouse fixture: outputs start as NaN


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    try:
        from modkern.kernels import divergence_one_read
    except ImportError:  # pragma: no cover - without triton
        return
    monkeypatch.setattr(divergence_one_read, "FUSED_BLOCK", 64)


def _run(case, p, q, backend, reduction="mean", num_items=None, grad_scale=2.5, **kw):
    """The forward-mode loss and gradients of grad_scale * loss, next to float64's."""
    fn, ref_fn, case_kw = CASES[case]
    kw = {**case_kw, **kw, "reduction": reduction, "num_items": num_items}
    loss = fn(p, q, backend=backend, grad_mode="forward", **kw)
    p64 = p.detach().double().requires_grad_(p.requires_grad)
    q64 = q.detach().double().requires_grad_(q.requires_grad)
    expected = ref_fn(p64, q64, **kw)
    torch.testing.assert_close(loss.double(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    inputs = [t for t in (p, q) if t.requires_grad]
    grads = torch.autograd.grad(loss * grad_scale, inputs)
    grads64 = torch.autograd.grad(expected * grad_scale, [t for t in (p64, q64) if t.requires_grad])
    for g, g64 in zip(grads, grads64):
        _check_grad(g, g64, p.dtype)
    return loss, grads


def _node_name(loss):
    """The divergence node of ``loss``'s graph: "ForwardGradsDivergenceBackward" or
    "FusedDivergenceBackward" (reductions and views sit above the latter)."""
    return type(_divergence_node(loss, "Divergence")).__name__


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, vocab, dtype, backend):
    p = _logits((5, vocab), dtype)
    q = _logits((5, vocab), dtype)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    loss, grads = _run(case, p, q, backend, mask=mask)
    assert "ForwardGrads" in _node_name(loss)
    for g in grads:
        assert (g[1] == 0).all()  # the masked-out row


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ["p", "q"])
def test_gradient_to_one_input(case, which, backend):
    p = _logits((3, 300), torch.float32, requires_grad=which == "p")
    q = _logits((3, 300), torch.float32, requires_grad=which == "q")
    _run(case, p, q, backend, reduction="sum", temperature=0.7)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction,num_items", [("sum", None), ("mean", None), ("mean", 7), ("mean", "tensor")])
def test_reductions_and_num_items(reduction, num_items, backend):
    if num_items == "tensor":
        num_items = torch.tensor(9, device=DEVICE)
    p = _logits((4, 2, 130), torch.float32)
    q = _logits((4, 2, 130), torch.float32)
    mask = torch.rand(4, 2, device=DEVICE) < 0.6
    mask[0, 0] = True
    _run("js_0.5", p, q, backend, reduction=reduction, num_items=num_items, mask=mask)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["js_0.5", "kl_forward", "kl_symmetric"])
def test_ref_index_with_q_gradient(case, backend):
    # k = 3 perturbed copies per clean row, P detached: the one-read path applies.
    p = _logits((2, 300), torch.float32, requires_grad=False)
    q = _logits((6, 300), torch.float32)
    ref_index = torch.tensor([0, 0, 0, 1, 1, 1], device=DEVICE)
    loss, _ = _run(case, p, q, backend, ref_index=ref_index)
    assert "ForwardGrads" in _node_name(loss)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_minus_inf_tiles(case, dtype, backend):
    # Columns 64-191 at -inf in both rows (a banned part of the vocabulary): with 64-column tiles,
    # tiles 1 and 2 of every row have max = -inf, sum-exp 0 and row-sum partials exactly 0 - the
    # partials the exchange publishes with a sign bit set so that they are never mistaken for
    # unpublished (on a GPU a mistaken one would cost a spin and a recomputation, not a wrong
    # value). Plus scattered -inf entries as in tests/test_divergence.py.
    p = _logits((4, 300), dtype, requires_grad=False)
    q = _logits((4, 300), dtype, requires_grad=False)
    hole = torch.rand(4, 300, device=DEVICE) < 0.2
    hole[:, 64:192] = True
    p[hole] = float("-inf")
    q[hole if case.startswith("kl") else (torch.rand(4, 300, device=DEVICE) < 0.2) | hole] = float("-inf")
    p.requires_grad_()
    q.requires_grad_()
    loss, grads = _run(case, p, q, backend)
    assert "ForwardGrads" in _node_name(loss) and torch.isfinite(loss)
    for g in grads:
        assert torch.isfinite(g).all() and (g[:, 64:192] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_single_row_all_masked_and_empty(backend):
    p = _logits((1, 300), torch.float32)
    q = _logits((1, 300), torch.float32)
    _run("kl_forward", p, q, backend)
    mask = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    p = _logits((3, 300), torch.float32)
    q = _logits((3, 300), torch.float32)
    loss = modkern.fused_js(p, q, mask=mask, backend=backend, grad_mode="forward")
    loss.backward()
    assert loss.item() == 0.0 and (p.grad == 0).all() and (q.grad == 0).all()
    p = _logits((0, 300), torch.float32)
    q = _logits((0, 300), torch.float32)
    loss = modkern.fused_kl(p, q, backend=backend, grad_mode="forward")
    loss.backward()
    assert loss.item() == 0.0 and q.grad.shape == (0, 300)


@pytest.mark.parametrize("backend", backend_params())
def test_same_as_recomputing_backward(backend):
    # Both modes compute the same quantities: the losses and gradients agree to fp32 rounding
    # (relative to the largest entry: entries where P - Q cancels differ in their last bits).
    p = _logits((3, 333), torch.float32)
    q = _logits((3, 333), torch.float32)
    out = {}
    for mode in ("backward", "forward"):
        p.grad = q.grad = None
        loss = modkern.fused_js(p, q, beta=0.3, temperature=0.8, backend=backend, grad_mode=mode)
        (3.0 * loss).backward()
        out[mode] = (loss.detach(), p.grad.clone(), q.grad.clone())
    for a, b in zip(out["backward"], out["forward"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("backend", backend_params())
def test_one_backward_per_forward(backend):
    # The backward scales the stored gradients in place: a second backward through the same graph
    # is refused by PyTorch's saved-tensor version check instead of scaling them twice.
    p = _logits((2, 300), torch.float32)
    q = _logits((2, 300), torch.float32)
    loss = modkern.fused_kl(p, q, backend=backend, grad_mode="forward")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", backend_params())
def test_where_forward_mode_does_not_apply(backend):
    # reduction="none", fp16 logits, a P gradient shared through ref_index and no gradient at all
    # take the recomputing path (FusedDivergence), with correct results.
    p = _logits((4, 300), torch.float32)
    q = _logits((4, 300), torch.float32)
    out = modkern.fused_kl(p, q, reduction="none", backend=backend, grad_mode="forward")
    assert "FusedDivergence" in _node_name(out)
    h = _logits((4, 300), torch.float16)
    assert "FusedDivergence" in _node_name(modkern.fused_kl(h, h.detach(), backend=backend, grad_mode="forward"))
    shared = modkern.fused_js(p[:2], q, ref_index=torch.tensor([0, 0, 1, 1], device=DEVICE), grad_mode="forward")
    assert "FusedDivergence" in _node_name(shared)
    with torch.no_grad():
        assert modkern.fused_js(p, q, backend=backend, grad_mode="forward").grad_fn is None


def test_auto_is_backward_until_measured():
    from modkern.ops.dispatch import DIVERGENCE_GRAD_MODE_AUTO

    assert DIVERGENCE_GRAD_MODE_AUTO in ("backward", "forward")
    p = _logits((2, 50), torch.float32)
    loss = modkern.fused_js(p, p.detach() + 1)
    expected = "ForwardGrads" if DIVERGENCE_GRAD_MODE_AUTO == "forward" else "FusedDivergence"
    assert expected in _node_name(loss)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["backward", "forward"])
@pytest.mark.parametrize("kind", ["float", "tensor", "tensor_requires_grad"])
def test_scale(kind, mode, backend, monkeypatch):
    # scale=s is s * the loss, gradients included. In forward mode a constant scale is folded into
    # the gradients the forward writes: the backward's in-place scale gets the outer gradient (1
    # for loss.backward()), i.e. nothing to scale; a scale that requires grad stays outside and
    # gets its own gradient (the unscaled loss).
    p = _logits((4, 300), torch.float32, requires_grad=False)
    q = _logits((4, 300), torch.float32)
    s = 0.375 if kind == "float" else torch.tensor(0.375, device=DEVICE, requires_grad=kind.endswith("grad"))
    seen = []
    import modkern.ops.divergence.api as ops_div

    real = ops_div.ForwardGradsDivergence.backward

    def spy(ctx, grad_loss):
        seen.append(float(grad_loss))
        return real(ctx, grad_loss)

    monkeypatch.setattr(ops_div.ForwardGradsDivergence, "backward", staticmethod(spy))
    loss = modkern.fused_kl(p, q, backend=backend, grad_mode=mode, scale=s, num_items=7)
    (gq,) = torch.autograd.grad(loss, (q,), retain_graph=kind.endswith("grad"))
    base = modkern.fused_kl(p, q, backend=backend, grad_mode="backward", num_items=7)
    (bq,) = torch.autograd.grad(base, (q,))
    torch.testing.assert_close(loss, 0.375 * base, rtol=1e-6, atol=0)
    torch.testing.assert_close(gq, 0.375 * bq, rtol=1e-5, atol=1e-7)
    if mode == "forward":
        assert seen == ([0.375] if kind.endswith("grad") else [1.0])
    if kind.endswith("grad"):
        (gs,) = torch.autograd.grad(loss, (s,))
        torch.testing.assert_close(gs, base.detach(), rtol=1e-6, atol=0)
    # a float64 scale leaves the result in the accumulation dtype, in every mode
    wide = modkern.fused_kl(p, q, backend=backend, grad_mode=mode, scale=torch.tensor(0.375, dtype=torch.float64))
    assert wide.dtype == torch.float32


def test_bad_scale_is_named():
    p = _logits((2, 50), torch.float32)
    bad_scales = [("x", TypeError), (True, TypeError), (float("inf"), ValueError), (10**400, ValueError)]
    for bad, err in bad_scales + [(torch.ones(2), ValueError)]:
        with pytest.raises(err, match="scale"):
            modkern.fused_js(p, p.detach(), scale=bad)
    with pytest.raises(ValueError, match="scale"):
        modkern.fused_kl(p, p.detach(), scale=torch.tensor(float("nan")), grad_mode="forward")


def test_bad_grad_mode_is_named():
    p = _logits((2, 50), torch.float32)
    with pytest.raises(ValueError, match="grad_mode"):
        modkern.fused_js(p, p, grad_mode="later")


@pytest.mark.parametrize("case", list(PEAKED_CASES))
@pytest.mark.parametrize("backend", backend_params())
def test_fp32_gradients_on_peaked_distributions(case, backend, monkeypatch):
    # The precision bar of tests/test_divergence.py (T = 0.5, std 3, V = 3001, beta = 0.8): fp32
    # gradients within 1.5e-4 relative L2 error of float64. Rows span 3 programs of 1024 columns
    # (the interpreter's fallback is quadratic in the programs per row).
    if backend == "triton":
        from modkern.kernels import divergence_one_read

        monkeypatch.setattr(divergence_one_read, "FUSED_BLOCK", 1024)
    check_peaked_gradients(case, backend, grad_mode="forward")


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph(backend):
    p = _logits((3, 200), torch.float32)
    q = _logits((3, 200), torch.float32)

    def step(p, q):
        return modkern.fused_kl(p, q, backend=backend, grad_mode="forward")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(p, q)
    gp, gq = torch.autograd.grad(loss * 2.0, (p, q))
    ref_loss = step(p, q)
    rp, rq = torch.autograd.grad(ref_loss * 2.0, (p, q))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gp, rp)
    torch.testing.assert_close(gq, rq)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    p = _logits((3, 130), torch.float32, requires_grad=False)
    q = _logits((3, 130), torch.float32, requires_grad=False)
    weight = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(
        torch.ops.modkern.divergence_fwd_grads.default,
        (p, q, None, None, weight, "js", 0.5, 1.0, True, True, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
    g = torch.randn(3, 130, device=DEVICE)
    torch.library.opcheck(
        torch.ops.modkern.divergence_scale_.default,
        (torch.tensor(2.0, device=DEVICE), g, g.new_empty(0), backend),
        test_utils=("test_schema", "test_faketensor"),
    )
