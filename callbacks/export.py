"""Write the actor in Hugging Face format during training, for evaluation with other tools.

A Lightning checkpoint holds actor, critic, optimizers and the run's state, and only vapo-pl reads it back.
``ExportActor`` writes what vLLM, transformers or an evaluation harness load directly: the actor's weights and
the tokenizer, as ``<dirpath>/step_<N>`` after RL step ``N``, every ``every_n_steps`` steps, at the steps listed
in ``at_steps``, and after the last step (``at_end``). Under FSDP2 or ZeRO-3 every rank takes part in gathering the
weights and rank 0 writes. Each export goes to a temporary directory first and is renamed into place, so a run
killed while writing never leaves a half-written ``step_<N>`` behind; an existing ``step_<N>`` (from a run resumed
past it) is replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class ExportActor(pl.Callback):
    """Export the actor as a Hugging Face model directory at chosen RL steps.

    Args:
        dirpath: where the ``step_<N>`` directories go (created if missing).
        every_n_steps: export after every RL step that is a multiple of this; ``None`` = no periodic export.
        at_steps: export after each of these RL steps as well.
        at_end: export after the last RL step of the run.
        merged: with ``model.lora``, also write the merged model (``step_<N>/merged``) beside the adapter.
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = None, at_steps: Sequence[int] = (),
                 at_end: bool = True, merged: bool = False) -> None:
        if not isinstance(dirpath, str) or not dirpath.strip():
            raise ValueError("ExportActor.dirpath: give a directory")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"ExportActor.every_n_steps must be an integer >= 1 or null, got {every_n_steps!r}")
        bad = [s for s in at_steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ValueError(f"ExportActor.at_steps must hold RL steps >= 1, got {bad[0]!r}")
        if every_n_steps is None and not at_steps and not at_end:
            raise ValueError("ExportActor: nothing to export (set every_n_steps, at_steps or at_end)")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.at_steps = frozenset(at_steps)
        self.at_end = at_end
        self.merged = merged
        self.last_exported: int | None = None

    def path_for(self, step: int) -> Path:
        return self.dirpath / f"step_{step:06d}"

    def _due(self, step: int) -> bool:
        return step in self.at_steps or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    def _export(self, pl_module: pl.LightningModule, step: int) -> None:
        path = self.path_for(step)
        pl_module.export_actor(str(path), merged=self.merged)
        self.last_exported = step
        rank_zero_info(f"exported the actor after RL step {step} to {path}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.rl_step
        if step >= 1 and self._due(step):
            self._export(pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        step = pl_module.rl_step
        if self.at_end and step >= 1 and self.last_exported != step:
            self._export(pl_module, step)
