"""``math_verify``: real answers from AIME24 and GSM8K, equivalent forms, percent, anchored answers."""

from __future__ import annotations

import time

import pytest
import torch

from tests.rewards._helpers import make_inputs, read_jsonl
from vapo_pl.rewards import resolve_reward_fn

math_verify = resolve_reward_fn("math_verify")


def _gsm8k_final(row: dict) -> str:
    return row["answer"].split("####")[-1].strip()


def _plus_one(number: str) -> str:
    return str(int(number.replace(",", "")) + 1)


def test_all_aime24_answers():
    answers = [row["answer"] for row in read_jsonl("aime24.jsonl")]
    assert len(answers) == 30
    responses = [f"Reasoning ... so the result is \\boxed{{{a}}}" for a in answers]
    responses += [f"Hence \\boxed{{{int(a)}}}." for a in answers]  # "025" written as 25
    wrong = [f"Reasoning ... so the result is \\boxed{{{_plus_one(a)}}}" for a in answers]
    out = math_verify(make_inputs(responses + wrong, answers * 3))
    assert out.scores[:60].tolist() == [1.0] * 60
    assert out.scores[60:].tolist() == [0.0] * 30
    assert out.correct.tolist() == [True] * 60 + [False] * 30
    assert out.extracted[:30] == answers


def test_gsm8k_final_numbers_200():
    rows = read_jsonl("gsm8k_test.jsonl")[:200]
    golds = [_gsm8k_final(r) for r in rows]
    assert any("," in g for g in golds)  # thousands separators are in the sample
    boxed = [f"She earns it all.\nThe total is \\boxed{{{g}}}." for g in golds]
    hashes = [
        f"{r['answer'].split('####')[0]}#### {g}" for r, g in zip(rows, golds)
    ]  # the reference solution itself
    wrong = [f"The total is \\boxed{{{_plus_one(g)}}}." for g in golds]
    t0 = time.perf_counter()
    out = math_verify(make_inputs(boxed + hashes + wrong, golds * 3))
    elapsed = time.perf_counter() - t0
    assert out.scores.tolist() == [1.0] * 400 + [0.0] * 200
    assert elapsed < 20, f"600 GSM8K gradings took {elapsed:.1f} s"


EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "0.5"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("1/2", "0.5"),
    ("27.0", "27"),
    ("27", "27.0"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("1{,}000", "1000"),
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("50\\%", "0.5"),
    ("(1, 2)", "(1,2)"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("[0, 1)", "[0,1)"),
    ("x = 5", "5"),
    ("033", "33"),
]
NOT_EQUIVALENT = [
    ("0.51", "0.5"),
    ("\\frac{\\sqrt3}{2}", "\\sqrt{2}/2"),
    ("1,001", "1000"),
    ("(1, 2)", "[1, 2]"),
    ("-5", "5"),
    ("\\text{PWNED}", "5"),
    # wrapped in \boxed{} both sides parsed to their last number (2/3) and verified equal
    ("\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", "\\frac{4}{3} E_{1}+\\frac{2}{3} E_{2}"),
]


def test_equivalent_forms_score_one_and_others_zero():
    pairs = EQUIVALENT + NOT_EQUIVALENT
    out = math_verify(make_inputs([f"\\boxed{{{p}}}" for p, _ in pairs], [g for _, g in pairs]))
    expected = [1.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)
    mismatched = [pair for pair, s, e in zip(pairs, out.scores.tolist(), expected) if s != e]
    assert not mismatched


def test_percent_equivalence_switch():
    # (pred, gold): strict percent means /100; with the switch on the percent sign may be dropped.
    pairs = [("50\\%", "50"), ("50", "50\\%"), ("50\\%", "0.5"), ("50\\%", "50\\%"), ("50\\%", "51")]
    inputs = make_inputs([f"\\boxed{{{p}}}" for p, _ in pairs], [g for _, g in pairs])
    assert math_verify(inputs).scores.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert math_verify(inputs, percent_equivalence=True).scores.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    # A dataset row can switch it per sample.
    meta = [{"percent_equivalence": True}, {}, {}, {}, {}]
    inputs = make_inputs([f"\\boxed{{{p}}}" for p, _ in pairs], [g for _, g in pairs], metadata=meta)
    assert math_verify(inputs).scores.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_answer_is_style_without_boxed():
    responses = [
        "Adding them up, the answer is 42.",
        "Answer: 42",
        "#### 42",
        "The final answer is $42$. I hope it is correct.",
        "**Answer:** $\\frac{84}{2}$",
        "I believe it is 42",  # no anchor, no box: not an answer
        "The answer is 43.",
    ]
    out = math_verify(make_inputs(responses, ["42"] * len(responses)))
    assert out.scores.tolist() == [1.0] * 5 + [0.0, 0.0]
    assert out.extracted[5] is None
    assert out.stats["math_verify/answered_frac"] == pytest.approx(6 / 7)
    assert out.stats["math_verify/timeout_frac"] == 0.0


def test_output_types():
    out = math_verify(make_inputs(["\\boxed{1}", "\\boxed{2}"], ["1", "1"]))
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
    assert out.correct.dtype == torch.bool
    assert torch.equal(out.scores, out.correct.float())


def test_bad_arguments():
    inputs = make_inputs(["\\boxed{1}", "\\boxed{2}"], ["1", None])
    with pytest.raises(ValueError, match="answers\\[1\\] is None.*'ttrl'"):
        math_verify(inputs)
    ok = make_inputs(["\\boxed{1}"], ["1"])
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        math_verify(ok, timeout_s=0)
    with pytest.raises(ValueError, match="percent_equivalence must be a bool"):
        math_verify(ok, percent_equivalence="yes")
    with pytest.raises(ValueError, match="tail_chars must be a positive int"):
        math_verify(ok, tail_chars=0)
    bad_meta = make_inputs(["\\boxed{1}"], ["1"], metadata=[{"percent_equivalence": "no"}])
    with pytest.raises(ValueError, match="metadata\\[0\\]\\['percent_equivalence'\\]"):
        math_verify(bad_meta)
    with pytest.raises(ValueError, match="warn_unverified_share must be in"):
        math_verify(ok, warn_unverified_share=1.5)
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        math_verify(ok, budget_s=-1)


def test_budget_scores_the_rest_zero_and_says_so(caplog):
    """Two slow-to-parse answers hold the grading past a 0.5 s budget: they score 0, the share is logged as
    ``math_verify/budget_frac``, and one warning line names it."""
    slow = "\\boxed{9^{9^{9^{9}}}}"
    inputs = make_inputs([slow, slow.replace("9}}}}", "8}}}}"), "\\boxed{1}"], ["1", "1", "1"])
    t0 = time.perf_counter()
    with caplog.at_level("WARNING"):
        out = math_verify(inputs, timeout_s=2.0, budget_s=0.5, num_workers=1)
    assert time.perf_counter() - t0 < 4.0  # unbounded: 2 x 2 s of towers, then the rest
    assert out.scores.tolist() == [0.0, 0.0, 0.0] and out.stats["math_verify/budget_frac"] == 1.0
    assert [r.getMessage() for r in caplog.records if "went unverified" in r.getMessage()] == [
        "math_verify: 3 of 3 samples went unverified (0 timed out or crashed, 3 past the 0.5 s budget) and scored 0"]
