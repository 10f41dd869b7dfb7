"""Environments for multi-turn episodes: what a user subclasses for a new task.

An episode starts from a prompt record (``Environment.reset`` gives the first observation: the text the policy
sees before its first turn). Then, turn by turn, the policy writes (its sampled token ids and their text) and the
environment answers with ``Environment.step``: the next observation (text appended to the context, never trained
on), a reward for the turn (0 when the task only rewards the outcome) and whether the episode ended. The rollout
keeps the token ids exactly as sampled and appends the observation's tokens, so what is trained on is what was
generated, never a re-tokenisation of the text.

``EpisodeLimits`` bound an episode: turns, total tokens and tokens per observation. An episode stopped by a limit is
``truncated``, handled like an overlong single-turn response (``algorithm.mask_truncated`` and the overlong reward
apply to it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from vapo_pl.prompts import PromptRecord


@dataclass(frozen=True)
class EpisodeLimits:
    """``max_turns`` policy turns; ``max_total_tokens`` prompt + turns + observations; ``max_observation_tokens`` per
    observation (a longer one is cut to that many tokens); ``max_turn_tokens`` per policy turn (None: only the
    episode's budget). A turn cut by ``max_turn_tokens`` still goes to the environment (which may answer that it
    was too long); a turn or observation that would pass the episode's budget ends the episode as truncated."""

    max_turns: int = 4
    max_total_tokens: int = 1024
    max_observation_tokens: int = 256
    max_turn_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens", "max_observation_tokens", "max_turn_tokens"):
            value = getattr(self, name)
            if name == "max_turn_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.episode.{name} must be an integer >= 1, got {value!r}")


@dataclass
class StepResult:
    """The environment's answer to one policy turn. ``observation``: text to append before the policy's next turn
    (``None`` when the episode ended); ``reward``: this turn's reward (placed on the turn's last token); ``done``: the
    episode ended (the task's outcome reward is then computed on the whole episode); ``info``: counters for metrics
    (e.g. ``tool_calls``, ``tool_errors``, ``tool_seconds``)."""

    observation: str | None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One episode's state. The rollout builds one per episode (``data.environment``: the class and its
    ``kwargs``), sets ``tokenizer`` to the policy's tokenizer, calls ``reset`` once, then ``step`` after each policy
    turn until ``done`` or a limit, and ``close`` at the end. Steps of different episodes run in parallel threads:
    keep per-episode state on the instance."""

    tokenizer: Any = None  # the policy's tokenizer, set before ``reset``
    # the ``StepResult.info`` counters logged per episode (``episode/<name>``; ``tool_seconds`` as ``tool_latency_ms``
    # per call): a fixed list, so that every rank logs the same metrics whatever its episodes did
    metrics: tuple[str, ...] = ()

    @abstractmethod
    def reset(self, record: PromptRecord, prompt: str) -> str:
        """The first context: ``prompt`` is the record rendered by the DataModule's template (return it, or
        something built from the record)."""

    @abstractmethod
    def step(self, turn_ids: list[int], turn_text: str) -> StepResult:
        """React to the policy's turn (its sampled token ids, and their decoded text)."""

    def close(self) -> None:
        """Release what the episode holds (processes, files). Called once, also after an error."""
