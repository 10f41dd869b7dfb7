"""Shared builders for the reward tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vapo_pl.rewards import RewardInput

DATA = Path(__file__).resolve().parents[2] / "vapo_pl" / "data"


def make_inputs(
    responses: list[str],
    answers: list[str | None] | None = None,
    *,
    groups: list[int] | None = None,
    lengths: list[int] | None = None,
    max_response_length: int = 100,
    metadata: list[dict] | None = None,
) -> RewardInput:
    b = len(responses)
    return RewardInput(
        prompts=[f"Q{i}:" for i in range(b)],
        responses=list(responses),
        answers=list(answers) if answers is not None else [None] * b,
        group_index=torch.tensor(groups if groups is not None else list(range(b)), dtype=torch.long),
        lengths=torch.tensor(lengths if lengths is not None else [10] * b, dtype=torch.long),
        truncated=torch.tensor([n >= max_response_length for n in (lengths or [10] * b)], dtype=torch.bool),
        max_response_length=max_response_length,
        metadata=metadata or [],
    )


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
