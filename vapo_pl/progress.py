"""What ``vapo-pl fit`` shows while it runs: a start summary, and a progress bar that counts RL steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

BAR_METRICS = ("reward", "acc", "len")  # logged by VAPOModule.log_metrics with prog_bar=True


class RLProgressBar(TQDMProgressBar):
    """``step 12/30`` (RL steps, which are ``trainer.global_step``) with reward, accuracy and response length; no
    epochs, no ``v_num``. One bar for the whole run, whatever the epochs of the prompt stream."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True)

    def init_train_tqdm(self):
        import sys

        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(desc="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def on_sanity_check_start(self, *_: Any) -> None:
        """No bar: the run has no validation loop to check (evaluation is a callback)."""

    def on_sanity_check_end(self, *_: Any) -> None:
        """Nothing to close."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description_str("step")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Nothing: the bar spans epochs."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the bar closes at the end of training."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar.refresh()
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {k: items[k] for k in BAR_METRICS if k in items}


def start_summary(trainer: pl.Trainer, module: pl.LightningModule) -> str:
    """A few lines at the start of ``vapo-pl fit``: model, algorithm, strategy and devices, where logs and
    checkpoints go."""
    algo = getattr(module, "algorithm", None)
    dm = trainer.datamodule
    lines = [f"model        {getattr(module, 'model_path', '?')}"
             + (" (actor + critic)" if getattr(module, "critic", None) is not None else " (actor)")]
    if algo is not None:
        what = f"estimator {algo.estimator}, policy loss {algo.policy_loss}"
        if algo.rollout_correction != "none":
            what += f", rollout correction {algo.rollout_correction}"
        if dm is not None and hasattr(dm, "prompts_per_step"):
            what += f"; {dm.prompts_per_step} prompts x {dm.samples_per_prompt} samples per step"
            if getattr(dm, "max_staleness", 0):
                what += ", generated one step ahead"
        lines.append(f"algorithm    {what}")
    steps = f"{trainer.max_steps} RL steps" if trainer.max_steps and trainer.max_steps > 0 else "until the data ends"
    lines.append(f"run          {steps} on {trainer.world_size} x {trainer.strategy.root_device.type} "
                 f"({type(trainer.strategy).__name__}, precision {trainer.precision})")
    logs = [getattr(lg, "log_dir", None) for lg in trainer.loggers]
    logs = [d for d in logs if d]
    lines.append("tensorboard  " + (f"tensorboard --logdir {logs[0]}" if logs else "no logger"))
    ckpts = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    lines.append("checkpoints  " + (", ".join(map(str, ckpts)) if ckpts else "none"))
    return "\n".join(lines)
