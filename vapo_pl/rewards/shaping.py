"""Shaping terms that look at the response's form, not its correctness: ``overlong`` and ``format``."""

from __future__ import annotations

import math

import torch

from vapo_pl.algorithms.shaping import overlong_penalty
from vapo_pl.rewards.base import REWARD_FUNCTIONS, RewardInput, RewardOutput
from vapo_pl.rewards.correctness import check_positive_int
from vapo_pl.rewards.extraction import MAX_ANSWER_CHARS, MAX_DEPTH, TAIL_CHARS, extract_answer

FORMS = ("boxed", "anchor")


@REWARD_FUNCTIONS.register("overlong")
def overlong(
    inputs: RewardInput, *, max_length: int | None = None, cache_length: int | None = None
) -> RewardOutput:
    """DAPO soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to ``max_length - cache_length``
    tokens, then linear down to -1 at ``max_length``, -1 beyond.

    Args:
        inputs: the batch; uses ``inputs.lengths`` (B,).
        max_length: L_max; default ``inputs.max_response_length`` (DAPO: 20480 = its max tokens).
        cache_length: L_cache; default ``max_length // 5``, DAPO's ratio (4096 of 20480).

    Returns:
        scores (B,) float in [-1, 0]; stat ``overlong/penalized_frac`` (share with a penalty).
    """
    max_length = (
        inputs.max_response_length if max_length is None else check_positive_int("max_length", max_length)
    )
    cache_length = (
        max(1, max_length // 5) if cache_length is None else check_positive_int("cache_length", cache_length)
    )
    scores = overlong_penalty(inputs.lengths, max_length, cache_length)
    return RewardOutput(scores=scores, stats={"overlong/penalized_frac": (scores < 0).float().mean().item()})


@REWARD_FUNCTIONS.register("format")
def format_reward(
    inputs: RewardInput,
    *,
    present: float = 0.1,
    missing: float = 0.0,
    forms: tuple[str, ...] | list[str] = ("boxed",),
    tail_chars: int = TAIL_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    max_depth: int = MAX_DEPTH,
) -> RewardOutput:
    """``present`` where the response ends with a final answer in an expected form, else ``missing``.

    Args:
        inputs: the batch; uses ``inputs.responses``.
        present: score when a well-formed final answer is found (default a small bonus, 0.1).
        missing: score otherwise (set negative for a penalty).
        forms: accepted forms, a subset of ("boxed", "anchor"); default a well-formed ``\\boxed{}``.
        tail_chars, max_answer_chars, max_depth: the extraction bounds of ``extraction.py``.

    Returns:
        scores (B,) float; stat ``format/present_frac``.
    """
    forms = tuple(forms)
    if not forms or any(f not in FORMS for f in forms):
        raise ValueError(f"forms must be a non-empty subset of {FORMS}, got {forms!r}")
    for name, value in (("present", present), ("missing", missing)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    found = torch.tensor(
        [
            extract_answer(
                r, tail_chars=tail_chars, max_answer_chars=max_answer_chars, max_depth=max_depth, forms=forms
            )
            is not None
            for r in inputs.responses
        ],
        dtype=torch.bool,
    )
    scores = torch.where(found, torch.tensor(float(present)), torch.tensor(float(missing)))
    return RewardOutput(
        scores=scores, stats={"format/present_frac": found.float().mean().item() if len(found) else 0.0}
    )
