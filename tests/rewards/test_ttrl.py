"""``ttrl``: majority vote per group, equivalent answers vote together, deterministic ties, label accuracy."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.rewards._helpers import make_inputs
from vapo_pl.rewards import resolve_reward_fn
from vapo_pl.rewards import ttrl as ttrl_module
from vapo_pl.rewards.ttrl import majority_vote
from vapo_pl.rewards.verifier import KILL_GRACE_S, VerifierPool

ttrl = resolve_reward_fn("ttrl")


def boxed(*answers: str) -> list[str]:
    return [f"\\boxed{{{a}}}" if a is not None else "no idea" for a in answers]


def test_majority_hand_worked():
    # Group 0: 3, 3, 5, (none)  -> "3" has 2 votes, wins.
    # Group 1: 7, 8, 8, 8       -> "8" has 3 votes, wins.
    responses = boxed("3", "3", "5", None, "7", "8", "8", "8")
    out = ttrl(make_inputs(responses, groups=[0, 0, 0, 0, 1, 1, 1, 1]))
    assert out.scores.tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    assert out.correct.tolist() == [True, True, False, False, False, True, True, True]
    assert out.extracted == ["3", "3", "5", None, "7", "8", "8", "8"]
    assert out.stats["ttrl/answered_frac"] == pytest.approx(7 / 8)
    assert out.stats["ttrl/majority_frac"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert "ttrl/label_accuracy" not in out.stats  # no gold answers


def test_equivalent_answers_vote_together():
    # 1000, 1,000 and 1000.0 are one answer (3 votes) against 999 (2 votes) ...
    responses = boxed("999", "1000", "1,000", "1000.0", "999")
    out = ttrl(make_inputs(responses, groups=[0] * 5))
    assert out.scores.tolist() == [0, 1, 1, 1, 0]
    # ... while string voting sees three different strings with one vote each, and 999 wins.
    out = ttrl(make_inputs(responses, groups=[0] * 5), equivalence="string")
    assert out.scores.tolist() == [1, 0, 0, 0, 1]
    # Normalisation alone already merges spacing and \dfrac variants.
    out = ttrl(make_inputs(boxed("\\dfrac{1}{2}", "\\frac{1}{2}", "3"), groups=[0] * 3), equivalence="string")
    assert out.scores.tolist() == [1, 1, 0]


def test_ties_break_towards_the_answer_seen_first():
    # 2-2 tie: the cluster whose first member comes first wins, whatever the later order.
    assert ttrl(make_inputs(boxed("4", "6", "6", "4"), groups=[0] * 4)).scores.tolist() == [1, 0, 0, 1]
    assert ttrl(make_inputs(boxed("6", "4", "4", "6"), groups=[0] * 4)).scores.tolist() == [1, 0, 0, 1]
    with_gap = ttrl(make_inputs(boxed(None, "6", "4", "4", "6"), groups=[0] * 5))
    assert with_gap.scores.tolist() == [0, 1, 0, 0, 1]
    # Equivalent forms join the earlier cluster, so the tie is judged on first appearance of either form.
    out = ttrl(make_inputs(boxed("2", "0.5", "\\frac12", "2"), groups=[0] * 4))
    assert out.scores.tolist() == [1, 0, 0, 1]
    runs = [ttrl(make_inputs(boxed("a", "b", "c", "d"), groups=[0] * 4)).scores.tolist() for _ in range(3)]
    assert runs == [[1, 0, 0, 0]] * 3


def test_label_accuracy_against_gold():
    # Group 0 (gold 1/2): 0.5 and \frac12 merge into 2 votes vs 3 (2 votes); 0.5 came first -> label 0.5, right.
    # Group 1 (gold 8): 7 and 8 tie 2-2, 7 came first -> label 7, wrong.
    # Group 2 (gold 5): no answers -> no label, counts as wrong.
    # Group 3 (unlabeled): not counted.
    responses = boxed("0.5", "\\frac12", "3", "3", "7", "8", "7", "8", None, None, "1", "1")
    answers = ["1/2"] * 4 + ["8"] * 4 + ["5"] * 2 + [None] * 2
    groups = [0] * 4 + [1] * 4 + [2] * 2 + [3] * 2
    out = ttrl(make_inputs(responses, answers, groups=groups))
    assert out.scores.tolist() == [1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1]
    assert out.stats["ttrl/label_accuracy"] == pytest.approx(1 / 3)


def test_groups_need_not_be_contiguous_or_dense():
    responses = boxed("1", "2", "1", "2", "2", "3")
    out = ttrl(make_inputs(responses, groups=[7, 3, 7, 3, 3, 7]))
    # group 7: 1, 1, 3 -> 1 wins; group 3: 2, 2, 2 -> 2 wins
    assert out.scores.tolist() == [1, 1, 1, 1, 1, 0]


def test_no_answers_at_all():
    out = ttrl(make_inputs(boxed(None, None, None), ["1", "1", "1"], groups=[0, 0, 0]))
    assert out.scores.tolist() == [0, 0, 0]
    assert out.stats["ttrl/majority_frac"] == 0.0 and out.stats["ttrl/label_accuracy"] == 0.0


def _majority_vote_reference(cluster: list[int], group: list[int]) -> list[bool]:
    """Loop version: per group, count votes per cluster; most votes wins, ties to the earliest first member."""
    agree = [False] * len(cluster)
    for g in set(group):
        idx = [i for i in range(len(cluster)) if group[i] == g and cluster[i] >= 0]
        if not idx:
            continue
        votes: dict[int, list[int]] = {}
        for i in idx:
            votes.setdefault(cluster[i], []).append(i)
        winner = max(votes, key=lambda c: (len(votes[c]), -votes[c][0]))
        for i in votes[winner]:
            agree[i] = True
    return agree


@pytest.mark.parametrize("seed", range(6))
def test_majority_vote_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(torch.randint(1, 6, (1,), generator=gen))
    b = int(torch.randint(1, 40, (1,), generator=gen))
    group = torch.randint(0, n_groups, (b,), generator=gen)
    group = torch.unique(group, return_inverse=True)[1]  # dense ids, as ttrl passes them
    # Clusters live inside one group: id = group * 10 + answer (0..3), -1 for "no answer".
    answer = torch.randint(-1, 4, (b,), generator=gen)
    cluster = torch.where(answer >= 0, group * 10 + answer, torch.full_like(answer, -1))
    expected = _majority_vote_reference(cluster.tolist(), group.tolist())
    assert majority_vote(cluster, group).tolist() == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="equivalence must be"):
        ttrl(make_inputs(boxed("1")), equivalence="sympy")
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        ttrl(make_inputs(boxed("1")), timeout_s=-1)


def test_hostile_answer_does_not_stall_the_merge():
    # "3" and the power tower: their comparison runs out (0.5 s), both stay alone. 0.5, \frac12 and
    # 1/2 still merge into 3 votes and beat the two "3"s.
    responses = boxed("3", "9^{9^{9^{9}}}", "0.5", "\\frac12", "1/2", "3")
    t0 = time.perf_counter()
    out = ttrl(make_inputs(responses, groups=[0] * 6), timeout_s=0.5)
    assert time.perf_counter() - t0 < 0.5 * (5 + 1) + KILL_GRACE_S
    assert out.scores.tolist() == [0, 0, 1, 1, 1, 0]
    assert out.stats["ttrl/merge_timeout_frac"] == 0.0


def test_merge_that_runs_out_falls_back_to_string_votes(monkeypatch):
    """The worker is stopped (SIGSTOP) so the whole cluster job hits the hard bound."""
    pool = VerifierPool(1)
    monkeypatch.setattr(ttrl_module, "get_pool", lambda num_workers=None: pool)
    try:
        pool.warm_up()
        os.kill(pool._workers[0].proc.pid, signal.SIGSTOP)
        responses = boxed("0.5", "\\frac12", "3", "3")  # merged this would be a 2-2 tie won by 0.5
        out = ttrl(make_inputs(responses, groups=[0] * 4), timeout_s=0.2)
        assert out.scores.tolist() == [0, 0, 1, 1]
        assert out.stats["ttrl/merge_timeout_frac"] == 1.0
    finally:
        pool.close()
