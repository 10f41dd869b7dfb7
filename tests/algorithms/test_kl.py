"""Tests for vapo_pl/algorithms/kl.py: KL estimators, reward penalty and coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalty_rewards,
)

NAN = math.nan
LN2 = math.log(2.0)


def test_hand_worked_estimates_and_gradients():
    # pi = 0.5, pi_ref = 0.25: log_ratio = ln 2 = 0.693147.
    #   k1 = ln 2                                  = 0.693147
    #   k2 = 0.5 * (ln 2)^2                        = 0.240227
    #   k3 = pi_ref/pi - ln(pi_ref/pi) - 1 = 0.5 + ln 2 - 1 = 0.193147
    # Gradients w.r.t. logp: k1 -> 1, k2 -> log_ratio = ln 2, k3 -> 1 - pi_ref/pi = 0.5.
    expected = {"k1": (LN2, 1.0), "k2": (0.5 * LN2**2, LN2), "k3": (0.5 + LN2 - 1, 0.5)}
    for kind, (value, grad) in expected.items():
        logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
        kl = kl_estimate(logp, torch.tensor([[math.log(0.25)]], dtype=torch.float64), kind)
        assert kl.item() == pytest.approx(value, abs=1e-14), kind
        kl.sum().backward()
        assert logp.grad.item() == pytest.approx(grad, abs=1e-14), kind


def _random_pair(seed, vocab, scale):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(logp + scale * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    return logp, ref


@pytest.mark.parametrize("seed", range(4))
def test_k1_and_k3_are_unbiased(seed):
    # Exact expectation over y ~ pi (no sampling noise): sum_y pi(y) k(y) = KL(pi || pi_ref) for k1
    # and k3 (for k3: sum pi * pi_ref/pi = 1, so E[k3] = 1 + KL - 1).
    logp, ref = _random_pair(seed, vocab=13, scale=1.0)
    pi = logp.exp()
    kl = (pi * (logp - ref)).sum()
    assert kl.item() > 0.05  # the distributions really differ
    for kind in ("k1", "k3"):
        expectation = (pi * kl_estimate(logp, ref, kind)).sum()
        assert expectation.item() == pytest.approx(kl.item(), abs=1e-12), kind
    # k2 is biased: for distributions this far apart its expectation differs noticeably.
    assert abs((pi * kl_estimate(logp, ref, "k2")).sum().item() - kl.item()) > 1e-4


def test_k2_is_nearly_unbiased_for_close_distributions():
    # Schulman: E[k2] = KL + O(d^3) when pi_ref is close to pi; with perturbation size d = 1e-2
    # the relative error is O(d).
    logp, ref = _random_pair(0, vocab=13, scale=1e-2)
    pi = logp.exp()
    kl = (pi * (logp - ref)).sum().item()
    k2 = (pi * kl_estimate(logp, ref, "k2")).sum().item()
    assert abs(k2 - kl) / kl < 3e-2


@pytest.mark.parametrize("seed", range(3))
def test_estimators_match_their_formulas_and_signs(seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 5
    ref = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 5
    k1, k2, k3 = (kl_estimate(logp, ref, k) for k in KL_ESTIMATORS)
    for i in range(4):
        for j in range(7):
            x = ref[i, j].item() - logp[i, j].item()  # log(pi_ref / pi)
            assert k1[i, j].item() == pytest.approx(-x, abs=1e-12)
            assert k2[i, j].item() == pytest.approx(0.5 * x * x, abs=1e-12)
            assert k3[i, j].item() == pytest.approx(math.exp(x) - x - 1, abs=1e-12)
    # k2, k3 >= 0 per sample; k1 is negative wherever pi < pi_ref.
    assert bool((k2 >= 0).all()) and bool((k3 >= 0).all())
    assert bool((k1 < 0).any())


def test_k3_is_accurate_when_policies_nearly_agree():
    # log ratio 1e-6: k3 = x^2/2 - x^3/6 + ... = 4.9999983e-13. The naive exp(x) - x - 1 in float64
    # gives 5.0004e-13 here (relative error 9e-5, cancellation); expm1(x) - x keeps ~10 digits.
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    k3 = kl_estimate(logp, logp - 1e-6, "k3").item()
    x = 1e-6
    assert k3 == pytest.approx(x * x / 2 - x**3 / 6, rel=1e-9, abs=0)


def test_kl_penalty_rewards_hand_worked_with_nan_padding():
    # beta = 0.1, k1. Row 0: rewards [0, 1], log ratios [ln2, -ln2] -> [0 - 0.1 ln2, 1 + 0.1 ln2]
    #                              = [-0.0693147, 1.0693147]
    # Row 1: one real token, reward 0.5, log ratio 0 -> 0.5; padding (NaN in every input) -> 0.
    rewards = torch.tensor([[0.0, 1.0], [0.5, NAN]], dtype=torch.float64)
    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [-1.0, NAN]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [-1.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    out = kl_penalty_rewards(rewards, logp, ref, mask, beta=0.1, kind="k1")
    expected = torch.tensor([[-0.1 * LN2, 1 + 0.1 * LN2], [0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # k3 on row 0 t0 (from the hand-worked case above): 0 - 0.1 * 0.193147 = -0.0193147
    out3 = kl_penalty_rewards(rewards, logp, ref, mask, beta=0.1, kind="k3")
    assert out3[0, 0].item() == pytest.approx(-0.1 * (0.5 + LN2 - 1), abs=1e-14)
    assert out3[1, 1].item() == 0.0


def test_kl_penalty_rewards_beta_zero_and_detached():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=g) < 0.6
    out = kl_penalty_rewards(rewards, logp, ref, mask, beta=0.0, kind="k2")
    torch.testing.assert_close(out, torch.where(mask, rewards, 0.0), rtol=0, atol=0)
    assert not kl_penalty_rewards(rewards, logp, ref, mask, beta=0.5, kind="k1").requires_grad


def test_kl_invalid_arguments():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_estimate(x, x[:, :2], "k1")
    with pytest.raises(ValueError, match="kind"):
        kl_penalty_rewards(x, x, x, mask, beta=0.1, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        kl_penalty_rewards(x, x, x, mask, beta=-0.1, kind="k1")
    with pytest.raises(ValueError, match="token_rewards"):
        kl_penalty_rewards(x[:1], x, x, mask, beta=0.1, kind="k1")


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 10.0, 1e-3):
        ctl.update(kl, n_steps=512)
    assert ctl.value == 0.05


def test_adaptive_controller_hand_worked():
    # beta 0.1, target 6, horizon 10000, n_steps 256.
    #   KL 9:   e = clip(9/6 - 1 = 0.5)  = 0.2  -> x (1 + 0.2*256/10000 = 1.00512)
    #   KL 3:   e = clip(3/6 - 1 = -0.5) = -0.2 -> x 0.99488
    #   KL 6.6: e = 6.6/6 - 1 = 0.1 (unclipped) -> x 1.00256
    #   KL 6:   e = 0                           -> x 1
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    expected = 0.1
    for kl, factor in ((9.0, 1.00512), (3.0, 0.99488), (6.6, 1.00256), (6.0, 1.0)):
        ctl.update(kl, n_steps=256)
        expected *= factor
        assert ctl.value == pytest.approx(expected, rel=1e-12), kl


def test_adaptive_controller_moves_towards_target():
    # Property: KL persistently above target -> beta grows monotonically (at the capped rate);
    # below target -> shrinks; beta never turns negative even for n_steps >> horizon.
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    previous = up.value
    for _ in range(5):
        up.update(50.0, n_steps=10)
        assert up.value > previous
        previous = up.value
    assert up.value == pytest.approx(0.1 * 1.02**5, rel=1e-12)
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    down.update(0.0, n_steps=10)
    assert down.value == pytest.approx(0.1 * 0.98, rel=1e-12)
    down.update(0.0, n_steps=1000)  # raw factor 1 - 0.2*10 = -1, floored at 0
    assert down.value == 0.0


def test_controllers_validate_parameters():
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="init_kl_coef"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="target"):
            AdaptiveKLController(0.1, target=bad, horizon=10)
        with pytest.raises(ValueError, match="horizon"):
            AdaptiveKLController(0.1, target=1.0, horizon=bad)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(math.nan, n_steps=1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, n_steps=-1)
    with pytest.raises(ValueError, match="current_kl"):
        FixedKLController(0.1).update(math.inf, n_steps=1)
