"""The rollout engine interface: generate, take new weights, sleep and wake."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters for one generate call (mirrors vLLM's ``SamplingParams``)."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 disables
    max_tokens: int = 256  # response length cap; hitting it marks the sample truncated
    seed: int | None = None  # per-call seed; engines add a per-rank offset

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("greedy sampling (temperature 0) with n > 1 gives n identical samples")


@dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]  # response tokens, EOS included when generation stopped on it
    logprobs: list[float]  # per token, log-prob under the sampler's (temperature-scaled) distribution
    finish_reason: str  # "stop" (EOS/stop token) or "length" (hit max_tokens)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutEngine(ABC):
    """Generates responses for the trainer and receives the trainer's weights after each update.

    ``version`` counts weight updates received; a batch generated at version ``k`` came from the
    policy after its ``k``-th update.
    """

    version: int = 0
    weight_dtype = None  # torch dtype the engine holds its weights in (gathered weights are cast to it); None = as given
    # True after a sleep that discarded the weights (vLLM sleep level 2): the owner must send weights before the
    # next generate call (the DataModule does)
    weights_lost: bool = False

    @abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        """Return, for every prompt, ``sampling.n`` completions."""

    @abstractmethod
    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load the trainer's current weights (Hugging Face names) and bump ``version``.

        The tensors may be views of the trainer's own parameters and in another dtype than ``weight_dtype``: copy
        them into the engine's parameters (the copy casts) and keep no reference after returning."""

    def sleep(self) -> None:
        """Release accelerator memory (weights and KV cache) until ``wake_up``; a no-op on CPU."""

    def wake_up(self) -> None:
        """Undo ``sleep``."""
