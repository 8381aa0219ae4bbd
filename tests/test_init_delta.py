"""init_delta: exact bounds, zero off the mask, statistics, seeding."""

import math

import pytest
import torch
from conftest import DEVICE

import modkern

EPS = 1e-3


def make_mask(B=4, L=64):
    mask = torch.rand(B, L, device=DEVICE) > 0.5
    mask[1] = False  # an empty sample
    mask[2] = True  # a full one
    return mask


def test_linf_bounds_mask_and_statistics():
    mask = make_mask(B=4, L=256)
    delta = modkern.init_delta((4, 256, 96), mask, epsilon=EPS)
    assert delta.dtype == torch.float32 and delta.shape == (4, 256, 96) and delta.device == DEVICE
    eps32 = torch.tensor(EPS, dtype=torch.float32)  # the bound the fp32 arithmetic can promise
    assert delta.abs().max() <= eps32  # exact, no tolerance
    assert (delta[~mask] == 0).all()
    inside = delta[mask].double()
    # U(-eps, eps): mean 0, std eps/sqrt(3); n ~ 50k samples -> standard error of the mean ~ 2.6e-6.
    assert abs(inside.mean().item()) < 2e-5
    assert inside.std().item() == pytest.approx(EPS / math.sqrt(3), rel=0.02)
    assert inside.abs().max().item() > 0.999 * EPS and (inside == 0).float().mean() < 1e-3


def test_l2_freelb_start():
    B, L, H = 4, 40, 24
    mask = make_mask(B, L)
    delta = modkern.init_delta((B, L, H), mask, epsilon=EPS, norm="l2")
    assert torch.isfinite(delta).all()
    assert (delta[~mask] == 0).all() and (delta[1] == 0).all()
    n = mask.sum(1).clamp_min(1).double()
    per_elem = EPS / torch.sqrt(n * H)  # FreeLB's scale
    assert (delta.double().abs() <= per_elem[:, None, None] * (1 + 1e-6)).all()
    norms = delta.double().norm(dim=(1, 2))
    assert (norms <= EPS * (1 + 1e-6)).all()
    # U(-1, 1) * scale has E[x^2] = scale^2 / 3, so the norm is about eps / sqrt(3).
    assert norms[2].item() == pytest.approx(EPS / math.sqrt(3), rel=0.05)


def test_zero_and_like_tensor():
    embeds = torch.randn(2, 5, 7, dtype=torch.bfloat16, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    delta = modkern.init_delta(embeds, mask, epsilon=EPS, norm="zero")
    assert delta.shape == embeds.shape and delta.dtype == torch.float32 and (delta == 0).all()
    d16 = modkern.init_delta(embeds, mask.long(), epsilon=EPS, dtype=torch.bfloat16)
    assert d16.dtype == torch.bfloat16
    # One rounding to bf16 may step just past eps (eps itself is not a bf16 number).
    assert d16.abs().max().item() <= EPS * (1 + 2**-8)


def test_generator_seeding():
    mask = make_mask()
    g = lambda seed: torch.Generator(device=DEVICE).manual_seed(seed)  # noqa: E731
    a = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, generator=g(0))
    b = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, generator=g(0))
    c = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, generator=g(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for norm in ("linf", "l2"):
        x = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, norm=norm, generator=g(3))
        y = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, norm=norm, generator=g(3))
        assert torch.equal(x, y)


def test_epsilon_tensor():
    mask = make_mask()
    g = lambda: torch.Generator(device=DEVICE).manual_seed(0)  # noqa: E731
    a = modkern.init_delta((4, 64, 8), mask, epsilon=EPS, norm="l2", generator=g())
    b = modkern.init_delta((4, 64, 8), mask, epsilon=torch.tensor(EPS, device=DEVICE), norm="l2", generator=g())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (((2, 3, 4), torch.ones(2, 3)), dict(epsilon=0.0), ValueError, "epsilon"),
        (((2, 3, 4), torch.ones(2, 3)), dict(epsilon=-1.0), ValueError, "epsilon"),
        (((2, 3, 4), torch.ones(2, 3)), dict(epsilon=EPS, norm="l1"), ValueError, "norm"),
        (((2, 3, 4), torch.ones(2, 4)), dict(epsilon=EPS), ValueError, "mask"),
        (((2, 3), torch.ones(2, 3)), dict(epsilon=EPS), ValueError, "shape_or_like"),
        (("2x3x4", torch.ones(2, 3)), dict(epsilon=EPS), TypeError, "shape_or_like"),
        (((2, 3, 4), [[1, 1, 1]] * 2), dict(epsilon=EPS), TypeError, "mask"),
        (((2, 3, 4), torch.ones(2, 3)), dict(epsilon=EPS, dtype=torch.int32), TypeError, "dtype"),
        (((2, 3, 4), torch.ones(2, 3)), dict(epsilon=EPS, generator=0), TypeError, "generator"),
        ((torch.zeros(2, 3, 4, device="meta"), torch.ones(2, 3)), dict(epsilon=EPS), ValueError, "mask"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        modkern.init_delta(*args, **kwargs)
