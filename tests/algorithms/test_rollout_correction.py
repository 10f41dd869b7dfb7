"""Sampler/trainer mismatch corrections (TIS, MIS) and metrics against plain-Python loop references, and their
gradients through a policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.policy_losses import POLICY_LOSSES, PolicyLossParams
from vapo_pl.algorithms.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    CorrectionParams,
    mismatch_metrics,
)


def _batch(seed: int = 0, b: int = 5, t: int = 7, scale: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(b, t, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    rollout[~mask] = float("nan")  # padding may hold anything
    return old, rollout, mask


def _loop_weights(name: str, old, rollout, mask, p: CorrectionParams) -> list[list[float]]:
    out = []
    for i in range(old.shape[0]):
        toks = [j for j in range(old.shape[1]) if mask[i, j]]
        seq = math.exp(max(-20.0, min(20.0, sum(float(old[i, j] - rollout[i, j]) for j in toks))))
        row = []
        for j in range(old.shape[1]):
            if not mask[i, j]:
                row.append(0.0)
                continue
            r = math.exp(float(old[i, j] - rollout[i, j]))
            row.append({"none": 1.0,
                        "token_tis": min(r, p.tis_cap),
                        "seq_tis": min(seq, p.tis_cap),
                        "token_mis": float(p.mis_low <= r <= p.mis_high),
                        "seq_mis": float(p.mis_low <= seq <= p.mis_high)}[name])
        out.append(row)
    return out


@pytest.mark.parametrize("name", ["none", "token_tis", "seq_tis", "token_mis", "seq_mis"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_match_the_loop_reference(name, seed):
    old, rollout, mask = _batch(seed, b=16, scale=0.6 if "seq" not in name else 0.3)
    p = CorrectionParams(tis_cap=1.5, mis_low=0.6, mis_high=1.8)
    out = ROLLOUT_CORRECTIONS.get(name)(old, rollout, mask, p)
    ref = torch.tensor(_loop_weights(name, old, rollout, mask, p), dtype=torch.float64)
    assert torch.allclose(out.weights.double(), ref, rtol=1e-5, atol=1e-7)
    assert not out.weights.requires_grad and torch.isfinite(out.weights).all()
    on = ref[mask]
    if "mis" in name:  # not a trivial case: some tokens kept, some dropped, and the share counted
        assert (on == 0).any() and (on == 1).any()
        assert out.stats["dropped_share"].item() == pytest.approx((on == 0).double().mean().item())
    elif "tis" in name:
        assert (on == p.tis_cap).any() and (on < p.tis_cap).any()
        assert out.stats["truncated_share"].item() == pytest.approx((on == p.tis_cap).double().mean().item())


def test_tis_truncation_share_and_mean():
    old = torch.zeros(1, 4)
    rollout = torch.log(torch.tensor([[1.0, 0.25, 2.0, 4.0]]))  # r = 1, 4, 0.5, 0.25
    out = ROLLOUT_CORRECTIONS.get("token_tis")(old, rollout, torch.ones(1, 4, dtype=torch.bool), CorrectionParams())
    assert torch.allclose(out.weights, torch.tensor([[1.0, 2.0, 0.5, 0.25]]))
    assert out.stats["truncated_share"].item() == pytest.approx(0.25)
    assert out.stats["weight_mean"].item() == pytest.approx((1 + 2 + 0.5 + 0.25) / 4)


@pytest.mark.parametrize("name", ["token_tis", "seq_tis", "token_mis", "seq_mis"])
def test_gradient_is_the_weighted_policy_gradient(name):
    """The weights are constants: d(sum w * loss)/d logp = w * d loss / d logp, token by token, and the trainer's
    old log-probs receive no gradient through them."""
    old, rollout, mask = _batch(3, scale=0.5 if "seq" not in name else 0.2)
    logp = (old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9), dtype=old.dtype)
            ).requires_grad_()
    old_leaf = old.clone().requires_grad_()
    adv = torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=old.dtype)
    loss_fn, pparams = POLICY_LOSSES.get("ppo"), PolicyLossParams()
    corr = ROLLOUT_CORRECTIONS.get(name)(old_leaf, rollout, mask, CorrectionParams(mis_low=0.7, mis_high=1.4))
    (loss_fn(logp, old, adv, mask, pparams).loss * corr.weights).sum().backward()
    plain = logp.detach().clone().requires_grad_()
    loss_fn(plain, old, adv, mask, pparams).loss.sum().backward()
    assert torch.allclose(logp.grad, corr.weights * plain.grad)
    assert old_leaf.grad is None
    assert (corr.weights[mask] != 1).any()  # the weights did something


def test_mismatch_metrics_match_the_loop_reference():
    old, rollout, mask = _batch(5, scale=0.8)
    got = mismatch_metrics(old, rollout, mask)
    d = [float(old[i, j] - rollout[i, j]) for i in range(old.shape[0]) for j in range(old.shape[1]) if mask[i, j]]
    assert got["mismatch/logp_abs_diff_mean"] == pytest.approx(sum(map(abs, d)) / len(d))
    assert got["mismatch/logp_abs_diff_max"] == pytest.approx(max(map(abs, d)))
    assert got["mismatch/kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / len(d))
    share = sum(not (0.5 <= math.exp(x) <= 2.0) for x in d) / len(d)
    assert got["mismatch/ratio_outside_share"] == pytest.approx(share) and 0 < share < 1
    same = mismatch_metrics(old, old.clone(), mask)
    assert same["mismatch/kl_k3"] == 0 and same["mismatch/logp_abs_diff_max"] == 0
    assert mismatch_metrics(old, rollout, torch.zeros_like(mask)) == {}


def test_params_and_config_are_checked():
    from vapo_pl.config import AlgorithmConfig

    with pytest.raises(ValueError, match="tis_cap"):
        CorrectionParams(tis_cap=0)
    with pytest.raises(ValueError, match="mis_low < 1 < mis_high"):
        CorrectionParams(mis_low=1.2)
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction: unknown 'tis'"):
        AlgorithmConfig(rollout_correction="tis")
    with pytest.raises(ValueError, match=r"algorithm\.tis_cap"):
        AlgorithmConfig(rollout_correction="token_tis", tis_cap=float("inf"))
    assert AlgorithmConfig(rollout_correction="seq_mis").correction_params() == CorrectionParams()
