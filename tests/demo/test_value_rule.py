"""The demo task's value rule (the critic's ceiling in ``benchmarks/critic_fit.py``) and the diagnostic itself."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import REPO
from vapo_pl.demo import task
from vapo_pl.demo.value_rule import RuleValue

# 47+5=52 and 49+8=57 carry, 52-3=49 does not: two forks
PROMPT = "47+5-3+8=?"


def test_rule_values_follow_the_visible_state():
    problem = task.parse_prompt(PROMPT)
    forks = [f.index for f in task.forks(problem)]
    assert len(forks) == 2
    rule = RuleValue([1.0, 0.4, 0.1])
    gold = problem.solution()
    v = rule.values(PROMPT, gold, len(gold) + 1)  # + EOS
    # two forks ahead up to and including the first fork's token, then one, then none
    assert v[: forks[0] + 1] == [0.1] * (forks[0] + 1)
    assert v[forks[0] + 1 : forks[1] + 1] == [0.4] * (forks[1] - forks[0])
    assert v[forks[1] + 1 :] == [1.0] * (len(gold) + 1 - forks[1] - 1)
    # the first carry dropped: the state after that token is lost for good
    wrong = problem.solution(forgotten=(0,))
    w = rule.values(PROMPT, wrong, len(wrong) + 1)
    assert w[: forks[0] + 1] == [0.1] * (forks[0] + 1)
    assert w[forks[0] + 1 :] == [0.0] * (len(wrong) - forks[0])


def test_rule_fit_estimates_success_by_forks_ahead():
    problem = task.parse_prompt(PROMPT)
    right, wrong = problem.solution(), problem.solution(forgotten=(2,))  # the second carry dropped
    rule = RuleValue.fit([PROMPT] * 4, [right, right, right, wrong], [1.0, 1.0, 1.0, 0.0])
    # every response is on track with two and one forks ahead: 3/4 succeed; only the right ones reach 0 ahead
    assert rule.table == pytest.approx([1.0, 0.75, 0.75])


def test_critic_fit_runs_and_reports_the_references(small_build, tmp_path):
    """The diagnostic end to end on the small base policy: real vLLM rollouts, a few critic steps. That policy
    solves nothing (every return would be 0 and every explained variance undefined), so a stand-in grader
    calls a response right when its length is even. The references are what they are by definition; the curve
    has one row per evaluation."""
    import torch

    _, model_dir, _ = small_build
    spec = importlib.util.spec_from_file_location("critic_fit", REPO / "benchmarks" / "critic_fit.py")
    critic_fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(critic_fit)
    args = ["--policy", str(model_dir), "--train-prompts", "16", "--heldout-prompts", "8", "--samples", "4",
            "--steps", "4", "--batch-size", "8", "--eval-every", "2", "--threads", "1", "--cache", str(tmp_path)]
    def even_length(texts, answers):
        return torch.tensor([len(t) % 2 == 0 for t in texts])

    result = critic_fit.main(args, grade=even_length)
    assert result["references"]["batch mean"]["all"] == pytest.approx(0.0, abs=0.2)
    assert all(math.isfinite(row["all"]) for row in result["curve"])
    assert set(result["references"]) == {"batch mean", "prompt only", "rule"}
    assert [row["step"] for row in result["curve"]] == [2, 4]
    assert len(list(tmp_path.glob("rollouts-*.pt"))) == 1
    again = critic_fit.main(args, grade=even_length)  # rollouts come from the cache: the same references
    assert again["references"] == result["references"]
    with_lp = critic_fit.main(args + ["--logprob-features"], grade=even_length)  # the critic's log-prob head
    assert set(with_lp["references"]) == {"batch mean", "prompt only", "rule", "logprob min"}
    assert with_lp["references"]["rule"] == result["references"]["rule"]
    assert all(math.isfinite(row["all"]) for row in with_lp["curve"])
    assert with_lp["curve"] != result["curve"]  # another critic


def test_the_binned_reference_predicts_each_bins_success_rate():
    import torch

    spec = importlib.util.spec_from_file_location("critic_fit", REPO / "benchmarks" / "critic_fit.py")
    critic_fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(critic_fit)
    x = torch.arange(40.0).view(4, 10)  # 40 distinct feature values, 4 bins of 10
    y = (x >= 30).float()  # only the top bin succeeds
    mask = torch.ones_like(x, dtype=torch.bool)
    pred = critic_fit.binned_reference(x, mask, y, x, bins=4)
    torch.testing.assert_close(pred, y)
    mask[3] = False  # bins from the masked-in values only (0-29, none succeeding): a 39 falls in their top bin
    assert float(critic_fit.binned_reference(x, mask, y, torch.tensor([39.0]), bins=4)[0]) == 0.0
