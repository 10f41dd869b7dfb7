"""Tests for vapo_pl/algorithms/advantages.py.

For each estimator: a hand-worked tiny case (arithmetic in comments), a naive per-sequence, per-token Python
reference compared with the vectorised code over seeds and shapes (float64, atol 1e-10), and the property
its paper states.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from vapo_pl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutputs,
    AdvantageParams,
    compute_gae,
    length_adaptive_lambda,
    lengths_from_mask,
)

NAN = float("nan")
F64 = torch.float64
ATOL = 1e-10
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "remax", "reinforce_pp")
GROUPED = ("grpo", "dr_grpo", "rloo")
SHAPES = [(1, 1), (3, 5), (6, 9), (8, 16)]
SEEDS = [0, 1, 2]


def run(name: str, inputs: AdvantageInputs, params: AdvantageParams | None = None) -> AdvantageOutputs:
    return ADVANTAGE_ESTIMATORS.get(name)(inputs, params or AdvantageParams())


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# random batches and naive references
# ----------------------------------------------------------------------------------------------------------


def random_mask(gen: torch.Generator, B: int, T: int, holes: bool) -> torch.Tensor:
    """Right-padded masks of random length (0..T, at least one row full); optionally with interior holes."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=gen) > 0.25
    return mask


def random_groups(gen: torch.Generator, B: int, min_size: int) -> torch.Tensor:
    """(B,) shuffled, non-contiguous group ids (7, 10, 13, ...) of random sizes, each >= min_size (B allowing)."""
    sizes, remaining = [], B
    while remaining > 0:
        size = int(torch.randint(min_size, min_size + 3, (1,), generator=gen))
        sizes.append(remaining if remaining - size < min_size else size)
        remaining -= sizes[-1]
    ids = torch.repeat_interleave(7 + 3 * torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(B, generator=gen)]


def random_inputs(seed: int, B: int, T: int, holes: bool = False, min_group: int = 1) -> AdvantageInputs:
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, B, T, holes)
    rewards = torch.randn(B, T, generator=gen, dtype=F64)
    values = torch.randn(B, T, generator=gen, dtype=F64)
    rewards[~mask] = NAN  # padding must never be read
    values[~mask] = NAN
    return AdvantageInputs(
        token_rewards=rewards,
        mask=mask,
        values=values,
        group_index=random_groups(gen, B, min_group),
        baseline_scores=torch.randn(B, generator=gen, dtype=F64),
    )


def real_positions(mask: torch.Tensor, b: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[b, t]]


def naive_gae(rewards, values, mask, gamma: float, lams: list[float]):
    """Textbook sum A_t = sum_l (gamma*lambda)^l delta_{t+l} per sequence, over its real tokens only."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    for b in range(B):
        pos = real_positions(mask, b)
        r = [float(rewards[b, t]) for t in pos]
        v = [float(values[b, t]) for t in pos] + [0.0]  # V after the last token is 0
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(pos))]
        for k, t in enumerate(pos):
            a = sum((gamma * lams[b]) ** (j - k) * deltas[j] for j in range(k, len(pos)))
            adv[b, t], ret[b, t] = a, a + v[k]
    return adv, ret


def naive_return_to_go(rewards, mask, gamma: float):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        pos = real_positions(mask, b)
        for k, t in enumerate(pos):
            out[b, t] = sum(gamma ** (j - k) * float(rewards[b, pos[j]]) for j in range(k, len(pos)))
    return out


def naive_scores(inputs: AdvantageInputs) -> list[float]:
    m = inputs.mask
    return [sum(float(inputs.token_rewards[b, t]) for t in real_positions(m, b)) for b in range(m.shape[0])]


def naive_group_advantages(name: str, inputs: AdvantageInputs, eps: float) -> list[float]:
    scores, groups = naive_scores(inputs), inputs.group_index.tolist()
    out = []
    for b, r in enumerate(scores):
        members = [scores[k] for k in range(len(scores)) if groups[k] == groups[b]]
        n = len(members)
        mean = sum(members) / n
        if name == "rloo":
            out.append(r - (sum(members) - r) / (n - 1))
        elif name == "dr_grpo":
            out.append(r - mean)
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)) if n > 1 else 0.0
            out.append((r - mean) / (std + eps))
    return out


def naive_whiten(x, mask, eps: float):
    flat = [float(x[b, t]) for b in range(x.shape[0]) for t in real_positions(mask, b)]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / max(len(flat) - 1, 1))
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in real_positions(mask, b):
            out[b, t] = (float(x[b, t]) - mean) / (std + eps)
    return out


def broadcast(per_seq: list[float], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=F64)
    for b in range(mask.shape[0]):
        for t in real_positions(mask, b):
            out[b, t] = per_seq[b]
    return out


def run_two_ranks(name, params, first: AdvantageInputs, second: AdvantageInputs):
    """Two threads stand in for two data-parallel ranks: ``reduce`` is a real all-reduce sum between them.

    A fake of torch.distributed (no process group here); it checks the estimator's collective calls line up.
    """
    barrier = threading.Barrier(2, timeout=20)
    slots: list = [None, None]

    def make_reduce(rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # neither rank overwrites its slot before both have read
            return total

        return reduce

    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(run, name, replace(inp, reduce=make_reduce(rank)), params)
            for rank, inp in enumerate((first, second))
        ]
        return [f.result() for f in futures]


def split_rows(inputs: AdvantageInputs, k: int) -> tuple[AdvantageInputs, AdvantageInputs]:
    def part(sl):
        return AdvantageInputs(
            token_rewards=inputs.token_rewards[sl],
            mask=inputs.mask[sl],
            values=inputs.values[sl],
            group_index=inputs.group_index[sl],
            baseline_scores=inputs.baseline_scores[sl],
        )

    return part(slice(0, k)), part(slice(k, None))


# ----------------------------------------------------------------------------------------------------------
# compute_gae
# ----------------------------------------------------------------------------------------------------------


def test_compute_gae_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, NAN]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=torch.tensor([0.5, 1.0]))
    # row 0, lambda 0.5: delta_2 = 1 + 0 - 0.7 = 0.3; delta_1 = 0 + 0.7 - 0.6 = 0.1; delta_0 = 0 + 0.6 - 0.5 = 0.1
    #   A_2 = 0.3; A_1 = 0.1 + 0.5*0.3 = 0.25; A_0 = 0.1 + 0.5*0.25 = 0.225; R = A + V = 0.725, 0.85, 1.0
    # row 1, lambda 1: delta_1 = 2 + 0 - 0.5 = 1.5; delta_0 = 0 + 0.5 - 1 = -0.5
    #   A_1 = 1.5; A_0 = -0.5 + 1.5 = 1.0; R = 1.0 + 1 = 2, 1.5 + 0.5 = 2 (the sum of future rewards)
    close(adv, [[0.225, 0.25, 0.3], [1.0, 1.5, 0.0]])
    close(ret, [[0.725, 0.85, 1.0], [2.0, 2.0, 0.0]])


def test_compute_gae_hand_worked_discount_and_hole():
    # real tokens at t = 0 and 2 (t = 1 is a hole, e.g. tool output): the scan skips it
    rewards = torch.tensor([[1.0, 99.0, 2.0]], dtype=F64)
    values = torch.tensor([[0.5, 99.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, False, True]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # delta_2 = 2 + 0.5*0 - 1 = 1; delta_0 = 1 + 0.5*V_2 - 0.5 = 1 + 0.5 - 0.5 = 1
    # A_2 = 1; A_0 = 1 + (0.5*0.5)*1 = 1.25; R_0 = 1.25 + 0.5 = 1.75, R_2 = 1 + 1 = 2; hole -> 0
    close(adv, [[1.25, 0.0, 1.0]])
    close(ret, [[1.75, 0.0, 2.0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("holes", [False, True])
def test_compute_gae_matches_naive_loop(seed, B, T, holes):
    inputs = random_inputs(seed, B, T, holes=holes)
    gen = torch.Generator().manual_seed(100 + seed)
    gamma = float(torch.rand((), generator=gen, dtype=F64))
    lams = torch.rand(B, generator=gen, dtype=F64)
    lams[0] = 0.0  # edge values of the range
    if B > 1:
        lams[1] = 1.0
    for lam in (lams, float(lams[-1])):
        adv, ret = compute_gae(inputs.token_rewards, inputs.values, inputs.mask, gamma, lam)
        lam_list = lams.tolist() if isinstance(lam, torch.Tensor) else [lam] * B
        exp_adv, exp_ret = naive_gae(inputs.token_rewards, inputs.values, inputs.mask, gamma, lam_list)
        close(adv, exp_adv)
        close(ret, exp_ret)


@pytest.mark.parametrize("seed", SEEDS)
def test_lambda_one_gamma_one_returns_are_reverse_cumsum_whatever_the_values(seed):
    inputs = random_inputs(seed, 6, 11)
    rewards = torch.where(inputs.mask, inputs.token_rewards, 0.0)
    reverse_cumsum = torch.where(inputs.mask, rewards.flip(1).cumsum(1).flip(1), 0.0)
    for scale in (0.0, 1.0, 1e3):  # the critic's values must not matter
        values = torch.where(inputs.mask, inputs.values * scale, NAN)
        out = run("gae", replace(inputs, values=values), AdvantageParams(gamma=1.0, lambda_critic=1.0))
        close(out.returns, reverse_cumsum)
        _, ret = compute_gae(inputs.token_rewards, values, inputs.mask, 1.0, 1.0)
        close(ret, reverse_cumsum)


# ----------------------------------------------------------------------------------------------------------
# gae estimator: Decoupled and Length-adaptive GAE
# ----------------------------------------------------------------------------------------------------------


def test_gae_estimator_hand_worked_decoupled():
    inputs = AdvantageInputs(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0]], dtype=F64),
        mask=torch.tensor([[True, True, True]]),
        values=torch.tensor([[0.5, 0.6, 0.7]], dtype=F64),
    )
    out = run("gae", inputs, AdvantageParams(gamma=1.0, lambda_policy=0.5, lambda_critic=1.0))
    # advantages with lambda_policy 0.5: 0.225, 0.25, 0.3 (as in test_compute_gae_hand_worked)
    # returns with lambda_critic 1: R_t = sum of future rewards = 1, 1, 1 (the terminal reward is not decayed)
    close(out.advantages, [[0.225, 0.25, 0.3]])
    close(out.returns, [[1.0, 1.0, 1.0]])
    close(out.lambda_policy, [0.5])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("holes", [False, True])
def test_gae_estimator_matches_naive_loop(seed, B, T, holes):
    """With holes (multi-turn episodes: observation tokens between turns), the decoupled lambdas and the
    length-adaptive lambda, computed on the policy-token count, against the loop reference."""
    inputs = random_inputs(seed, B, T, holes=holes)
    gen = torch.Generator().manual_seed(200 + seed)
    gamma, lam_p, lam_c = torch.rand(3, generator=gen, dtype=F64).tolist()
    for alpha in (None, 0.3):
        params = AdvantageParams(
            gamma=gamma, lambda_policy=lam_p, lambda_critic=lam_c, length_adaptive_alpha=alpha
        )
        out = run("gae", inputs, params)
        lengths = inputs.mask.sum(1).tolist()
        lams = (
            [lam_p] * B
            if alpha is None
            else [min(max(1 - 1 / (alpha * n), 0.0), 1.0) if n else 0.0 for n in lengths]
        )
        exp_adv, _ = naive_gae(inputs.token_rewards, inputs.values, inputs.mask, gamma, lams)
        _, exp_ret = naive_gae(inputs.token_rewards, inputs.values, inputs.mask, gamma, [lam_c] * B)
        close(out.advantages, exp_adv)
        close(out.returns, exp_ret)
        close(out.lambda_policy, lams)


@pytest.mark.parametrize("seed", SEEDS)
def test_decoupled_lambdas_change_advantages_not_returns(seed):
    inputs = random_inputs(seed, 5, 12)
    outs = [
        run("gae", inputs, AdvantageParams(lambda_policy=lp, lambda_critic=1.0)) for lp in (0.0, 0.5, 0.95)
    ]
    for out in outs[1:]:
        assert torch.equal(out.returns, outs[0].returns)
        assert not torch.allclose(out.advantages, outs[0].advantages)
    # coupled (lambda_policy == lambda_critic) recovers plain GAE: A = R - V
    coupled = run("gae", inputs, AdvantageParams(lambda_policy=0.9, lambda_critic=0.9))
    close(coupled.advantages, torch.where(inputs.mask, coupled.returns - inputs.values, 0.0))
    # the length-adaptive lambda also leaves the critic targets alone
    adaptive = run("gae", inputs, AdvantageParams(lambda_critic=1.0, length_adaptive_alpha=0.05))
    assert torch.equal(adaptive.returns, outs[0].returns)


def test_length_adaptive_lambda_hand_worked():
    lengths = torch.tensor([0, 10, 20, 40, 100])
    # alpha*l = 0, 0.5, 1, 2, 5 -> 1 - 1/(alpha*l) = -inf, -1, 0, 0.5, 0.8 -> clamped 0, 0, 0, 0.5, 0.8
    lam = length_adaptive_lambda(lengths, 0.05)
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.8]))
    # through the estimator: sequences of those lengths, padded to T = 100
    mask = torch.arange(100)[None, :] < lengths[:, None]
    inputs = AdvantageInputs(
        token_rewards=torch.zeros(5, 100, dtype=F64), mask=mask, values=torch.zeros(5, 100, dtype=F64)
    )
    out = run("gae", inputs, AdvantageParams(length_adaptive_alpha=0.05, lambda_policy=0.95))
    close(out.lambda_policy, [0.0, 0.0, 0.0, 0.5, 0.8])


@pytest.mark.parametrize("seed", SEEDS)
def test_length_adaptive_lambda_is_clamped_formula_per_sequence(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 200, (64,), generator=gen)
    alpha = float(torch.empty(()).uniform_(0.005, 0.2, generator=gen))
    lam = length_adaptive_lambda(lengths.to(F64), alpha)
    for n, value in zip(lengths.tolist(), lam.tolist()):
        if alpha * n <= 1:
            assert value == 0.0
        else:
            assert abs(value - (1 - 1 / (alpha * n))) < ATOL
    # with lambda = 0 the advantage is the one-step TD error r_t + V_{t+1} - V_t
    inputs = random_inputs(seed, 4, 6)
    out = run("gae", inputs, AdvantageParams(length_adaptive_alpha=0.1))  # alpha*l <= 0.6 for l <= 6
    assert torch.equal(out.lambda_policy, torch.zeros(4, dtype=F64))
    exp, _ = naive_gae(inputs.token_rewards, inputs.values, inputs.mask, 1.0, [0.0] * 4)
    close(out.advantages, exp)


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_whitening_is_global_across_ranks(seed):
    inputs = random_inputs(seed, 7, 9)
    params = AdvantageParams(lambda_policy=0.9, whiten_advantages=True)
    full = run("gae", inputs, params)
    raw = run("gae", inputs, replace(params, whiten_advantages=False))
    close(full.advantages, naive_whiten(raw.advantages, inputs.mask, params.eps))
    close(full.returns, raw.returns)  # whitening touches advantages only
    first, second = split_rows(inputs, 3)
    a, b = run_two_ranks("gae", params, first, second)
    close(torch.cat([a.advantages, b.advantages]), full.advantages)


# ----------------------------------------------------------------------------------------------------------
# outcome estimators: grpo, dr_grpo, rloo, remax
# ----------------------------------------------------------------------------------------------------------


def hand_batch() -> AdvantageInputs:
    """Five samples of two prompts (group ids 5 and 2, interleaved); scores are the masked token sums."""
    return AdvantageInputs(
        token_rewards=torch.tensor(
            [
                [0.0, 0.0, 1.0],  # group 5, score 1
                [1.0, 2.0, NAN],  # group 2, score 3
                [0.0, NAN, NAN],  # group 5, score 0
                [-0.5, 0.5, NAN],  # group 5, score 0
                [3.0, NAN, NAN],  # group 2, score 3
            ],
            dtype=F64,
        ),
        mask=torch.tensor(
            [
                [True, True, True],
                [True, True, False],
                [True, False, False],
                [True, True, False],
                [True, False, False],
            ]
        ),
        group_index=torch.tensor([5, 2, 5, 5, 2]),
        baseline_scores=torch.tensor([0.5, 3.0, 0.5, 0.5, 2.0], dtype=F64),
    )


def test_grpo_hand_worked():
    inputs = hand_batch()
    out = run("grpo", inputs, AdvantageParams(eps=1e-6))
    # group 5: scores 1, 0, 0; mean 1/3; deviations 2/3, -1/3, -1/3
    #   Bessel var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3) ~ 0.57735
    #   A = (2/3)/(std + eps) ~ 1.1547, (-1/3)/(std + eps) ~ -0.57735
    # group 2: scores 3, 3 -> 0
    std = 1 / math.sqrt(3)
    seq = [(2 / 3) / (std + 1e-6), 0.0, (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), 0.0]
    close(out.advantages, broadcast(seq, inputs.mask))
    close(out.returns, broadcast([1.0, 3.0, 0.0, 0.0, 3.0], inputs.mask))


def test_dr_grpo_hand_worked():
    inputs = hand_batch()
    out = run("dr_grpo", inputs)
    # r - group mean: group 5 -> 1 - 1/3 = 2/3, 0 - 1/3 = -1/3 (twice); group 2 -> 3 - 3 = 0
    close(out.advantages, broadcast([2 / 3, 0.0, -1 / 3, -1 / 3, 0.0], inputs.mask))
    # grpo without the std division is dr_grpo
    no_std = run("grpo", inputs, AdvantageParams(norm_by_std=False))
    close(no_std.advantages, out.advantages)


def test_rloo_hand_worked():
    inputs = hand_batch()
    out = run("rloo", inputs)
    # group 5 (1, 0, 0): row 0: 1 - (0 + 0)/2 = 1; rows 2, 3: 0 - (1 + 0)/2 = -0.5
    # group 2 (3, 3): 3 - 3/1 = 0
    close(out.advantages, broadcast([1.0, 0.0, -0.5, -0.5, 0.0], inputs.mask))


def test_remax_hand_worked():
    inputs = hand_batch()
    out = run("remax", inputs)
    # scores 1, 3, 0, 0, 3 minus greedy scores 0.5, 3, 0.5, 0.5, 2 = 0.5, 0, -0.5, -0.5, 1
    close(out.advantages, broadcast([0.5, 0.0, -0.5, -0.5, 1.0], inputs.mask))
    close(out.returns, broadcast([1.0, 3.0, 0.0, 0.0, 3.0], inputs.mask))


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", [(2, 3), (7, 5), (16, 8)])
def test_group_estimators_match_naive_loop(name, seed, B, T):
    inputs = random_inputs(seed, B, T, holes=seed == 2, min_group=2)
    params = AdvantageParams(eps=1e-3)
    out = run(name, inputs, params)
    close(out.advantages, broadcast(naive_group_advantages(name, inputs, params.eps), inputs.mask))
    close(out.returns, broadcast(naive_scores(inputs), inputs.mask))


@pytest.mark.parametrize("seed", SEEDS)
def test_remax_matches_naive_loop(seed):
    inputs = random_inputs(seed, 9, 7, holes=True)
    out = run("remax", inputs)
    expected = [s - float(g) for s, g in zip(naive_scores(inputs), inputs.baseline_scores)]
    close(out.advantages, broadcast(expected, inputs.mask))


@pytest.mark.parametrize("name", GROUPED)
def test_identical_rewards_give_exactly_zero_advantages(name):
    # 0.1 and 0.7 are not representable: a naive mean leaves a ~1e-17 residue that 1/(std + eps) would amplify
    scores = torch.tensor([0.1, 0.7, 0.1, 0.7, 0.1, 0.7, 0.7, 0.7], dtype=F64)
    inputs = AdvantageInputs(
        token_rewards=torch.stack([scores, torch.full_like(scores, NAN)], 1),
        mask=torch.tensor([[True, False]] * 8),
        group_index=torch.tensor([0, 1, 0, 1, 0, 1, 1, 1]),
    )
    out = run(name, inputs)
    assert not out.advantages.isnan().any()
    assert torch.equal(out.advantages, torch.zeros(8, 2, dtype=F64))


def test_grpo_singleton_group_gets_zero_advantage():
    inputs = AdvantageInputs(
        token_rewards=torch.tensor([[1.0], [0.0], [2.0]], dtype=F64),
        mask=torch.ones(3, 1, dtype=torch.bool),
        group_index=torch.tensor([0, 0, 1]),
    )
    for name in ("grpo", "dr_grpo"):
        adv = run(name, inputs).advantages
        assert adv[2, 0] == 0.0 and not adv.isnan().any()


def test_grpo_is_scale_invariant_dr_grpo_is_not():
    inputs = hand_batch()
    scaled = replace(inputs, token_rewards=inputs.token_rewards * 10)
    grpo, grpo10 = run("grpo", inputs), run("grpo", scaled)
    torch.testing.assert_close(grpo10.advantages, grpo.advantages, rtol=1e-5, atol=0)  # up to eps
    close(run("dr_grpo", scaled).advantages, 10 * run("dr_grpo", inputs).advantages)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_baseline_excludes_the_sample_itself(seed):
    gen = torch.Generator().manual_seed(seed)
    group_index = random_groups(gen, 10, 2)
    scores = torch.randn(10, 1, generator=gen, dtype=F64)  # one token per response: score = reward

    def baseline(rewards):
        out = run(
            "rloo", AdvantageInputs(rewards, torch.ones(10, 1, dtype=torch.bool), group_index=group_index)
        )
        return (rewards - out.advantages)[:, 0]  # A_j = r_j - b_j

    bumped = scores.clone()
    bumped[0] += 5.0
    before, after = baseline(scores), baseline(bumped)
    mates = group_index == group_index[0]
    G = int(mates.sum())
    # the sample's own baseline does not move with its reward; each group-mate's rises by 5/(G-1);
    # other groups are untouched
    expected_shift = mates.to(F64) * (5.0 / (G - 1))
    expected_shift[0] = 0.0
    close(after - before, expected_shift)


# ----------------------------------------------------------------------------------------------------------
# reinforce_pp
# ----------------------------------------------------------------------------------------------------------


def test_reinforce_pp_hand_worked():
    inputs = AdvantageInputs(
        token_rewards=torch.tensor([[-0.1, 1.0], [0.2, NAN]], dtype=F64),  # KL penalty -0.1, score 1 at EOS
        mask=torch.tensor([[True, True], [True, False]]),
    )
    out = run("reinforce_pp", inputs, AdvantageParams(gamma=1.0, eps=1e-6))
    # returns-to-go: row 0: -0.1 + 1 = 0.9, 1.0; row 1: 0.2
    # global mean = 2.1/3 = 0.7; deviations 0.2, 0.3, -0.5; Bessel var = (0.04 + 0.09 + 0.25)/2 = 0.19
    close(out.returns, [[0.9, 1.0], [0.2, 0.0]])
    std = math.sqrt(0.19)
    close(out.advantages, [[0.2 / (std + 1e-6), 0.3 / (std + 1e-6)], [-0.5 / (std + 1e-6), 0.0]])
    # gamma 0.5: row 0 returns-to-go -0.1 + 0.5*1 = 0.4, 1.0
    close(run("reinforce_pp", inputs, AdvantageParams(gamma=0.5)).returns, [[0.4, 1.0], [0.2, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,T", SHAPES[1:])
def test_reinforce_pp_matches_naive_loop(seed, B, T):
    inputs = random_inputs(seed, B, T, holes=seed == 1)
    gamma = [1.0, 0.9, 0.5][seed]
    params = AdvantageParams(gamma=gamma)
    out = run("reinforce_pp", inputs, params)
    rtg = naive_return_to_go(inputs.token_rewards, inputs.mask, gamma)
    close(out.returns, rtg)
    close(out.advantages, naive_whiten(rtg, inputs.mask, params.eps))


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_normalises_over_the_whole_batch(seed):
    inputs = random_inputs(seed, 8, 10)
    params = AdvantageParams()
    adv = run("reinforce_pp", inputs, params).advantages
    real = adv[inputs.mask]
    assert abs(real.mean()) < ATOL and abs(real.std() - 1) < 1e-4  # std/(std + eps)
    # two ranks that sum their statistics equal one rank holding the concatenated batch
    first, second = split_rows(inputs, 5)
    a, b = run_two_ranks("reinforce_pp", params, first, second)
    close(torch.cat([a.advantages, b.advantages]), adv)
    # ...and differ from normalising each half on its own
    alone = run("reinforce_pp", first, params).advantages
    assert not torch.allclose(alone, adv[:5])


# ----------------------------------------------------------------------------------------------------------
# padding, gradients, validation, registry
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("seed", SEEDS)
def test_padding_contents_change_no_output(name, seed):
    inputs = random_inputs(seed, 6, 8, holes=True, min_group=2)
    gen = torch.Generator().manual_seed(300 + seed)
    garbage = replace(
        inputs,
        token_rewards=torch.where(inputs.mask, inputs.token_rewards, torch.randn(6, 8, generator=gen) * 1e6),
        values=torch.where(inputs.mask, inputs.values, torch.full((6, 8), math.inf, dtype=F64)),
    )
    params = AdvantageParams(length_adaptive_alpha=0.2, whiten_advantages=True)
    a, b = run(name, inputs, params), run(name, garbage, params)
    for x, y in ((a.advantages, b.advantages), (a.returns, b.returns)):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)
        assert (x[~inputs.mask] == 0).all()


def test_outputs_carry_no_gradient():
    inputs = random_inputs(0, 3, 4, min_group=2)
    values = inputs.values.clone().requires_grad_(True)
    rewards = inputs.token_rewards.clone().requires_grad_(True)
    for name in ESTIMATORS:
        out = run(name, replace(inputs, values=values, token_rewards=rewards))
        assert not out.advantages.requires_grad and not out.returns.requires_grad


def test_lengths_from_mask():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    # 2 real tokens, 0, 2 (a hole does not count)
    assert torch.equal(lengths_from_mask(mask), torch.tensor([2, 0, 2]))


@pytest.mark.parametrize(
    "field,value",
    [
        ("gamma", -0.1),
        ("gamma", 1.5),
        ("gamma", NAN),
        ("lambda_policy", -0.01),
        ("lambda_policy", 1.01),
        ("lambda_critic", 2.0),
        ("lambda_critic", NAN),
        ("length_adaptive_alpha", 0.0),
        ("length_adaptive_alpha", -0.05),
        ("eps", 0.0),
        ("norm_by_std", "yes"),
    ],
)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdvantageParams(**{field: value})


def test_invalid_compute_gae_arguments_raise():
    r, v, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(r, v, m, 1.0, 1.5)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(r, v, m, 1.0, torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="lam"):
        compute_gae(r, v, m, 1.0, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(r, v, m, 1.1, 0.5)
    with pytest.raises(ValueError, match="values"):
        compute_gae(r, v[:, :2], m, 1.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(torch.tensor([3]), 0.0)


@pytest.mark.parametrize(
    "name,field",
    [
        ("gae", "values"),
        ("grpo", "group_index"),
        ("dr_grpo", "group_index"),
        ("rloo", "group_index"),
        ("remax", "baseline_scores"),
    ],
)
def test_missing_required_input_raises_naming_it(name, field):
    inputs = replace(random_inputs(0, 4, 3, min_group=2), **{field: None})
    with pytest.raises(ValueError, match=field):
        run(name, inputs)


def test_rloo_rejects_a_group_of_one():
    inputs = replace(hand_batch(), group_index=torch.tensor([5, 2, 5, 5, 9]))
    with pytest.raises(ValueError, match="group_index"):
        run("rloo", inputs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("token_rewards", torch.zeros(4)),
        ("mask", torch.ones(4, 3)),  # not bool
        ("mask", torch.ones(4, 2, dtype=torch.bool)),
        ("values", torch.zeros(4, 2)),
        ("group_index", torch.zeros(4)),  # float
        ("group_index", torch.zeros(3, dtype=torch.long)),
        ("baseline_scores", torch.zeros(4, 1)),
    ],
)
def test_malformed_inputs_raise_naming_the_field(field, value):
    good = {
        "token_rewards": torch.zeros(4, 3),
        "mask": torch.ones(4, 3, dtype=torch.bool),
        "values": torch.zeros(4, 3),
        "group_index": torch.zeros(4, dtype=torch.long),
        "baseline_scores": torch.zeros(4),
    }
    with pytest.raises(ValueError, match=field):
        AdvantageInputs(**{**good, field: value})


def test_registry_names_unknown_and_duplicate():
    assert ADVANTAGE_ESTIMATORS.names() == sorted(ESTIMATORS)
    with pytest.raises(ValueError, match="valid names: dr_grpo, gae, grpo, reinforce_pp, remax, rloo"):
        ADVANTAGE_ESTIMATORS.get("ppo")
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda inputs, params: None)
    assert ADVANTAGE_ESTIMATORS.get("grpo").__name__ == "grpo_advantages"  # the original survives
