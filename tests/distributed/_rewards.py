"""Toy rewards for the multi-process tests (imported by path from the worker processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vapo_pl.rewards import RewardInput, RewardOutput


def coin(inputs: RewardInput) -> RewardOutput:
    """Pseudo-random 0/1 from the response text: mixed groups, so advantages are not all zero."""
    score = torch.tensor([float(sum(map(ord, r)) % 2) for r in inputs.responses])
    return RewardOutput(scores=score, correct=score > 0)


def flat_on_rank0(inputs: RewardInput) -> RewardOutput:
    """Rank 0: every score 0 (no group is informative, dynamic sampling wants more rounds).
    Other ranks: sample ``i`` of the flat batch scores ``i % 2``; with 2 samples per prompt every group
    holds one 0 and one 1, so one round is always enough there."""
    b = len(inputs.responses)
    rank = dist.get_rank() if dist.is_initialized() else 0
    score = torch.zeros(b) if rank == 0 else (torch.arange(b) % 2).float()
    return RewardOutput(scores=score, correct=score > 0)
