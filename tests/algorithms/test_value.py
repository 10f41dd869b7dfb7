"""Tests for vapo_pl/algorithms/value.py: PPO2 clipped value loss and explained variance."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.value import explained_variance, value_loss

NAN = math.nan


def _hand_batch():
    # Row 0 (all real tokens), clip c = 0.2:
    #   t0: V=1.0 V_old=0.8 R=1.5 -> V-V_old = 0.2 (inside) -> both terms (1-1.5)^2 = 0.25 -> 0.5*0.25 = 0.125
    #   t1: V=2.0 V_old=1.0 R=3.0 -> unclipped (2-3)^2 = 1; V_clipped = 1.2 -> (1.2-3)^2 = 3.24 -> 0.5*3.24 = 1.62
    #   t2: V=0.5 V_old=0.5 R=0.0 -> both 0.25 -> 0.125
    # Row 1 (t2 is padding, full of NaN):
    #   t0: V=2.0 V_old=1.0 R=2.0 -> unclipped 0; V_clipped = 1.2 -> 0.64 -> 0.32
    #   t1: V=0.5 V_old=1.0 R=0.0 -> unclipped 0.25; V_clipped = 0.8 -> 0.64 -> 0.32
    values = torch.tensor([[1.0, 2.0, 0.5], [2.0, 0.5, NAN]], dtype=torch.float64)
    old_values = torch.tensor([[0.8, 1.0, 0.5], [1.0, 1.0, NAN]], dtype=torch.float64)
    returns = torch.tensor([[1.5, 3.0, 0.0], [2.0, 0.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return values, old_values, returns, mask


def test_value_loss_hand_worked_clipped():
    values, old_values, returns, mask = _hand_batch()
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    expected = torch.tensor([[0.125, 1.62, 0.125], [0.32, 0.32, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    # The clipped term is strictly larger at row0 t1, row1 t0, row1 t1: 3 of 5 real tokens.
    assert stats["vf_clipfrac"].item() == pytest.approx(3 / 5, abs=1e-12)
    assert not stats["vf_clipfrac"].requires_grad


def test_value_loss_hand_worked_unclipped():
    values, old_values, returns, mask = _hand_batch()
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=None)
    # 0.5 * (V - R)^2: row0 0.5*[0.25, 1, 0.25]; row1 0.5*[0, 0.25], padding 0.
    expected = torch.tensor([[0.125, 0.5, 0.125], [0.0, 0.125, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_loss_gradient_and_nan_padding():
    # d/dV 0.5*(V-R)^2 = V - R on real tokens; padding (NaN everywhere) gets exactly 0, not NaN.
    # Where the clipped term wins (row0 t1, row1 t0/t1) it is constant in V, so the gradient is 0:
    # PPO2 stops pushing the critic further from its old value.
    values, old_values, returns, mask = _hand_batch()
    v = values.clone().requires_grad_()
    value_loss(v, old_values, returns, mask, clip_range=None)[0].sum().backward()
    expected = torch.tensor([[-0.5, -1.0, 0.5], [0.0, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(v.grad, expected, rtol=0, atol=1e-12)

    v = values.clone().requires_grad_()
    value_loss(v, old_values, returns, mask, clip_range=0.2)[0].sum().backward()
    assert torch.isfinite(v.grad).all()
    # Where V stays inside the clip range both terms are the same function of V near V, so the
    # gradient is V - R again: row0 t0 -> 1.0 - 1.5 = -0.5, row0 t2 -> 0.5 - 0.0 = 0.5.
    expected = torch.tensor([[-0.5, 0.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(v.grad, expected, rtol=0, atol=1e-12)


def _naive_value_loss(values, old_values, returns, mask, clip):
    b, t = values.shape
    loss = torch.zeros(b, t, dtype=torch.float64)
    clipped = n = 0
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            v, vo, r = values[i, j].item(), old_values[i, j].item(), returns[i, j].item()
            unclipped = (v - r) ** 2
            if clip is None:
                loss[i, j] = 0.5 * unclipped
            else:
                vc = min(max(v, vo - clip), vo + clip)
                loss[i, j] = 0.5 * max(unclipped, (vc - r) ** 2)
                clipped += (vc - r) ** 2 > unclipped
            n += 1
    return loss, clipped / max(n, 1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("clip", [None, 0.05, 0.5])
def test_value_loss_matches_naive_loop(seed, clip):
    g = torch.Generator().manual_seed(seed)
    b, t = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    returns = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    # Garbage on padding must not matter.
    garbage = torch.tensor([NAN, 1e300, -math.inf], dtype=torch.float64)
    for x in (values, old_values, returns):
        x[~mask] = garbage[torch.randint(0, 3, (int((~mask).sum()),), generator=g)]
    loss, stats = value_loss(values, old_values, returns, mask, clip)
    ref_loss, ref_frac = _naive_value_loss(values, old_values, returns, mask, clip)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    assert stats["vf_clipfrac"].item() == pytest.approx(ref_frac, abs=1e-12)


def test_clipping_is_inactive_when_values_equal_old_values():
    # First PPO epoch: V == V_old, so the clipped and unclipped losses coincide and nothing is clipped.
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    returns = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    clipped, stats = value_loss(values, values.clone(), returns, mask, clip_range=0.01)
    plain, _ = value_loss(values, values.clone(), returns, mask, clip_range=None)
    torch.testing.assert_close(clipped, plain, rtol=0, atol=0)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_loss_invalid_arguments():
    values, old_values, returns, mask = _hand_batch()
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_range"):
            value_loss(values, old_values, returns, mask, clip_range=bad)
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old_values, returns[:, :2], mask, clip_range=0.2)


def test_explained_variance_hand_worked():
    # R = [0, 2, 4], V = [1, 2, 3]: R - V = [-1, 0, 1].
    # Var[R] = (4 + 0 + 4)/3 = 8/3, Var[R - V] = (1 + 0 + 1)/3 = 2/3 -> EV = 1 - (2/3)/(8/3) = 0.75
    # (same ratio with the Bessel correction: (2/2)/(8/2) = 1/4). Padding holds NaN.
    returns = torch.tensor([[0.0, 2.0, NAN], [4.0, NAN, NAN]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, NAN], [3.0, 1e300, NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.75, abs=1e-12)


def test_explained_variance_properties():
    g = torch.Generator().manual_seed(1)
    returns = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) < 0.8
    # A perfect critic, and one off by a constant: residual variance 0 -> EV = 1.
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(returns + 5.0, returns, mask).item() == pytest.approx(1.0, abs=1e-12)
    # A constant critic: Var[R - c] = Var[R] -> EV = 0.
    assert explained_variance(torch.full_like(returns, 0.3), returns, mask).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # A critic predicting -R: Var[2R] = 4 Var[R] -> EV = -3.
    assert explained_variance(-returns, returns, mask).item() == pytest.approx(-3.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_explained_variance_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 5, generator=g, dtype=torch.float64)
    returns = values + torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) < 0.7
    mask[0, 0] = mask[0, 1] = True
    r = [returns[i, j].item() for i in range(4) for j in range(5) if mask[i, j]]
    d = [returns[i, j].item() - values[i, j].item() for i in range(4) for j in range(5) if mask[i, j]]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    values[~mask] = NAN
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - var(d) / var(r), abs=1e-10)


def test_explained_variance_undefined_is_nan_and_detached():
    # All returns equal (e.g. every response wrong -> every return 0): Var[R] = 0, EV undefined.
    values = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    ev = explained_variance(values, torch.zeros(2, 3, dtype=torch.float64), mask)
    assert math.isnan(ev.item()) and not ev.requires_grad
    assert math.isnan(explained_variance(values, torch.randn(2, 3, dtype=torch.float64), mask & False).item())
    with pytest.raises(ValueError, match="returns"):
        explained_variance(values, torch.zeros(2, 2), mask)
