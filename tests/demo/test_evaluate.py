"""Held-out evaluation of demo policies: transformers sampling, ``math_verify`` grading, the summary."""

from __future__ import annotations

import pytest

from tests.demo.conftest import SMALL
from vapo_pl.demo import evaluate, task


def test_evaluate_policy_on_the_small_model(small_build):
    """The real sampling path on a barely trained model: the numbers are in range, lengths are capped."""
    problems = task.generate_splits(SMALL.task)[1][:6]
    result = evaluate.evaluate_policy(small_build[1], problems, k=4, max_new_tokens=20)
    for key in ("greedy", "mean@4", "pass@4"):
        assert 0.0 <= result[key] <= 1.0
    assert result["pass@4"] >= result["mean@4"]
    assert sum(v["problems"] for v in result["by_carries"].values()) == 6
    assert result["response_chars"]["min"] <= result["response_chars"]["max"] <= 20


def test_grade_uses_math_verify():
    p = task.Problem(47, (("+", 5), ("-", 3), ("+", 8)))
    got = evaluate.grade([p.solution(), p.solution([0]), "no answer", "\\boxed{57.0}"], [p.answer] * 4)
    assert got.tolist() == [True, False, False, True]


def test_sample_responses_rejects_greedy_n():
    with pytest.raises(ValueError, match="n="):
        evaluate.sample_responses(None, None, ["47+5=?"], n=2, temperature=0.0)


def test_evaluate_policy_metrics_hand_worked(small_build, monkeypatch):
    """Sampling replaced by a script (problem i: its first i samples right), so each metric is known."""
    problems = task.generate_splits(SMALL.task)[1][:6]
    wrong = {p.prompt: p.solution()[: -len(p.answer) - 1] + f"{int(p.answer) + 1}}}" for p in problems}
    right = {p.prompt: p.solution() for p in problems}

    def scripted(model, tokenizer, prompts, *, n, temperature, **kwargs):
        if temperature == 0:
            return [[right[p] if i == 0 else wrong[p]] for i, p in enumerate(prompts)]
        return [[right[p] if j < i else wrong[p] for j in range(n)] for i, p in enumerate(prompts)]

    monkeypatch.setattr(evaluate, "sample_responses", scripted)
    result = evaluate.evaluate_policy(small_build[1], problems, k=8)
    assert result["greedy"] == pytest.approx(1 / 6)
    # right samples per problem: 0, 1, 2, 3, 4, 5 of 8; of the first 4: 0, 1, 2, 3, 4, 4
    assert result["mean@8"] == pytest.approx(15 / 48)
    assert result["mean@4"] == pytest.approx(14 / 24)
    assert result["pass@8"] == pytest.approx(5 / 6)
    lengths = [len(right[p.prompt]) for p in problems] + [len(wrong[p.prompt]) for p in problems]
    assert result["response_chars"]["min"] == min(lengths) and result["response_chars"]["max"] == max(lengths)
    for c, row in result["by_carries"].items():
        idx = [i for i, p in enumerate(problems) if len(p.carries) == c]
        assert row["problems"] == len(idx)
        assert row["mean@8"] == pytest.approx(sum(idx) / (8 * len(idx)))
        assert row["pass@8"] == pytest.approx(sum(i > 0 for i in idx) / len(idx))


def test_evaluate_policy_rejects_small_k(small_build):
    with pytest.raises(ValueError, match="k must be"):
        evaluate.evaluate_policy(small_build[1], [], k=2)
