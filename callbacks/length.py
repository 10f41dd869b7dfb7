"""Response length: distribution, truncation, correct vs wrong, and its trend.

Response length is how long-chain-of-thought RL shows progress (VAPO and DAPO plot it next to accuracy),
and a rising clip ratio (share truncated at ``max_response_length``) says the cap is starting to bite.
The trend is the least-squares slope of the per-step mean length over the last ``window`` steps, in
tokens per step.

Logged (all ranks' samples together): ``rollout/length_mean``, ``rollout/length_median``,
``rollout/length_p90``, ``rollout/length_max``, ``rollout/length_clip_ratio``,
``rollout/length_correct_mean`` and ``rollout/length_wrong_mean`` (NaN when the batch has no such sample),
``rollout/length_slope`` (from two steps on), and the histogram ``rollout/response_length`` on every
TensorBoard logger.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from vapo_pl.common import collective_device, publish_metrics

HISTOGRAM_TAG = "rollout/response_length"


def length_stats(lengths: Tensor, truncated: Tensor, correct: Tensor) -> dict[str, float]:
    """Summary of one batch's response lengths.

    Args:
        lengths: (B,) response lengths in tokens, B >= 1.
        truncated: (B,) bool, the sample hit the length cap.
        correct: (B,) bool, the verifier accepted the sample.

    Median and p90 interpolate linearly between order statistics (``torch.quantile``). The correct / wrong
    means are NaN when the batch has no correct / wrong sample.
    """
    x = lengths.to(torch.float64)
    correct = correct.bool()
    out = {
        "rollout/length_mean": float(x.mean()),
        "rollout/length_median": float(x.quantile(0.5)),
        "rollout/length_p90": float(x.quantile(0.9)),
        "rollout/length_max": float(x.max()),
        "rollout/length_clip_ratio": float(truncated.to(torch.float64).mean()),
    }
    # NaN when the batch has no such sample: Lightning would otherwise re-send the last step's value
    out["rollout/length_correct_mean"] = float(x[correct].mean()) if correct.any() else math.nan
    out["rollout/length_wrong_mean"] = float(x[~correct].mean()) if (~correct).any() else math.nan
    return out


def least_squares_slope(x: Tensor, y: Tensor) -> float:
    """Slope of the least-squares line through the points (x, y); x and y are (N,), N >= 2, x not all equal.

    slope = sum((x - mean x)(y - mean y)) / sum((x - mean x)^2).
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _gather_columns(x: Tensor) -> Tensor:
    """(C, B_r) per rank -> (C, sum of B_r) over ranks, in rank order; identity on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    world = dist.get_world_size()
    home, x = x.device, x.to(collective_device())  # NCCL takes CUDA tensors only, gloo CPU ones
    size = torch.tensor([x.shape[1]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    padded = torch.nn.functional.pad(x, (0, width - x.shape[1]))  # all_gather needs equal shapes
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, : int(s.item())] for p, s in zip(parts, sizes)], dim=1).to(home)


def logger_step(trainer: pl.Trainer) -> int:
    """The x axis of every per-step metric: the RL step just completed (``trainer.global_step``, which
    ``VAPOModule`` pins to RL steps). The module's own metrics are written at the same step."""
    return trainer.global_step


class LengthScaling(pl.Callback):
    """Logs response-length statistics of every rollout batch and the slope of the mean over time.

    Reads ``outputs["rollout"]`` (``lengths``, ``truncated``, ``correct``) from ``VAPOModule.training_step``.

    Args:
        window: number of most recent steps the length slope is fitted over (>= 2).
    """

    def __init__(self, window: int = 50) -> None:
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"LengthScaling.window must be an integer >= 2, got {window!r}")
        self.window = window
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)  # (step, mean length)

    def slope(self) -> float | None:
        """Tokens per step over the stored window; None with fewer than two distinct steps."""
        if len({s for s, _ in self.recent}) < 2:
            return None
        steps, means = zip(*self.recent)
        return least_squares_slope(torch.tensor(steps), torch.tensor(means))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        rollout = outputs.get("rollout") if isinstance(outputs, Mapping) else None
        if rollout is None:
            return
        cols = torch.stack([rollout.lengths.long(), rollout.truncated.long(), rollout.correct.long()])
        lengths, truncated, correct = _gather_columns(cols)  # every rank joins, even with an empty shard
        if lengths.numel() == 0:
            return
        step = logger_step(trainer)
        metrics = length_stats(lengths, truncated.bool(), correct.bool())
        self.recent.append((step, metrics["rollout/length_mean"]))
        slope = self.slope()
        if slope is not None:
            metrics["rollout/length_slope"] = slope
        publish_metrics(trainer, metrics, step)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram(HISTOGRAM_TAG, lengths.cpu(), global_step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [list(p) for p in self.recent]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent = deque(((int(s), float(m)) for s, m in state_dict["recent"]), maxlen=self.window)
