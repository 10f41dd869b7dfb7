"""VAPO technique 1, Value-Pretraining: train the critic alone before any policy update."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class ValuePretraining(pl.Callback):
    """Before the first RL step, sample from the frozen initial policy and train only the critic on
    Monte-Carlo returns (lambda = 1), then keep that critic (arXiv 2504.05118, section 3.1; 50 steps there).

    Args:
        steps: pretraining steps (rollout batches) when no thresholds are given.
        value_loss_threshold: stop once the value loss is at most this ...
        explained_variance_threshold: ... and the explained variance at least this (both, if both given).
        max_steps: cap when stopping on thresholds (default ``steps``).
        window: the thresholds compare the mean of the last ``window`` steps' metrics (each step measures the
            critic on a fresh batch before updating on it, so one step's explained variance is noisy).
        lr: critic learning rate during pretraining (default: the module's ``optim.critic_lr``).
        save_path: write the pretrained critic's weights here (rank 0).
        load_path: start from a critic saved earlier and skip pretraining.
        replay_batches: each update draws its rows from the last this many rollout batches (the policy is frozen,
            so all are on-policy) instead of the newest batch alone, so its minibatches mix many prompts. With 16
            prompts per batch, minibatches from one batch at a time taught the critic less than half as much per
            sample (``benchmarks/critic_fit.py --stream-prompts``). 1 = the newest batch only. The buffer is not
            checkpointed: a resumed pretraining refills it.

    TensorBoard: ``pretrain/*`` is written at steps ``1 - limit, ..., 0`` (``limit`` = the planned steps), so
    pretraining ends at step 0 and RL steps start at 1 on the same axis; a resumed run that purges the RL steps it
    redoes never touches them.
    """

    def __init__(
        self,
        steps: int = 50,
        value_loss_threshold: float | None = None,
        explained_variance_threshold: float | None = None,
        max_steps: int | None = None,
        window: int = 1,
        lr: float | None = None,
        save_path: str | None = None,
        load_path: str | None = None,
        replay_batches: int = 1,
    ) -> None:
        if steps < 0:
            raise ValueError(f"ValuePretraining.steps must be >= 0, got {steps}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"ValuePretraining.max_steps must be >= 1, got {max_steps}")
        if window < 1:
            raise ValueError(f"ValuePretraining.window must be >= 1, got {window}")
        if replay_batches < 1:
            raise ValueError(f"ValuePretraining.replay_batches must be >= 1, got {replay_batches}")
        if lr is not None and not lr > 0:
            raise ValueError(f"ValuePretraining.lr must be > 0, got {lr}")
        if value_loss_threshold is not None and value_loss_threshold < 0:
            raise ValueError(f"ValuePretraining.value_loss_threshold must be >= 0, got {value_loss_threshold}")
        self.steps = steps
        self.value_loss_threshold = value_loss_threshold
        self.explained_variance_threshold = explained_variance_threshold
        self.max_steps = max_steps if max_steps is not None else steps
        self.window = window
        self.lr = lr
        self.save_path = save_path
        self.load_path = load_path
        self.replay_batches = replay_batches
        self.done = False
        self.steps_done = 0
        self.history: list[dict[str, float]] = []

    @property
    def _uses_thresholds(self) -> bool:
        return self.value_loss_threshold is not None or self.explained_variance_threshold is not None

    def _good_enough(self) -> bool:
        recent = self.history[-self.window :]
        if len(recent) < self.window:
            return False
        metrics = {k: sum(m[k] for m in recent) / len(recent) for k in ("critic/value_loss", "critic/explained_var")}
        ok = True
        if self.value_loss_threshold is not None:
            ok &= metrics["critic/value_loss"] <= self.value_loss_threshold
        if self.explained_variance_threshold is not None:
            ok &= metrics["critic/explained_var"] >= self.explained_variance_threshold
        return ok

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not getattr(pl_module, "uses_critic", False):
            raise ValueError(
                f"ValuePretraining needs a critic, but algorithm.estimator={pl_module.algorithm.estimator!r} is "
                "critic-free"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        if self.load_path:
            state = torch.load(self.load_path, map_location="cpu", weights_only=True)
            pl_module.load_critic_state(state)
            log.info("ValuePretraining: loaded critic from %s; skipping pretraining", self.load_path)
            self.done = True
            return
        limit = self.limit
        dm = trainer.datamodule
        opt = pl_module.optimizers()
        group = next(g for g in opt.param_groups if g["name"] == "critic")
        saved_lr = group["lr"]
        group["lr"] = self.lr or pl_module.optim.critic_lr
        replay: list = []  # the previous batches, newest last, at most replay_batches - 1
        try:
            while self.steps_done < limit:
                if trainer.received_sigterm:  # stop at this step boundary; resuming continues from here
                    raise SIGTERMException()
                batch = dm.next_batch()
                if batch is None:
                    dm.start_new_epoch()
                    continue
                metrics = pl_module.value_pretrain_step(batch, replay, draw=self.steps_done)
                if self.replay_batches > 1:
                    replay = [*replay, batch][-(self.replay_batches - 1):]
                self.steps_done += 1
                self.history.append(metrics)
                for logger in trainer.loggers:
                    logger.log_metrics({f"pretrain/{k.split('/', 1)[-1]}": v for k, v in metrics.items()},
                                       step=self.log_step(self.steps_done))
                if trainer.is_global_zero:
                    log.info("value pretraining %d/%d: loss %.4f, explained variance %.3f", self.steps_done, limit,
                             metrics["critic/value_loss"], metrics["critic/explained_var"])
                if self._uses_thresholds and self._good_enough():
                    break
        finally:
            group["lr"] = saved_lr
        self.done = True
        if self.save_path:
            state = pl_module.critic_state()
            if trainer.is_global_zero:
                Path(self.save_path).parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, self.save_path)

    @property
    def limit(self) -> int:
        return self.max_steps if self._uses_thresholds else self.steps

    def log_step(self, steps_done: int) -> int:
        """The TensorBoard step of pretraining step ``steps_done`` (1-based): the last planned one is step 0."""
        return steps_done - self.limit

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "steps_done": self.steps_done, "history": self.history,
                "next_log_step": self.log_step(self.steps_done + 1)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = state_dict["done"]
        self.steps_done = state_dict["steps_done"]
        self.history = state_dict["history"]
