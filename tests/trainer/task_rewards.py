"""Dense toy rewards for trainer tests: a random tiny model gets signal from its first step."""

from __future__ import annotations

import torch

from vapo_pl.rewards import RewardInput, RewardOutput


def ones_share(inputs: RewardInput) -> RewardOutput:
    """Share of the response's characters that are the digit "1" (0..1); correct when above 0.2."""
    share = torch.tensor([r.count("1") / max(len(r), 1) for r in inputs.responses], dtype=torch.float32)
    return RewardOutput(scores=share, correct=share > 0.2)


def coin(inputs: RewardInput) -> RewardOutput:
    """Pseudo-random 0/1 from the response text (so some groups are mixed and some are not)."""
    score = torch.tensor([float(sum(map(ord, r)) % 2) for r in inputs.responses])
    return RewardOutput(scores=score, correct=score > 0)



def half_informative(inputs: RewardInput) -> RewardOutput:
    """Groups with an even index get 1 for their first sample and 0 for the rest (informative under dynamic
    sampling); the other groups get 0 throughout. Carries a share stat."""
    g = inputs.group_index
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]  # samples of a group are contiguous in the DataModule's batches
    score = ((g % 2 == 0) & first).float()
    return RewardOutput(scores=score, correct=score > 0, stats={"half/share": 0.5})
