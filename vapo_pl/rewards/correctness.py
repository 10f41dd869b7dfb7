"""``math_verify``: rule-based correctness for math answers (ALGORITHMS.md section 4).

Pipeline per sample: ``extraction.extract_answer`` finds the final answer as text (last
``\\boxed{}``, else "answer is X" / "Answer: X" / "#### X"; string work on the last 4,000
characters only), then math-verify (``parse`` with ``LatexExtractionConfig(boxed_match_priority=0)``
and ``ExprExtractionConfig``, then ``verify``) tests it against the gold answer symbolically:
fractions, decimals, thousands separators, percent, sets, intervals, LaTeX.

Safety and time bound: nothing is ever ``eval``-ed by this code, and math-verify only sees the
extracted answer. It runs in worker processes (``verifier.py``) with an in-worker alarm at
``timeout_s`` and a hard kill at ``timeout_s + 0.5 s``, so the bound holds in any thread and
against C-level hangs; the string pre-processing (tail truncation, brace-depth cap of 20, answers
of at most 1,000 characters) keeps the usual case at about a millisecond. A sample that times out
or crashes its worker twice scores 0 and is counted in ``math_verify/timeout_frac`` (a worker that dies
during a job is replaced and the job retried once). ``budget_s`` bounds the grading of a whole batch: what
is not graded when it is spent scores 0, is counted in ``math_verify/budget_frac`` and said in one line.
When more than ``warn_unverified_share`` of a batch went unverified (timeout, crash, budget), one warning
line says so.

Percent: with ``percent_equivalence=False`` (default) a percent is a number divided by 100, so
``50\\%`` equals ``0.5`` and not ``50``; with ``True`` (the task says the percent sign may be
dropped) ``50\\%`` equals both ``50`` and ``0.5``. A dataset row can set it per sample with a
``percent_equivalence`` metadata field.
"""

from __future__ import annotations

import logging
import math

import torch

from vapo_pl.rewards.base import REWARD_FUNCTIONS, RewardInput, RewardOutput
from vapo_pl.rewards.extraction import MAX_ANSWER_CHARS, MAX_DEPTH, TAIL_CHARS, extract_answer
from vapo_pl.rewards.verifier import Failed, get_pool

log = logging.getLogger(__name__)


def check_timeout(timeout_s: float) -> float:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not (0 < timeout_s and math.isfinite(timeout_s))
    ):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def grade_answers(
    items: list[tuple[str, str, bool]], *, timeout_s: float, num_workers: int | None = None,
    budget_s: float | None = None,
) -> list[bool | Failed]:
    """``verify(gold, pred)`` for each ``(pred, gold, percent_equivalence)``, in worker processes.

    Identical items are graded once (samples of one prompt often agree).
    """
    unique = list(dict.fromkeys(items))
    results = get_pool(num_workers).run([("grade", list(item)) for item in unique], timeout_s, budget_s=budget_s)
    by_item = dict(zip(unique, results))
    return [by_item[item] for item in items]


def percent_flags(inputs: RewardInput, default: bool) -> list[bool]:
    """Per-sample ``percent_equivalence``: the row's metadata field if present, else ``default``."""
    flags = []
    for i, meta in enumerate(inputs.metadata):
        flag = meta.get("percent_equivalence", default)
        if not isinstance(flag, bool):
            raise ValueError(f"metadata[{i}]['percent_equivalence'] must be a bool, got {flag!r}")
        flags.append(flag)
    return flags


@REWARD_FUNCTIONS.register("math_verify")
def math_verify(
    inputs: RewardInput,
    *,
    timeout_s: float = 2.0,
    percent_equivalence: bool = False,
    num_workers: int | None = None,
    budget_s: float | None = 60.0,
    warn_unverified_share: float = 0.05,
    tail_chars: int = TAIL_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    max_depth: int = MAX_DEPTH,
) -> RewardOutput:
    """1.0 where the response's final answer is equivalent to the gold answer, else 0.0.

    Args:
        inputs: the batch; ``inputs.answers`` must all be set (use ``ttrl`` for unlabeled data).
        timeout_s: per-sample verification bound in seconds (hard kill 0.5 s later).
        percent_equivalence: whether ``50\\%`` may equal ``50`` (see the module docstring).
        num_workers: verifier processes (default: the cores of this process, shared among the node's ranks).
        budget_s: seconds for grading the whole batch; what is left when it is spent scores 0 (None: no bound).
        warn_unverified_share: warn in one line when more than this share of the batch went unverified.
        tail_chars, max_answer_chars, max_depth: extraction bounds (see ``extraction.py``).

    Returns:
        scores (B,) float in {0, 1}; correct (B,) bool; extracted answer texts; stats
        ``math_verify/answered_frac``, ``math_verify/timeout_frac`` and ``math_verify/budget_frac``.
    """
    timeout_s = check_timeout(timeout_s)
    if budget_s is not None:
        budget_s = check_timeout(budget_s)
    if isinstance(warn_unverified_share, bool) or not isinstance(warn_unverified_share, (int, float)) \
            or not 0 <= warn_unverified_share <= 1:
        raise ValueError(f"warn_unverified_share must be in [0, 1], got {warn_unverified_share!r}")
    for name, value in (
        ("tail_chars", tail_chars),
        ("max_answer_chars", max_answer_chars),
        ("max_depth", max_depth),
    ):
        check_positive_int(name, value)
    if not isinstance(percent_equivalence, bool):
        raise ValueError(f"percent_equivalence must be a bool, got {percent_equivalence!r}")
    missing = [i for i, a in enumerate(inputs.answers) if not isinstance(a, str) or not a.strip()]
    if missing:
        raise ValueError(
            f"answers[{missing[0]}] is {inputs.answers[missing[0]]!r}: math_verify needs a gold answer "
            f"for every sample ({len(missing)} missing); use 'ttrl' for unlabeled prompts"
        )
    b = len(inputs)
    texts = [
        e.text if e is not None else None
        for e in (
            extract_answer(r, tail_chars=tail_chars, max_answer_chars=max_answer_chars, max_depth=max_depth)
            for r in inputs.responses
        )
    ]
    flags = percent_flags(inputs, percent_equivalence)
    todo = [i for i in range(b) if texts[i] is not None]
    graded = grade_answers(
        [(texts[i], inputs.answers[i].strip(), flags[i]) for i in todo],
        timeout_s=timeout_s,
        num_workers=num_workers,
        budget_s=budget_s,
    )
    correct = torch.zeros(b, dtype=torch.bool)
    timeouts = over_budget = 0
    for i, result in zip(todo, graded):
        correct[i] = result is True
        timeouts += isinstance(result, Failed) and result.reason in ("timeout", "crashed")
        over_budget += isinstance(result, Failed) and result.reason == "budget"
    if b and (timeouts + over_budget) / b > warn_unverified_share:
        log.warning("math_verify: %d of %d samples went unverified (%d timed out or crashed, %d past the %s s "
                    "budget) and scored 0", timeouts + over_budget, b, timeouts, over_budget, budget_s)
    return RewardOutput(
        scores=correct.to(torch.float32),
        correct=correct,
        extracted=texts,
        stats={
            "math_verify/answered_frac": len(todo) / max(b, 1),
            "math_verify/timeout_frac": timeouts / max(b, 1),
            "math_verify/budget_frac": over_budget / max(b, 1),
        },
    )
