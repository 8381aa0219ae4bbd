"""What a new user trips on (issue 13): values that used to give a silent answer now raise an error
naming the argument (CPU tensors are read), or turn the result into NaN where reading them would
need a host sync (GPU tensors, tracing) - simulated here by making every tensor unreadable."""

import pytest
import torch
from conftest import DEVICE

import modkern
from modkern import checks

EPS, ALPHA = 1e-3, 0.1


def _pgd_inputs(B=2, L=5, H=8):
    delta = torch.zeros(B, L, H, device=DEVICE)
    grad = torch.randn(B, L, H, device=DEVICE)
    mask = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    mask[:, 1:4] = True
    return delta, grad, mask


def _logits(R=4, V_=11):
    return torch.randn(R, V_, device=DEVICE), torch.randn(R, V_, device=DEVICE)


@pytest.fixture
def unreadable(monkeypatch):
    """Every tensor behaves as on a GPU: its value cannot be read by a check."""
    monkeypatch.setattr(checks, "readable", lambda t: False)


# ---------------------------------------------------------------- masked_adv_step / init_delta
@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_adv_step_negative_epsilon_tensor():
    delta, grad, mask = _pgd_inputs()
    with pytest.raises(ValueError, match="epsilon must be finite and > 0, got -1"):
        modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=torch.tensor(-1.0))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_adv_step_negative_alpha_tensor():
    delta, grad, mask = _pgd_inputs()
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        modkern.masked_adv_step(delta, grad, mask, alpha=torch.tensor(-0.1), epsilon=EPS)
    with pytest.raises(ValueError, match="alpha"):
        modkern.masked_adv_step(delta, grad, mask, alpha=torch.tensor(float("inf")), epsilon=EPS)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_init_delta_negative_epsilon_tensor():
    _, _, mask = _pgd_inputs()
    with pytest.raises(ValueError, match="epsilon must be finite and > 0"):
        modkern.init_delta((2, 5, 8), mask, epsilon=torch.tensor(-1.0))


def test_unreadable_bad_scalars_give_nan_not_a_silent_answer(unreadable):
    delta, grad, mask = _pgd_inputs()
    # float tensors, and integer ones too (an int -1 epsilon used to clamp every masked entry to
    # -1, silently)
    for bad_alpha, bad_epsilon in ((-0.1, -1.0), (-1, -1)):
        for kwargs in (
            dict(alpha=ALPHA, epsilon=torch.tensor(bad_epsilon, device=DEVICE)),
            dict(alpha=torch.tensor(bad_alpha, device=DEVICE), epsilon=EPS),
        ):
            out = modkern.masked_adv_step(delta, grad, mask, inplace=False, backend="torch", **kwargs)
            assert torch.isnan(out[mask]).all(), kwargs
        epsilon = torch.tensor(bad_epsilon, device=DEVICE)
        assert torch.isnan(modkern.init_delta(delta, mask, epsilon=epsilon)[mask]).all()
    # good values are untouched by the device-side check
    good = modkern.masked_adv_step(
        delta, grad, mask, alpha=torch.tensor(ALPHA, device=DEVICE), epsilon=torch.tensor(EPS, device=DEVICE)
    )
    assert torch.isfinite(good).all() and good.abs().max() <= EPS


def test_inplace_on_a_leaf_that_requires_grad():
    delta, grad, mask = _pgd_inputs()
    delta.requires_grad_()
    with pytest.raises(ValueError, match="delta requires grad.*torch.no_grad"):
        modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS)
    with pytest.raises(RuntimeError):  # what plain torch does with the same tensor
        delta.add_(1.0)
    # a non-leaf that requires grad: an in-place step would corrupt its graph
    with pytest.raises(ValueError, match="delta requires grad"):
        modkern.masked_adv_step(delta * 1, grad, mask, alpha=ALPHA, epsilon=EPS)
    # the ways out the message names
    modkern.masked_adv_step(delta.detach(), grad, mask, alpha=ALPHA, epsilon=EPS)
    out = modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, inplace=False)
    assert not out.requires_grad


@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_token_mask_other_than_zero_one():
    delta, grad, mask = _pgd_inputs()
    bad = mask.float() * 0.5
    with pytest.raises(ValueError, match="mask must hold only 0 and 1.*0.5"):
        modkern.masked_adv_step(delta, grad, bad, alpha=ALPHA, epsilon=EPS)
    with pytest.raises(ValueError, match="mask"):
        modkern.perturb(grad, delta, mask.long() * 2)
    # 0/1 numbers stay legal
    out = modkern.masked_adv_step(delta, grad, mask.float(), alpha=ALPHA, epsilon=EPS, inplace=False)
    torch.testing.assert_close(out, modkern.masked_adv_step(delta, grad, mask, alpha=ALPHA, epsilon=EPS, inplace=False))


# ---------------------------------------------------------------------------------- divergence
def test_fused_kl_float_mask_is_rejected():
    p, q = _logits()
    with pytest.raises(TypeError, match="mask must be a bool tensor.*not a row weight"):
        modkern.fused_kl(p, q, mask=torch.full((4,), 0.5, device=DEVICE))
    with pytest.raises(TypeError, match="mask"):
        modkern.fused_js(p, q, mask=torch.ones(4, device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_fused_kl_integer_mask_other_than_zero_one():
    p, q = _logits()
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        modkern.fused_kl(p, q, mask=torch.tensor([0, 1, 2, 1], device=DEVICE))
    ints = modkern.fused_kl(p, q, mask=torch.tensor([0, 1, 1, 0], device=DEVICE))
    torch.testing.assert_close(ints, modkern.fused_kl(p, q, mask=torch.tensor([False, True, True, False])))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="values are read on CPU only")
def test_num_items_negative_tensor():
    p, q = _logits()
    with pytest.raises(ValueError, match="num_items must be a finite count of items >= 0, got -3"):
        modkern.fused_kl(p, q, num_items=torch.tensor(-3))
    with pytest.raises(ValueError, match="num_items"):
        modkern.fused_js(p, q, num_items=torch.tensor(float("inf")))
    # Hugging Face divides its count by the tensor / context / sequence-parallel sizes: a float
    # tensor that need not be whole is a legal divisor
    total = modkern.fused_js(p, q, reduction="sum")
    torch.testing.assert_close(modkern.fused_js(p, q, num_items=torch.tensor(2.5)), total / 2.5)
    # a count of 0 stays legal (a batch without answer tokens): the mean is 0
    assert modkern.fused_kl(p, q, mask=torch.zeros(4, dtype=torch.bool), num_items=torch.tensor(0)) == 0


def test_num_items_fraction():
    p, q = _logits()
    with pytest.raises(ValueError, match="num_items must be a whole number of items, got 2.5"):
        modkern.fused_kl(p, q, num_items=2.5)
    torch.testing.assert_close(modkern.fused_kl(p, q, num_items=4.0), modkern.fused_kl(p, q))


def test_unreadable_bad_num_items_gives_nan(unreadable):
    p, q = _logits()
    assert torch.isnan(modkern.fused_kl(p, q, num_items=torch.tensor(-3, device=DEVICE)))
    assert torch.isnan(modkern.fused_js(p, q, num_items=torch.tensor(float("nan"), device=DEVICE)))
    torch.testing.assert_close(
        modkern.fused_kl(p, q, num_items=torch.tensor(8, device=DEVICE)), modkern.fused_kl(p, q, reduction="sum") / 8
    )
