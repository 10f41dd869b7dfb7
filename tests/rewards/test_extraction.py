"""Final-answer extraction: order of forms, bounds, and linear time on hostile text."""

from __future__ import annotations

import time

import pytest

from vapo_pl.rewards.extraction import (
    MAX_ANSWER_CHARS,
    MAX_DEPTH,
    TAIL_CHARS,
    Extracted,
    extract_answer,
    last_boxed,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are set delimiters, not grouping
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{ 3 }", "3"),
    ],
)
def test_boxed(response, expected):
    assert extract_answer(response) == Extracted(expected, "boxed")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 42.", "42"),
        ("So the answer is 42 apples.", "42"),
        ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Therefore\n#### 1,000", "1,000"),
        ("**Answer:** 7", "7"),
        ("the final answer is: 3.5!", "3.5"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("Answer: x = 12", "12"),
        ("the answer is \\(\\sqrt{2}\\)", "\\sqrt{2}"),
        ("answer: 1. Wait, no. answer: 2", "2"),
        ("The answer = -3", "-3"),
    ],
)
def test_anchored_forms(response, expected):
    assert extract_answer(response) == Extracted(expected, "anchor")


def test_boxed_wins_over_anchor_and_forms_filter():
    assert extract_answer("The answer is 3. Check: \\boxed{4}") == Extracted("4", "boxed")
    assert extract_answer("The answer is 3. Check: \\boxed{4}", forms=("anchor",)) == Extracted("3", "anchor")
    assert extract_answer("The answer is 3.", forms=("boxed",)) is None
    assert extract_answer("I think it is 42") is None  # no anchorless guessing


def test_malformed_last_box_means_no_answer():
    assert extract_answer("\\boxed{1} then \\boxed{2") is None  # the earlier box is not used
    assert extract_answer("The answer is 3. \\boxed{") is None
    assert extract_answer("\\boxed{}") is None


def test_depth_and_length_bounds_at_the_boundary():
    # The box's own brace is depth 1, so k inner levels reach depth 1 + k.
    ok = "\\boxed{" + "{" * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1) + "}"
    too_deep = "\\boxed{" + "{" * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "}"
    assert last_boxed(ok) is not None and last_boxed(too_deep) is None
    assert last_boxed("\\boxed{" + "7" * MAX_ANSWER_CHARS + "}") == "7" * MAX_ANSWER_CHARS
    assert last_boxed("\\boxed{" + "7" * (MAX_ANSWER_CHARS + 1) + "}") is None
    long_anchor = "The answer is " + "9" * (MAX_ANSWER_CHARS + 1)
    assert extract_answer(long_anchor) is None


def test_only_the_tail_is_read():
    assert extract_answer("\\boxed{1}" + "x" * (TAIL_CHARS - len("\\boxed{1}"))) == Extracted("1", "boxed")
    assert extract_answer("\\boxed{1}" + "x" * TAIL_CHARS) is None
    assert extract_answer("\\boxed{1}" + "x" * 50, tail_chars=40) is None


@pytest.mark.parametrize(
    "hostile",
    [
        "x " * 500_000,
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "answer: " * 200_000,
        "\\boxed{" * 100_000,
        "$" * 1_000_000,
        "#### " + "\\(" * 200_000,
        "\x00" * 1_000_000,
    ],
)
def test_linear_time_on_hostile_text(hostile):
    t0 = time.perf_counter()
    extract_answer(hostile)
    assert time.perf_counter() - t0 < 0.5


def test_normalize_answer():
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer(" \\frac{1}{2} ") == "\\frac{1}{2}"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("$5$.") == "5"
    assert normalize_answer("3\\,000") == "3000"
    assert normalize_answer("0.5") != normalize_answer("\\frac12")  # equivalence is the verifier's job


def test_non_string_response_is_rejected():
    with pytest.raises(ValueError, match="response must be a str"):
        extract_answer(None)
