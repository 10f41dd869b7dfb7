"""A user-defined reward function, named in tests by its import path."""

from __future__ import annotations

from vapo_pl.rewards import RewardInput, RewardOutput


def length_bonus(inputs: RewardInput, scale: float = 1.0) -> RewardOutput:
    """``scale * length / max_response_length`` per sample."""
    return RewardOutput(scores=scale * inputs.lengths.float() / inputs.max_response_length)


not_a_function = 3


def nan_reward(inputs: RewardInput) -> RewardOutput:
    """A broken reward function: NaN scores."""
    return RewardOutput(scores=inputs.lengths.float() * float("nan"))
