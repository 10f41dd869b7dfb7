"""Tests for vapo_pl/algorithms/policy_losses.py.

For each loss: a hand-worked case (arithmetic in comments), a naive per-sequence / per-token loop
reference against the vectorised code (loss, gradients and stats; float64, atol 1e-10), and the
property its paper states. Hand cases use ``old_logp = 0`` and ``logp = log r`` so the ratio is ``r``;
``grad`` is d loss[b, t] / d logp[b, t].
"""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.aggregation import aggregate
from vapo_pl.algorithms.policy_losses import POLICY_LOSSES, PolicyLossParams

NAN = float("nan")
F64 = torch.float64
STAT_KEYS = {"pg_clipfrac_low", "pg_clipfrac_high", "approx_kl", "ratio_mean", "ratio_max"}


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def _run(name, logp, old_logp, adv, mask, **params):
    """Loss output and the per-token gradient d loss[b, t] / d logp[b, t]."""
    leaf = logp.clone().requires_grad_(True)
    out = POLICY_LOSSES.get(name)(leaf, old_logp, adv, mask, PolicyLossParams(**params))
    (grad,) = torch.autograd.grad(out.loss.sum(), leaf)
    return out, grad


def _ratio_case(ratios, adv):
    """old_logp = 0 and logp = log r, one row, every token real."""
    logp = torch.log(_t([ratios]))
    return logp, torch.zeros_like(logp), _t([adv]), torch.ones_like(logp, dtype=torch.bool)


def _assert_list(actual, expected):
    torch.testing.assert_close(actual.detach(), _t(expected), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# registry and validation


def test_registry_holds_the_four_losses():
    assert POLICY_LOSSES.names() == ["aspo", "cispo", "gspo", "ppo"]


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ValueError, match="aspo, cispo, gspo, ppo"):
        POLICY_LOSSES.get("reinforce")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"eps_low": -0.1}, "eps_low"),
        ({"eps_low": NAN}, "eps_low"),
        ({"eps_high": -0.01}, "eps_high"),
        ({"eps_high": "0.2"}, "eps_high"),
        ({"dual_clip_c": 1.0}, "dual_clip_c"),
        ({"dual_clip_c": 0.5}, "dual_clip_c"),
        ({"dual_clip_c": -3.0}, "dual_clip_c"),
        ({"dual_clip_c": math.inf}, "dual_clip_c"),
        ({"dual_clip_c": NAN}, "dual_clip_c"),
    ],
)
def test_invalid_params_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PolicyLossParams(**kwargs)


def test_valid_params_are_accepted():
    p = PolicyLossParams(eps_low=0.0, eps_high=0.0, dual_clip_c=1.01)
    assert (p.eps_low, p.eps_high, p.dual_clip_c) == (0.0, 0.0, 1.01)
    assert PolicyLossParams() == PolicyLossParams(eps_low=0.2, eps_high=0.28, dual_clip_c=None)


def test_aspo_requires_dual_clip_c():
    logp, old, adv, mask = _ratio_case([1.0], [1.0])
    with pytest.raises(ValueError, match="dual_clip_c"):
        POLICY_LOSSES.get("aspo")(logp, old, adv, mask, PolicyLossParams())


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "aspo"])
def test_shape_mismatch_raises_naming_the_input(name):
    logp = torch.zeros(2, 3, dtype=F64)
    p = PolicyLossParams(dual_clip_c=3.0)
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES.get(name)(logp, logp, torch.zeros(2, 4, dtype=F64), logp.bool(), p)
    with pytest.raises(ValueError, match="mask"):
        POLICY_LOSSES.get(name)(logp, logp, logp, torch.ones(3, 2, dtype=torch.bool), p)
    with pytest.raises(ValueError, match="logp"):
        POLICY_LOSSES.get(name)(logp[0], logp[0], logp[0], logp[0].bool(), p)


# --------------------------------------------------------------------------------------------------
# PPO


def test_ppo_hand_worked_with_clip_fractions():
    # eps_low 0.2, eps_high 0.28 -> clip(r) in [0.8, 1.28]; loss = -min(r A, clip(r) A)
    logp = torch.log(_t([[1.5, 0.5, 1.1, 0.9], [0.5, 1.5, 1.0, 1.0]]))
    old = torch.zeros_like(logp)
    adv = _t([[1.0, -1.0, -2.0, 2.0], [1.0, -1.0, NAN, NAN]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    logp[1, 2:] = NAN
    out, grad = _run("ppo", logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # row 0: r=1.5,A=1:  min(1.5, 1.28) = 1.28 -> -1.28, clipped high, grad 0
    #        r=0.5,A=-1: min(-0.5, -0.8) = -0.8 -> 0.8, clipped low, grad 0
    #        r=1.1,A=-2: min(-2.2, -2.2) -> 2.2, grad -A r = 2.2
    #        r=0.9,A=2:  -> -1.8, grad -A r = -1.8
    # row 1: r=0.5,A=1:  min(0.5, 0.8) = 0.5 -> -0.5, not clipped (clip only stops improvement), grad -0.5
    #        r=1.5,A=-1: min(-1.5, -1.28) = -1.5 -> 1.5, grad 1.5; then padding: 0
    _assert_list(out.loss, [[-1.28, 0.8, 2.2, -1.8], [-0.5, 1.5, 0.0, 0.0]])
    _assert_list(grad, [[0.0, 0.0, 2.2, -1.8], [-0.5, 1.5, 0.0, 0.0]])
    s = out.stats
    assert set(s) == STAT_KEYS  # no dual_clipfrac without a dual clip
    assert s["pg_clipfrac_low"].item() == pytest.approx(1 / 6)  # r=0.5, A<0
    assert s["pg_clipfrac_high"].item() == pytest.approx(1 / 6)  # r=1.5, A>0
    # (1.5 + 0.5 + 1.1 + 0.9 + 0.5 + 1.5) / 6 = 1.0
    assert s["ratio_mean"].item() == pytest.approx(1.0)
    assert s["ratio_max"].item() == pytest.approx(1.5)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.9, 0.5, 1.5)]
    assert s["approx_kl"].item() == pytest.approx(sum(k3) / 6)
    assert all(v.shape == () and not v.requires_grad for v in s.values())


def test_ppo_dual_clip_bounds_negative_advantage_loss_at_minus_c_a():
    # c = 3. A < 0: loss = -max(min(rA, clip(r)A), cA) = min(max(-rA, -clip(r)A), -cA)
    logp, old, adv, mask = _ratio_case(
        [1000.0, 2.0, 1000.0, math.exp(50.0), 0.5], [-2.0, -1.0, 1.0, -0.5, -1.0]
    )
    plain, _ = _run("ppo", logp, old, adv, mask)
    dual, dual_grad = _run("ppo", logp, old, adv, mask, dual_clip_c=3.0)
    # r=1000,A=-2: plain -rA = 2000; dual min(2000, 6) = 6 = -cA, gradient 0 (hard bound)
    # r=2,A=-1:    2 < 3, unchanged, grad -A r = 2
    # r=1000,A=1:  A > 0 is untouched by the dual clip: -1.28
    # r=e^50,A=-0.5: log-ratio clamped to 20 before exp; loss -cA = 1.5, grad 0 and finite
    # r=0.5,A=-1:  lower clip: max(0.5, 0.8) = 0.8 < 3
    _assert_list(dual.loss, [[6.0, 2.0, -1.28, 1.5, 0.8]])
    _assert_list(dual_grad, [[0.0, 2.0, 0.0, 0.0, 0.0]])
    assert plain.loss[0, 0].item() == pytest.approx(2000.0)
    assert plain.loss[0, 1:3].tolist() == dual.loss[0, 1:3].tolist()
    assert dual.stats["dual_clipfrac"].item() == pytest.approx(2 / 5)  # tokens 0 and 3
    assert "dual_clipfrac" not in plain.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_dual_clip_property_loss_never_exceeds_minus_c_a(seed):
    g = torch.Generator().manual_seed(seed)
    c = 3.0
    logp = torch.empty(4, 50, dtype=F64).uniform_(-3.0, 8.0, generator=g)
    old = torch.zeros_like(logp)
    adv = -torch.rand(4, 50, generator=g, dtype=F64) - 0.01  # A < 0
    mask = torch.ones_like(logp, dtype=torch.bool)
    dual, _ = _run("ppo", logp, old, adv, mask, dual_clip_c=c)
    plain, _ = _run("ppo", logp, old, adv, mask)
    r = logp.exp()
    assert torch.all(dual.loss <= -c * adv + 1e-12)
    big = r > c
    assert big.any() and (~big).any()
    torch.testing.assert_close(dual.loss[big], -c * adv[big], atol=1e-10, rtol=0)  # equals -cA exactly
    torch.testing.assert_close(dual.loss[~big], plain.loss[~big], atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------------
# GSPO


def _gspo_hand_case():
    old = _t([[-1.0, -2.0, NAN], [-0.5, -1.5, -0.7]])
    log_ratio = _t([[0.1, 0.3, 0.0], [0.3, -0.2, -0.04]])
    logp = old + log_ratio
    adv = _t([[1.0, 1.0, NAN], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return logp, old, adv, mask


def test_gspo_hand_worked_sequence_ratio():
    # eps 0.1 -> clip(s) in [0.9, 1.1]
    # seq 0: mean log-ratio (0.1 + 0.3) / 2 = 0.2, s0 = e^0.2 = 1.2214, A = 1
    #        min(1.2214, 1.1) = 1.1 -> loss -1.1 on both tokens, clipped high, grad 0
    # seq 1: mean log-ratio (0.3 - 0.2 - 0.04) / 3 = 0.02, s1 = e^0.02 = 1.0202, A = -1
    #        min(-1.0202, -1.0202) -> loss 1.0202 on all 3 tokens, grad -A s1 = 1.0202 each
    # The per-token ratios 1.35, 0.82, 0.96 of seq 1 play no part: one ratio per sequence.
    logp, old, adv, mask = _gspo_hand_case()
    out, grad = _run("gspo", logp, old, adv, mask, eps_low=0.1, eps_high=0.1)
    s0, s1 = math.exp(0.2), math.exp(0.02)
    _assert_list(out.loss, [[-1.1, -1.1, 0.0], [s1, s1, s1]])
    _assert_list(grad, [[0.0, 0.0, 0.0], [s1, s1, s1]])
    st = out.stats
    assert st["ratio_max"].item() == pytest.approx(s0)  # the largest sequence ratio
    assert st["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5)  # token-weighted
    assert st["pg_clipfrac_high"].item() == pytest.approx(2 / 5)  # seq 0's two tokens
    assert st["pg_clipfrac_low"].item() == 0.0
    k3 = [math.expm1(x) - x for x in (0.1, 0.3, 0.3, -0.2, -0.04)]  # per-token log-ratios
    assert st["approx_kl"].item() == pytest.approx(sum(k3) / 5)


def test_gspo_per_token_value_is_the_sequence_ratio():
    # Unclipped (eps large), A = 1: loss_t = -s_i on every token of sequence i, s_i = exp(mean log-ratio).
    logp, old, adv, mask = _gspo_hand_case()
    adv = torch.where(mask, torch.ones_like(adv), adv)
    out, _ = _run("gspo", logp, old, adv, mask, eps_low=10.0, eps_high=10.0)
    _assert_list(out.loss, [[-math.exp(0.2)] * 2 + [0.0], [-math.exp(0.02)] * 3])


def _random_inputs(seed, B, T, spread=0.6):
    """Random log-probs, advantages and right-padded masks with NaN on padding (one empty row if B > 2)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.empty(B, T, dtype=F64).uniform_(0.05, 1.0, generator=g))
    logp = old + spread * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if B > 2:
        mask[2] = False
    fill = torch.full_like(logp, NAN)
    weights = torch.rand(B, T, generator=g, dtype=F64)  # upstream gradient, to test full Jacobian rows
    return (
        torch.where(mask, logp, fill),
        torch.where(mask, old, fill),
        torch.where(mask, adv, fill),
        mask,
        weights,
    )


@pytest.mark.parametrize("seed, B, T", [(0, 1, 1), (1, 2, 5), (2, 4, 7), (3, 8, 16)])
def test_gspo_matches_paper_sequence_objective(seed, B, T):
    """GSPO objective with s_i = exp(mean_t log-ratio) carrying the full gradient, advantage per sequence:
    our per-token form aggregated with seq-mean-token-mean has the same value and gradient."""
    logp, old, adv, mask, _ = _random_inputs(seed, B, T, spread=0.1)
    adv = adv[:, :1].expand(B, T).clone()  # one advantage per sequence
    p = {"eps_low": 0.03, "eps_high": 0.04}

    leaf = logp.clone().requires_grad_(True)
    out = POLICY_LOSSES.get("gspo")(leaf, old, adv, mask, PolicyLossParams(**p))
    total = aggregate(out.loss, mask, "seq-mean-token-mean")
    (grad,) = torch.autograd.grad(total, leaf)

    ref_leaf = logp.clone().requires_grad_(True)
    terms = []
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        if not idx:
            continue
        s = torch.exp(sum(ref_leaf[b, t] - old[b, t] for t in idx) / len(idx))
        a = adv[b, 0]
        terms.append(-torch.minimum(s * a, s.clamp(1 - p["eps_low"], 1 + p["eps_high"]) * a))
    ref = sum(terms) / len(terms)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)

    torch.testing.assert_close(total, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, torch.nan_to_num(ref_grad, nan=0.0), atol=1e-10, rtol=0)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------
# CISPO


def test_cispo_hand_worked_clipped_tokens_keep_gradient():
    # loss = -sg(clip(r, 0.8, 1.28)) * A * logp ; grad = -clip(r) A
    logp, old, adv, mask = _ratio_case([1.5, 0.5, 1.1, 1.5], [1.0, -1.0, 2.0, -1.0])
    out, grad = _run("cispo", logp, old, adv, mask)
    _, ppo_grad = _run("ppo", logp, old, adv, mask)
    # r=1.5,A=1:  w=1.28, loss -1.28*1*log1.5 = -1.28*0.405465 = -0.518995, grad -1.28 (PPO: 0)
    # r=0.5,A=-1: w=0.8,  loss -0.8*(-1)*log0.5 = 0.8*(-0.693147) = -0.554518, grad 0.8 (PPO: 0)
    # r=1.1,A=2:  w=1.1,  loss -2.2*log1.1 = -2.2*0.0953102 = -0.209682, grad -2.2 (PPO: -A r = -2.2)
    # r=1.5,A=-1: w=1.28 (CISPO clips the weight whatever A's sign), loss log1.5*1.28, grad 1.28 (PPO: 1.5)
    _assert_list(
        out.loss, [[-1.28 * math.log(1.5), 0.8 * math.log(0.5), -2.2 * math.log(1.1), 1.28 * math.log(1.5)]]
    )
    _assert_list(grad, [[-1.28, 0.8, -2.2, 1.28]])
    _assert_list(ppo_grad, [[0.0, 0.0, -2.2, 1.5]])
    assert out.stats["pg_clipfrac_low"].item() == pytest.approx(1 / 4)
    assert out.stats["pg_clipfrac_high"].item() == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_cispo_property_nonzero_gradient_where_ppo_is_zero(seed):
    logp, old, adv, mask, _ = _random_inputs(seed, 6, 20)
    _, grad = _run("cispo", logp, old, adv, mask)
    _, ppo_grad = _run("ppo", logp, old, adv, mask)
    r = (logp - old).exp()
    clipped = mask & (((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8)))
    assert clipped.sum() >= 3
    assert torch.all(ppo_grad[clipped] == 0)
    assert torch.all(grad[clipped] != 0)
    # and the direction agrees with PPO's everywhere PPO has a gradient: sign(-A)
    live = mask & (ppo_grad != 0)
    assert torch.equal(torch.sign(grad[live]), torch.sign(ppo_grad[live]))


# --------------------------------------------------------------------------------------------------
# ASPO


def test_aspo_hand_worked():
    # c = 3, eps 0.2 / 0.28. Kept tokens: loss = -A * min(w, c) in value, grad -A * min(w, c);
    # w = 1/r for A > 0 (flipped), w = r for A < 0.
    logp, old, adv, mask = _ratio_case(
        [0.5, 0.25, 1.5, 0.5, 2.0, 5.0, 1.0], [1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 2.0]
    )
    out, grad = _run("aspo", logp, old, adv, mask, dual_clip_c=3.0)
    # r=0.5,A=1:   w = 2 -> loss -2, grad -2   (PPO: -A r = -0.5; the unlikely good token gets more)
    # r=0.25,A=1:  w = 4 > 3 -> soft dual clip: loss -3, grad -3
    # r=1.5,A=1:   r > 1.28 with A > 0 -> hard-masked: 0, 0
    # r=0.5,A=-1:  r < 0.8 with A < 0 -> hard-masked: 0, 0
    # r=2,A=-1:    w = 2 -> loss 2, grad 2 (= PPO)
    # r=5,A=-2:    w = 5 > 3 -> loss -A c = 6, grad 6 (hard dual-clip PPO: loss 6, grad 0)
    # r=1,A=2:     w = 1 -> loss -2, grad -2
    _assert_list(out.loss, [[-2.0, -3.0, 0.0, 0.0, 2.0, 6.0, -2.0]])
    _assert_list(grad, [[-2.0, -3.0, 0.0, 0.0, 2.0, 6.0, -2.0]])
    _, ppo_grad = _run("ppo", logp, old, adv, mask, dual_clip_c=3.0)
    assert ppo_grad[0, 0].item() == pytest.approx(-0.5) and ppo_grad[0, 5].item() == 0.0
    st = out.stats
    assert st["pg_clipfrac_low"].item() == pytest.approx(1 / 7)
    assert st["pg_clipfrac_high"].item() == pytest.approx(1 / 7)
    assert st["dual_clipfrac"].item() == pytest.approx(2 / 7)
    assert st["ratio_max"].item() == pytest.approx(5.0)  # of r, not of the flipped weight


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aspo_positive_weight_is_old_over_new_in_value_with_gradient_through_pi(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.empty(3, 10, dtype=F64).uniform_(0.05, 1.0, generator=g))
    logp = old + torch.empty(3, 10, dtype=F64).uniform_(-0.2, 0.2, generator=g)  # r in [0.82, 1.22]
    adv = torch.rand(3, 10, generator=g, dtype=F64) + 0.1  # A > 0
    mask = torch.ones_like(logp, dtype=torch.bool)
    out, grad = _run("aspo", logp, old, adv, mask, dual_clip_c=3.0)
    pi, pi_old = logp.exp(), old.exp()
    # value: -A * pi_old / pi
    torch.testing.assert_close(out.loss, -adv * pi_old / pi, atol=1e-10, rtol=0)
    # gradient of -A * pi_old * pi / sg(pi^2) w.r.t. logp: -A * pi_old / pi (pushes pi up) ...
    torch.testing.assert_close(grad, -adv * pi_old / pi, atol=1e-10, rtol=0)
    # ... while the gradient of the value itself would be +A * pi_old / pi (pushing pi down)
    assert torch.all(grad < 0)
    # the flip gives less likely tokens (smaller r) the larger update, the reverse of PPO's r-weighting
    _, ppo_grad = _run("ppo", logp, old, adv, mask)
    r = (logp - old).exp()
    order = torch.argsort(r.flatten())
    assert torch.all(torch.diff(grad.flatten()[order] / adv.flatten()[order]) >= 0)  # -1/r rises with r
    assert torch.all(torch.diff(ppo_grad.flatten()[order] / adv.flatten()[order]) <= 0)  # -r falls


def test_aspo_negative_advantage_tokens_equal_ppo_below_the_dual_bound():
    logp, old, adv, mask, _ = _random_inputs(5, 5, 12)
    adv = -adv.abs()
    r = (logp - old).exp()
    keep = mask & (r >= 0.8) & (r <= 3.0)
    out, grad = _run("aspo", logp, old, adv, mask, dual_clip_c=3.0)
    ppo, ppo_grad = _run("ppo", logp, old, adv, mask)
    assert keep.sum() >= 5
    torch.testing.assert_close(out.loss[keep], ppo.loss[keep], atol=1e-10, rtol=0)
    torch.testing.assert_close(grad[keep], ppo_grad[keep], atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------------
# loop references for all losses


def _ref_token_loss(name, lp, olp, a, p: PolicyLossParams):
    """One token's loss, scalar arithmetic straight from each paper. ``lp`` is a 0-d tensor with grad."""
    lo, hi, c = 1 - p.eps_low, 1 + p.eps_high, p.dual_clip_c
    log_r = torch.clamp(lp - olp, -20.0, 20.0)
    if name == "ppo":
        r = torch.exp(log_r)
        obj = min(r * a, torch.clamp(r, lo, hi) * a)
        if c is not None and a < 0:
            obj = torch.clamp(obj, min=c * a)  # max(obj, cA)
        return -obj
    r = float(torch.exp(log_r.detach()))
    if name == "cispo":
        return -min(max(r, lo), hi) * a * lp
    assert name == "aspo"
    if (a < 0 and r < lo) or (a > 0 and r > hi):
        return lp * 0.0
    pi, pi_old = torch.exp(lp), math.exp(olp)
    if a > 0:
        return -a * (pi_old * pi / pi.detach() ** 2 if 1 / r <= c else c * pi / pi.detach())
    return -a * (torch.exp(lp - olp) if r <= c else c * pi / pi.detach())


def _ref_gspo_row(lp_row, olp_row, a_row, idx, p: PolicyLossParams):
    """GSPO-token: s_it = sg(s_i) * pi_t / sg(pi_t), then PPO's clipped surrogate on s_it."""
    s = math.exp(
        max(-20.0, min(20.0, sum(float(lp_row[t].detach()) - float(olp_row[t]) for t in idx) / len(idx)))
    )
    out = {}
    for t in idx:
        s_t = s * torch.exp(lp_row[t] - lp_row[t].detach())
        a = float(a_row[t])
        obj = min(s_t * a, torch.clamp(s_t, 1 - p.eps_low, 1 + p.eps_high) * a)
        if p.dual_clip_c is not None and a < 0:
            obj = torch.clamp(obj, min=p.dual_clip_c * a)  # max(obj, cA)
        out[t] = (-obj, s)
    return out


def _reference(name, logp, old, adv, mask, p):
    """Per-sequence, per-token loops: loss (B, T) with grad graph, and the stats."""
    B, T = logp.shape
    rows, n = [], 0
    low = high = dual = kl = rsum = 0.0
    rmax = 0.0
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        gspo = _ref_gspo_row(logp[b], old[b], adv[b], idx, p) if name == "gspo" and idx else {}
        row = []
        for t in range(T):
            if not mask[b, t]:
                row.append(torch.zeros((), dtype=F64))
                continue
            a, olp = float(adv[b, t]), float(old[b, t])
            lr = max(-20.0, min(20.0, float(logp[b, t].detach()) - olp))
            r = math.exp(lr)
            if name == "gspo":
                loss, ratio = gspo[t]
            else:
                loss, ratio = _ref_token_loss(name, logp[b, t], olp, a, p), r
            row.append(loss)
            n += 1
            kl += math.expm1(lr) - lr
            rsum += ratio
            rmax = max(rmax, ratio)
            lo, hi = 1 - p.eps_low, 1 + p.eps_high
            if name == "cispo":
                low += r < lo
                high += r > hi
            else:
                low += a < 0 and ratio < lo
                high += a > 0 and ratio > hi
            if name == "aspo":
                w = 1 / r if a > 0 else r
                dual += a != 0 and not (a < 0 and r < lo) and not (a > 0 and r > hi) and w > p.dual_clip_c
            elif p.dual_clip_c is not None:
                dual += a < 0 and ratio > p.dual_clip_c
        rows.append(torch.stack(row))
    n = max(n, 1)
    stats = {
        "pg_clipfrac_low": low / n,
        "pg_clipfrac_high": high / n,
        "approx_kl": kl / n,
        "ratio_mean": rsum / n,
        "ratio_max": rmax,
    }
    if name == "aspo" or (p.dual_clip_c is not None and name != "cispo"):
        stats["dual_clipfrac"] = dual / n
    return torch.stack(rows), stats


CASES = [
    ("ppo", {"eps_low": 0.2, "eps_high": 0.28}),
    ("ppo", {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0}),
    ("ppo", {"eps_low": 0.1, "eps_high": 0.1, "dual_clip_c": 1.5}),
    ("gspo", {"eps_low": 0.05, "eps_high": 0.08}),
    ("gspo", {"eps_low": 0.05, "eps_high": 0.08, "dual_clip_c": 1.2}),
    ("cispo", {"eps_low": 0.2, "eps_high": 0.28}),
    ("cispo", {"eps_low": 1.0, "eps_high": 0.5}),
    ("aspo", {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0}),
    ("aspo", {"eps_low": 0.1, "eps_high": 0.2, "dual_clip_c": 1.5}),
]


@pytest.mark.parametrize("name, params", CASES)
@pytest.mark.parametrize("seed, B, T", [(0, 1, 1), (1, 2, 5), (2, 4, 9), (3, 6, 12)])
def test_matches_loop_reference(name, params, seed, B, T):
    logp, old, adv, mask, weights = _random_inputs(seed, B, T)
    p = PolicyLossParams(**params)

    leaf = logp.clone().requires_grad_(True)
    out = POLICY_LOSSES.get(name)(leaf, old, adv, mask, p)
    (grad,) = torch.autograd.grad((out.loss * weights).sum(), leaf)

    ref_leaf = logp.clone().requires_grad_(True)
    ref_loss, ref_stats = _reference(name, ref_leaf, old, adv, mask, p)
    (ref_grad,) = torch.autograd.grad((ref_loss * weights).sum(), ref_leaf, allow_unused=True)
    ref_grad = torch.zeros_like(logp) if ref_grad is None else torch.where(mask, ref_grad, 0.0)

    torch.testing.assert_close(out.loss, ref_loss.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)
    assert set(out.stats) == set(ref_stats)
    for key, value in ref_stats.items():
        assert out.stats[key].item() == pytest.approx(value, abs=1e-10), key


# --------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("name, params", CASES)
def test_padding_garbage_changes_no_output(name, params):
    logp, old, adv, mask, _ = _random_inputs(9, 5, 8)
    p = PolicyLossParams(**params)
    results = []
    for fill in (0.0, NAN, math.inf, -math.inf, 1e30):
        f = torch.full_like(logp, fill)
        leaf = torch.where(mask, logp, f).requires_grad_(True)
        out = POLICY_LOSSES.get(name)(leaf, torch.where(mask, old, f), torch.where(mask, adv, f), mask, p)
        total = aggregate(out.loss, mask, "token-mean")
        (grad,) = torch.autograd.grad(total, leaf)
        results.append((out, total, grad))
    out0, total0, grad0 = results[0]
    assert torch.isfinite(grad0).all() and torch.all(grad0[~mask] == 0)
    assert torch.all(out0.loss[~mask] == 0)
    for out, total, grad in results[1:]:
        assert torch.equal(out.loss, out0.loss)
        assert torch.equal(total, total0)
        assert torch.equal(grad, grad0)
        assert out.stats.keys() == out0.stats.keys()
        for key in out0.stats:
            assert torch.equal(out.stats[key], out0.stats[key]), key


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "aspo"])
def test_all_padding_gives_zero_loss_and_finite_stats(name):
    nan = torch.full((2, 3), NAN, dtype=F64)
    out = POLICY_LOSSES.get(name)(
        nan, nan, nan, torch.zeros(2, 3, dtype=torch.bool), PolicyLossParams(dual_clip_c=3.0)
    )
    assert torch.all(out.loss == 0)
    assert all(torch.isfinite(v) for v in out.stats.values())
