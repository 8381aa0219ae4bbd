"""Bad input to fused_js / fused_kl: a clear TypeError / ValueError naming the argument."""

import pytest
import torch
from conftest import DEVICE, backend_params

import modkern


def _pq(rows=3, vocab=10, dtype=torch.float32):
    return torch.randn(rows, vocab, dtype=dtype, device=DEVICE), torch.randn(rows, vocab, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": -0.5}, ValueError, "beta"),
        ({"beta": "half"}, TypeError, "beta"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"num_items": 0}, ValueError, "num_items"),
        ({"num_items": torch.ones(2)}, ValueError, "num_items"),
        ({"num_items": torch.tensor(True)}, TypeError, "num_items"),
        ({"num_items": 8, "reduction": "sum"}, ValueError, "num_items"),
        ({"num_items": 8, "reduction": "none"}, ValueError, "num_items"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"backend": "jax"}, ValueError, "backend"),
        ({"mask": torch.ones(4, dtype=torch.bool)}, ValueError, "mask"),
        ({"ref_index": torch.zeros(2, dtype=torch.long)}, ValueError, "ref_index"),
        ({"ref_index": torch.zeros(3)}, TypeError, "ref_index"),
    ],
)
def test_js_bad_arguments(kwargs, exc, match):
    p, q = _pq()
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        modkern.fused_js(p, q, **kwargs)


def test_kl_bad_direction():
    p, q = _pq()
    with pytest.raises(ValueError, match="direction"):
        modkern.fused_kl(p, q, direction="backward")


@pytest.mark.parametrize("fn", [modkern.fused_js, modkern.fused_kl])
def test_mismatched_vocab(fn):
    p = torch.randn(3, 10, device=DEVICE)
    q = torch.randn(3, 11, device=DEVICE)
    with pytest.raises(ValueError, match="vocabulary"):
        fn(p, q)


@pytest.mark.parametrize("fn", [modkern.fused_js, modkern.fused_kl])
def test_mismatched_rows_without_ref_index(fn):
    p = torch.randn(2, 10, device=DEVICE)
    q = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="ref_index"):
        fn(p, q)


@pytest.mark.parametrize("fn", [modkern.fused_js, modkern.fused_kl])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_non_float_logits(fn, dtype):
    p, q = _pq()
    with pytest.raises(TypeError, match="q_logits"):
        fn(p, q.to(dtype))
    with pytest.raises(TypeError, match="p_logits"):
        fn(p.to(dtype), q)


def test_mixed_dtypes():
    p, q = _pq()
    with pytest.raises(TypeError, match="dtype"):
        modkern.fused_js(p, q.to(torch.bfloat16))


def test_not_a_tensor():
    _, q = _pq()
    with pytest.raises(TypeError, match="p_logits"):
        modkern.fused_kl([[0.0] * 10] * 3, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA) to mismatch")
def test_different_devices():
    p, q = _pq()
    with pytest.raises(ValueError, match="device"):
        modkern.fused_js(p.cpu(), q.cuda())


def test_different_devices_meta():
    # A device mismatch is caught before any kernel runs (meta tensors stand in for a 2nd device).
    p = torch.randn(3, 10)
    q = torch.randn(3, 10, device="meta")
    with pytest.raises(ValueError, match="device"):
        modkern.fused_js(p, q)
    with pytest.raises(ValueError, match="mask"):
        modkern.fused_js(p, p, mask=torch.ones(3, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", [-1, 2])
def test_ref_index_out_of_range(backend, bad):
    p = torch.randn(2, 10, device=DEVICE)
    q = torch.randn(3, 10, device=DEVICE)
    ref_index = torch.tensor([0, 1, bad], device=DEVICE)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="ref_index"):
            modkern.fused_js(p, q, ref_index=ref_index, backend=backend)
        return
    # on a GPU the values are not read (no host sync) and no device-side assert kills the context:
    # the loss and the gradients are NaN, and the process carries on
    for grad_mode in ("backward", "forward"):
        p_, q_ = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
        loss = modkern.fused_js(p_, q_, ref_index=ref_index, backend=backend, grad_mode=grad_mode)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(q_.grad).all(), grad_mode
    good = modkern.fused_js(p, q, ref_index=torch.tensor([0, 1, 1], device=DEVICE), backend=backend)
    assert torch.isfinite(good)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", [-1, 2])
def test_ref_index_out_of_range_unread_is_nan(backend, bad, monkeypatch):
    # The GPU path on any device: values not read on the host -> indices clamped for the kernels,
    # loss and gradients NaN (no device-side assert, no read outside p).
    from modkern.ops.divergence import api

    monkeypatch.setattr(api, "values_checked_on_host", lambda t: False)
    p = torch.randn(2, 10, device=DEVICE)
    q = torch.randn(3, 10, device=DEVICE)
    ref_index = torch.tensor([0, 1, bad], device=DEVICE)
    for grad_mode in ("backward", "forward"):
        p_, q_ = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
        loss = modkern.fused_kl(p_, q_, ref_index=ref_index, backend=backend, grad_mode=grad_mode)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(q_.grad).all(), grad_mode
    p_, q_ = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    rows = modkern.fused_js(p_, q_, ref_index=ref_index, backend=backend, reduction="none")
    rows.sum().backward()
    assert torch.isnan(rows).all() and torch.isnan(p_.grad).all() and torch.isnan(q_.grad).all()
    w = torch.randn(10, 4, device=DEVICE)
    linear = modkern.fused_linear_js(p[:, :4], q[:, :4], w, ref_index=ref_index, backend=backend)
    assert torch.isnan(linear)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p, q = _pq()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        modkern.fused_js(p.cpu(), q.cpu(), backend="triton")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MODKERN_BACKEND", "cuda")
    p, q = _pq()
    if "cuda" not in modkern.available_backends(DEVICE):
        with pytest.raises(RuntimeError, match="modkern._C"):
            modkern.fused_js(p, q)
    monkeypatch.setenv("MODKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MODKERN_BACKEND='bogus'"):
        modkern.fused_js(p, q)


def test_zero_num_items_tensor_gives_zero_not_inf():
    # Hugging Face passes num_items_in_batch as a tensor; a count of 0 (no answer token in the
    # accumulated batch, every row masked) is clamped on the device: 0, not 0/0
    p, q = _pq()
    mask = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    out = modkern.fused_js(p, q, mask=mask, num_items=torch.tensor(0, device=DEVICE))
    assert float(out) == 0.0
