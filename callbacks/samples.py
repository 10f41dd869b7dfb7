"""A few completions as TensorBoard text: prompt, response, reward, gold and extracted answer.

Reading samples is how reward hacking, format drift and degenerate repetition get caught; numbers alone
hide them. Every ``every_n_steps`` steps the logger picks up to ``num_samples`` samples of the batch,
half correct and half wrong when both exist, and writes them under the text tag ``rollout/samples``.
The pick is random but seeded by the step, so a rerun shows the same samples. Only rank 0 writes (its
own shard of the batch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from vapo_pl.callbacks.length import logger_step

TEXT_TAG = "rollout/samples"
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def markdown_escape(text: str) -> str:
    """Backslash-escape every markdown (and inline-HTML / math) character; newlines become hard breaks."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return escaped.replace("\r\n", "\n").replace("\n", "  \n")


def pick_samples(correct: Tensor, num_samples: int, seed: int) -> list[int]:
    """Indices of up to ``num_samples`` samples: ceil(n/2) correct and the rest wrong when both exist,
    topping up from the other side when one side runs short. Correct ones first.

    Args:
        correct: (B,) bool.
        num_samples: how many to pick at most.
        seed: seeds the random choice within each side.
    """
    g = torch.Generator().manual_seed(seed)
    correct = correct.bool().cpu()
    good = correct.nonzero().squeeze(1)
    bad = (~correct).nonzero().squeeze(1)
    good = good[torch.randperm(len(good), generator=g)]
    bad = bad[torch.randperm(len(bad), generator=g)]
    n_good = min(len(good), max(num_samples - len(bad), (num_samples + 1) // 2))
    n_bad = min(len(bad), num_samples - n_good)
    return good[:n_good].tolist() + bad[:n_bad].tolist()


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]} [... {len(text) - max_chars} more characters]"


def format_sample(i: int, meta: Mapping[str, Any], score: float, correct: bool, max_chars: int) -> str:
    """One sample as markdown; every model- or data-provided string is escaped."""
    def field(key: str) -> str:
        value = meta.get(key)
        return "(none)" if value is None else markdown_escape(_clip(str(value), max_chars))

    verdict = "correct" if correct else "wrong"
    return "\n\n".join([
        f"**sample {i}**: {verdict}, reward {score:.4g}, source {field('source')}",
        f"**answer:** {field('answer')} / **extracted:** {field('extracted')}",
        f"**prompt:**  \n{field('prompt')}",
        f"**response:**  \n{field('response')}",
    ])


class SampleLogger(pl.Callback):
    """Writes a few completions with their rewards and answers to TensorBoard as text.

    Reads ``outputs["rollout"]``: ``metadata`` (per sample ``prompt``, ``response``, ``answer``,
    ``extracted``, ``source``), ``scores`` and ``correct``.

    Args:
        every_n_steps: write on steps that are a multiple of this (the first step, 0, included).
        num_samples: samples per write.
        max_chars: prompts and responses longer than this are cut (TensorBoard slows down on huge text).
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4, max_chars: int = 4000) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("num_samples", num_samples),
                            ("max_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SampleLogger.{name} must be an integer >= 1, got {value!r}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.max_chars = max_chars

    def render(self, rollout: Any, step: int) -> str | None:
        """The markdown written at ``step``; None when the batch carries no metadata."""
        if not rollout.metadata:
            return None
        picked = pick_samples(rollout.correct, self.num_samples, seed=step)
        scores = rollout.scores.detach().float().cpu()
        correct = rollout.correct.bool().cpu()
        blocks = [format_sample(i, rollout.metadata[i], float(scores[i]), bool(correct[i]), self.max_chars)
                  for i in picked]
        return "\n\n---\n\n".join(blocks)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = logger_step(trainer)
        if not trainer.is_global_zero or step % self.every_n_steps:
            return
        rollout = outputs.get("rollout") if isinstance(outputs, Mapping) else None
        if rollout is None or len(rollout) == 0:
            return
        text = self.render(rollout, step)
        if text is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(TEXT_TAG, text, global_step=step)
