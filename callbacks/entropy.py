"""Token entropy of the rollouts, and a warning when it collapses.

The policy's per-token entropy (in nats, at the sampler's temperature) is the first thing that moves
when exploration dies: DAPO's Clip-Higher exists because entropy collapses under symmetric clipping.
Besides the mean, the tracker logs the share of near-deterministic tokens and the share of
"forking tokens". Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939), report for Qwen3-8B chains of thought that
over half of the tokens have entropy below 0.01 and that the top 20 % of tokens, the forks that steer the
reasoning, lie above 0.672 nats. Those two numbers are the default thresholds.

Logged (all ranks' tokens together): ``actor/entropy_mean``, ``actor/entropy_low_share``,
``actor/entropy_high_share``; NaN on a step whose output carries no entropy (once something was logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from vapo_pl.common import publish_metrics
from vapo_pl.common import sum_across_ranks as _sum_across_ranks

log = logging.getLogger(__name__)

# Wang et al. 2025 (arXiv 2506.01939): the median token is below 0.01 nats, the 80th percentile is 0.672.
LOW_ENTROPY_NATS = 0.01
FORKING_ENTROPY_NATS = 0.672
METRIC_NAMES = ("actor/entropy_mean", "actor/entropy_low_share", "actor/entropy_high_share")


def entropy_sums(entropy: Tensor, mask: Tensor, low_threshold: float, high_threshold: float) -> Tensor:
    """Sums over the masked tokens, so that several ranks' batches combine exactly.

    Args:
        entropy: (B, T) per-token entropy in nats; padding may hold anything.
        mask: (B, T) bool, True on response tokens.
        low_threshold: a token is "low" when its entropy is strictly below this.
        high_threshold: a token is "high" (forking) when its entropy is strictly above this.

    Returns:
        (4,) float64: [sum of entropy, number of tokens, number of low tokens, number of high tokens].
    """
    mask = mask.bool()
    ent = entropy.detach().to(torch.float64)[mask]  # (N,) the real tokens only
    return torch.stack([
        ent.sum(),
        torch.tensor(float(ent.numel()), dtype=torch.float64, device=ent.device),
        (ent < low_threshold).sum().to(torch.float64),
        (ent > high_threshold).sum().to(torch.float64),
    ])


class EntropyTracker(pl.Callback):
    """Logs rollout token-entropy statistics and warns when the mean stays collapsed.

    Reads ``outputs["entropy"]`` ((B, T), or None when the step computed none) and
    ``outputs["rollout"].response_mask`` from ``VAPOModule.training_step`` (a ``vapo_pl.batch.StepOutput``).

    Args:
        low_threshold: entropy (nats) below which a token counts as near-deterministic.
        high_threshold: entropy (nats) above which a token counts as a forking token.
        collapse_threshold: a mean entropy below this counts as collapsed.
        patience: consecutive collapsed steps before warning. The warning fires once per collapse
            episode; the episode ends when the mean climbs back to ``collapse_threshold`` or above.
    """

    def __init__(
        self,
        low_threshold: float = LOW_ENTROPY_NATS,
        high_threshold: float = FORKING_ENTROPY_NATS,
        collapse_threshold: float = 0.05,
        patience: int = 10,
    ) -> None:
        super().__init__()
        if not low_threshold >= 0:
            raise ValueError(f"EntropyTracker.low_threshold must be >= 0, got {low_threshold}")
        if not high_threshold > low_threshold:
            raise ValueError(
                f"EntropyTracker.high_threshold must be > low_threshold={low_threshold}, got {high_threshold}"
            )
        if not collapse_threshold > 0:
            raise ValueError(f"EntropyTracker.collapse_threshold must be > 0, got {collapse_threshold}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EntropyTracker.patience must be an integer >= 1, got {patience!r}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.collapse_threshold = collapse_threshold
        self.patience = patience
        self.steps_below = 0  # consecutive steps with the mean below collapse_threshold
        self.warned = False  # already warned in the current collapse episode

    def compute(self, entropy: Tensor, mask: Tensor) -> dict[str, float] | None:
        """The logged metrics over every rank's tokens; None when no rank has a response token."""
        total, count, low, high = _sum_across_ranks(
            entropy_sums(entropy, mask, self.low_threshold, self.high_threshold)).tolist()
        if count == 0:
            return None
        return dict(zip(METRIC_NAMES, (total / count, low / count, high / count)))

    def update_collapse(self, mean: float, step: int) -> None:
        if mean >= self.collapse_threshold:
            self.steps_below = 0
            self.warned = False
            return
        self.steps_below += 1
        if self.steps_below >= self.patience and not self.warned:
            self.warned = True
            if rank_zero_only.rank == 0:
                log.warning(
                    f"EntropyTracker: token entropy collapsed: mean {mean:.4g} nats has been below "
                    f"collapse_threshold={self.collapse_threshold} for {self.steps_below} steps (step {step}); "
                    "exploration is dying (consider Clip-Higher, a larger eps_high, or a lower learning rate)"
                )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        metrics = None
        if isinstance(outputs, Mapping) and outputs.get("entropy") is not None and outputs.get("rollout") is not None:
            metrics = self.compute(outputs["entropy"], outputs["rollout"].response_mask)
        if metrics is None:
            return
        publish_metrics(trainer, metrics, trainer.global_step)
        self.update_collapse(metrics["actor/entropy_mean"], trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_below": self.steps_below, "warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_below = int(state_dict["steps_below"])
        self.warned = bool(state_dict["warned"])
