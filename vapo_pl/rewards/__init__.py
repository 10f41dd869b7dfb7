"""Reward functions (ALGORITHMS.md section 4), registered by the names configs use.

``math_verify`` (rule-based correctness), ``ttrl`` (majority-vote pseudo-labels), ``overlong``
(DAPO length shaping), ``format`` (final answer present) and ``reward_model`` (a learned scalar
reward); combine them with ``CompositeReward([RewardTerm(name, weight, kwargs), ...])``.
"""

from vapo_pl.rewards import correctness, reward_model, shaping, ttrl  # noqa: F401  (registers the functions)
from vapo_pl.rewards.base import (
    REWARD_FUNCTIONS,
    CompositeReward,
    RewardInput,
    RewardOutput,
    RewardResult,
    RewardTerm,
    complete_reward,
    resolve_reward_fn,
)
from vapo_pl.rewards.extraction import Extracted, extract_answer, normalize_answer

__all__ = [
    "REWARD_FUNCTIONS",
    "CompositeReward",
    "Extracted",
    "RewardInput",
    "RewardOutput",
    "RewardResult",
    "RewardTerm",
    "complete_reward",
    "extract_answer",
    "normalize_answer",
    "resolve_reward_fn",
]
