"""Shared builders for the callback tests: hand-built rollout batches, a tiny module that replays them
through a real ``lightning.Trainer``, and a reader for the TensorBoard event files it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from vapo_pl.batch import RolloutBatch


def make_rollout(
    lengths: list[int],
    *,
    correct: list[bool] | None = None,
    truncated: list[bool] | None = None,
    scores: list[float] | None = None,
    metadata: list[dict[str, Any]] | None = None,
    prompt_width: int = 2,
) -> RolloutBatch:
    """A RolloutBatch built by hand (no engine): response widths follow ``lengths``, tokens are arbitrary."""
    b = len(lengths)
    width = max(max(lengths), 1)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    response_mask = torch.arange(width)[None, :] < lengths_t[:, None]  # (B, T)
    correct_t = torch.tensor(correct if correct is not None else [False] * b, dtype=torch.bool)
    return RolloutBatch(
        input_ids=torch.full((b, prompt_width + width), 5, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(b, prompt_width, dtype=torch.long), response_mask.long()], dim=1),
        response_mask=response_mask,
        rollout_logprobs=torch.zeros(b, width),
        scores=torch.tensor(scores, dtype=torch.float32) if scores is not None else correct_t.float(),
        correct=correct_t,
        lengths=lengths_t,
        truncated=torch.tensor(truncated if truncated is not None else [False] * b, dtype=torch.bool),
        group_index=torch.arange(b),
        weight_version=0,
        metadata=metadata or [],
    )


class ReplayModule(pl.LightningModule):
    """Returns one prepared ``{"rollout", "entropy", "metrics"}`` dict per training step, the shape of
    ``VAPOModule.training_step``'s output, and takes one (manual) optimizer step so ``global_step`` counts
    steps as in the real module."""

    def __init__(self, outputs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.outputs = outputs
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward((self.weight ** 2).sum())
        opt.step()
        return self.outputs[batch_idx]

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)

    def train_dataloader(self):
        return DataLoader(list(range(len(self.outputs))), batch_size=None)


def run_trainer(tmp_path: Path, callbacks: list[pl.Callback], outputs: list[dict[str, Any]],
                module: pl.LightningModule | None = None, **kwargs) -> tuple[pl.Trainer, TensorBoardLogger]:
    """Fit ``ReplayModule(outputs)`` for ``len(outputs)`` steps with a real TensorBoardLogger in ``tmp_path``."""
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=len(outputs), max_epochs=1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(module or ReplayModule(outputs))
    return trainer, logger


def read_events(logger: TensorBoardLogger):
    """An EventAccumulator over everything ``logger`` wrote (no down-sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag."""
    return {e.step: e.value for e in acc.Scalars(tag)}
