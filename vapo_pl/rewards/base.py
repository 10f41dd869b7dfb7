"""Reward functions: one signature, a registry, and a weighted composite.

A reward function takes one rollout batch and returns one score per sample::

    fn(inputs: RewardInput, **kwargs) -> RewardOutput

Built-in functions register themselves by name in ``REWARD_FUNCTIONS`` (the names configs use);
a user's own function is named by its import path (``"my_pkg.rewards:length_bonus"``).
``CompositeReward`` sums weighted terms, e.g. correctness + DAPO overlong penalty + format
(ALGORITHMS.md section 4), and keeps each weighted term for logging as ``reward/<name>``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vapo_pl.registry import Registry

REWARD_FUNCTIONS: Registry[Callable[..., RewardOutput]] = Registry("reward function")


@dataclass
class RewardInput:
    """One rollout batch of ``B`` samples, as the reward functions see it.

    Samples of the same prompt share a ``group_index`` (GRPO/TTRL groups); they need not be
    contiguous. ``prompts`` are the raw questions from the data file; ``rendered_prompts`` the text the
    policy was given (chat template or format string applied, special tokens kept), so
    ``rendered_prompts[i] + responses[i]`` is the conversation as the policy produced it. Responses are
    decoded with special tokens removed.
    """

    prompts: list[str]  # B raw questions (the data file's prompt field)
    responses: list[str]  # B response texts
    answers: list[str | None]  # B gold answers; None where the row is unlabeled
    group_index: Tensor  # (B,) long, samples of the same prompt share an index
    lengths: Tensor  # (B,) long, response length in tokens
    truncated: Tensor  # (B,) bool, stopped at max_response_length rather than EOS
    max_response_length: int  # the sampler's max_tokens
    metadata: list[dict[str, Any]] = field(default_factory=list)  # B dicts of extra dataset fields
    rendered_prompts: list[str] | None = None  # B prompts as the policy saw them; default: ``prompts``

    def __post_init__(self) -> None:
        b = len(self.responses)
        if not self.metadata:
            self.metadata = [{} for _ in range(b)]
        if self.rendered_prompts is None:
            self.rendered_prompts = list(self.prompts)
        for name in ("prompts", "rendered_prompts", "answers", "metadata"):
            if len(getattr(self, name)) != b:
                raise ValueError(
                    f"RewardInput.{name} has {len(getattr(self, name))} entries, responses has {b}"
                )
        for name, dtypes in (
            ("group_index", (torch.int32, torch.int64)),
            ("lengths", (torch.int32, torch.int64)),
            ("truncated", (torch.bool,)),
        ):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.shape != (b,) or t.dtype not in dtypes:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"RewardInput.{name} must be a ({b},) {dtypes[-1]} tensor, got {got}")
        if not isinstance(self.max_response_length, int) or self.max_response_length <= 0:
            raise ValueError(
                f"RewardInput.max_response_length must be a positive int, got {self.max_response_length!r}"
            )

    def __len__(self) -> int:
        return len(self.responses)


@dataclass
class RewardOutput:
    """What a reward function, the composite and the module's ``compute_reward`` hook all return for a batch
    of ``B`` samples (one type end to end)."""

    scores: Tensor  # (B,) float
    correct: Tensor | None = None  # (B,) bool, only from functions that judge correctness; default scores > 0
    extracted: list[str | None] | None = None  # B final answers as extracted, None where absent
    stats: dict[str, float] = field(default_factory=dict)  # batch-level metrics, e.g. "ttrl/label_accuracy"
    terms: dict[str, Tensor] = field(default_factory=dict)  # term name -> (B,) weighted score; logged as reward/<name>


RewardResult = RewardOutput  # the former name of the composite's output; the same type


def complete_reward(out: Any, b: int, source: str) -> RewardOutput:
    """Check ``out`` (from ``source``) is a ``RewardOutput`` for ``b`` samples and fill what a rollout batch needs:
    ``correct`` (default ``scores > 0``) and ``terms`` (default one term named after ``source``). One-line errors."""
    if not isinstance(out, RewardOutput):
        raise ValueError(f"{source} returned {type(out).__name__}, expected RewardOutput")  # noqa: TRY004  (input errors are ValueErrors here)
    scores = out.scores
    if not isinstance(scores, Tensor) or scores.shape != (b,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{source} returned scores of shape {got}, expected ({b},)")
    scores = scores.detach().to(torch.float32).cpu()
    correct = scores > 0 if out.correct is None else out.correct.detach().to(torch.bool).cpu()
    if correct.shape != (b,):
        raise ValueError(f"{source} returned correct of shape {tuple(correct.shape)}, expected ({b},)")
    terms = {k: v.detach().to(torch.float32).cpu() for k, v in out.terms.items()} or {source: scores}
    for name, t in terms.items():
        if t.shape != (b,):
            raise ValueError(f"{source} returned term {name!r} of shape {tuple(t.shape)}, expected ({b},)")
    if out.extracted is not None and len(out.extracted) != b:
        raise ValueError(f"{source} returned {len(out.extracted)} extracted answers, expected {b}")
    return RewardOutput(scores=scores, correct=correct, extracted=out.extracted, stats=dict(out.stats), terms=terms)


def resolve_reward_fn(name_or_path: str) -> Callable[..., RewardOutput]:
    """A registered reward function by name, or a user callable by import path.

    ``"math_verify"`` looks up the registry; ``"pkg.module:fn"`` or ``"pkg.module.fn"`` imports
    ``fn`` from ``pkg.module``. Anything else raises ``ValueError`` listing the registered names.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"reward function name must be a non-empty string, got {name_or_path!r}")
    if name_or_path in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS.get(name_or_path)
    if ":" in name_or_path or "." in name_or_path:
        module_name, _, attr = (
            name_or_path.partition(":") if ":" in name_or_path else name_or_path.rpartition(".")
        )
        valid = ", ".join(REWARD_FUNCTIONS.names())
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"reward function {name_or_path!r} is neither registered nor importable "
                f"({type(e).__name__}: {e}); registered names: {valid}"
            ) from None
        if not callable(fn):
            raise ValueError(f"reward function {name_or_path!r} is not callable")
        return fn
    return REWARD_FUNCTIONS.get(name_or_path)  # raises with the valid names


@dataclass
class RewardTerm:
    """One term of a composite reward: a reward function, its weight, its keyword arguments."""

    name: str  # registered name or import path ("pkg.module:fn")
    weight: float = 1.0  # multiplies the term's scores; finite
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the function on every call

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardTerm.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"RewardTerm.weight must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"RewardTerm.weight must be finite, got {self.weight!r} (term {self.name!r})")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"RewardTerm.kwargs must be a dict, got {type(self.kwargs).__name__}")


class CompositeReward:
    """``score = sum_k weight_k * fn_k(inputs, **kwargs_k).scores``, each term kept for logging.

    Functions and their keyword arguments are checked when the composite is built, so a typo in
    a config fails at start-up rather than at the first rollout.
    """

    def __init__(self, terms: list[RewardTerm]) -> None:
        if not terms:
            raise ValueError("CompositeReward needs at least one RewardTerm")
        terms = [t if isinstance(t, RewardTerm) else RewardTerm(**t) for t in terms]
        names = [t.name for t in terms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"reward term names must be unique (they key the logged terms), repeated: {dupes}"
            )
        self.terms = terms
        self.fns = [resolve_reward_fn(t.name) for t in terms]
        for term, fn in zip(terms, self.fns):
            try:
                inspect.signature(fn).bind(None, **term.kwargs)
            except TypeError as e:
                raise ValueError(
                    f"reward term {term.name!r}: bad kwargs {sorted(term.kwargs)}: {e}"
                ) from None
            except ValueError:  # builtins without a signature: checked at call time
                pass

    def __call__(self, inputs: RewardInput) -> RewardOutput:
        b = len(inputs)
        total = torch.zeros(b, dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        correct: Tensor | None = None
        extracted: list[str | None] | None = None
        stats: dict[str, float] = {}
        for term, fn in zip(self.terms, self.fns):
            out = fn(inputs, **term.kwargs)
            if not isinstance(out, RewardOutput):
                raise ValueError(
                    f"reward term {term.name!r} returned {type(out).__name__}, expected RewardOutput"
                )
            scores = out.scores
            if not isinstance(scores, Tensor) or scores.shape != (b,):
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(f"reward term {term.name!r} returned scores of shape {got}, expected ({b},)")
            if not bool(torch.isfinite(scores).all()):
                raise ValueError(f"reward term {term.name!r} returned non-finite scores")
            weighted = term.weight * scores.detach().to(torch.float32).cpu()
            terms[term.name] = weighted
            total = total + weighted
            if correct is None and out.correct is not None:
                correct = out.correct.to(torch.bool).cpu()
            if extracted is None and out.extracted is not None:
                extracted = out.extracted
            stats.update(out.stats)
        if correct is None:
            correct = total > 0
        return RewardOutput(scores=total, correct=correct, terms=terms, extracted=extracted, stats=stats)

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.weight:g}*{t.name}" for t in self.terms)
        return f"CompositeReward({inner})"
