"""Held-out evaluation during training: mean@k, pass@k and maj@k on the DataModule's validation prompts.

The VAPO paper reports AIME 2024 ``mean@32`` (the average accuracy of 32 samples per problem, sampled at
temperature 1.0 and top_p 0.7). Evaluation therefore samples with its own settings, independent of the
training rollouts (which must use top_p 1). Per problem with ``k`` samples of which ``c`` are correct:

- mean@k = c / k;
- pass@k = 1 - C(k - c, k) / C(k, k), the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", Eq. 1) with n = k samples, computed as the stable product
  1 - prod_{i = n-c+1}^{n} (1 - k / i) instead of with binomials (which overflow for large n);
- maj@k = 1 if the most frequent extracted answer (self-consistency, Wang et al. 2022) is correct.

Each metric is averaged over problems and logged as ``eval/{name}_mean@{k}``, ``eval/{name}_pass@{k}``,
``eval/{name}_maj@{k}``, with ``eval/{name}_response_length_mean`` and ``eval/{name}_clip_ratio``.

When: at the start of training step ``s`` whenever ``s`` is a multiple of ``every_n_steps`` (step 0, the base
policy, only with ``at_start``), and once more at the end of training for the final policy (``at_end``).
Evaluating before step ``s``'s rollout means the score logged at step ``s`` and the training metrics at step
``s`` describe the same policy (the one after ``s`` updates). Under DDP the problems are dealt round-robin
to the ranks and the per-problem sums are all-reduced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from vapo_pl.common import derive_seed, publish_metrics
from vapo_pl.common import sum_across_ranks as _sum_across_ranks
from vapo_pl.common import world as _world
from vapo_pl.rollout.base import Sampling

_EVAL_STREAM = 0xE7A1  # keeps evaluation seeds apart from the training rollouts' seeds
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def pass_at_k(n: int, c: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per problem (Chen et al. 2021, Eq. 1): the chance that at least one of ``k`` samples
    drawn without replacement from ``n`` generated ones, ``c`` of them correct, is correct.

    1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)   (1 when n - c < k).

    Args:
        n: samples generated per problem.
        c: (P,) number of correct samples per problem, each in [0, n].
        k: 1 <= k <= n.

    Returns:
        (P,) float64 in [0, 1].
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    c = torch.as_tensor(c, dtype=torch.long)
    if c.numel() and (c.min() < 0 or c.max() > n):
        raise ValueError(f"c must lie in [0, n={n}], got values in [{int(c.min())}, {int(c.max())}]")
    i = torch.arange(1, n + 1, dtype=torch.float64)  # (n,)
    in_product = i[None, :] > (n - c)[:, None]  # (P, n): the factors i = n-c+1 .. n
    factors = torch.where(in_product, 1.0 - k / i[None, :], torch.ones((), dtype=torch.float64))
    # when n - c < k one factor is exactly 0 (i = k) and the product is 0, so pass@k = 1 with no special case
    return 1.0 - factors.prod(dim=1)


def _normalise_answer(answer: str | None) -> str | None:
    if answer is None:
        return None
    text = answer.strip()
    return text or None


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Tensor) -> Tensor:
    """Majority vote per problem: 1 if the most frequent extracted answer is a correct one.

    Answers are compared as strings after stripping whitespace, so "0.5" and "1/2" are different votes.
    Samples without an extracted answer (None or empty) abstain; a problem where every sample abstains
    scores 0. Ties go to the tied answer that appears first in sample order (deterministic given the
    samples). The winner is scored by the ``correct`` flag of its first occurrence.

    Args:
        answers: P lists of k extracted answers (None where nothing was extracted).
        correct: (P, k) bool, the verifier's verdict per sample.

    Returns:
        (P,) float64 of 0 / 1.
    """
    correct = torch.as_tensor(correct).bool().cpu()
    if correct.dim() != 2 or correct.shape[0] != len(answers):
        raise ValueError(f"correct must be ({len(answers)}, k), got {tuple(correct.shape)}")
    out = torch.zeros(len(answers), dtype=torch.float64)
    # a loop over problems with dicts of strings: evaluation only, a few hundred problems at most
    for p, row in enumerate(answers):
        if len(row) != correct.shape[1]:
            raise ValueError(f"answers[{p}] has {len(row)} entries, correct has {correct.shape[1]} per problem")
        votes: dict[str, int] = {}
        first: dict[str, int] = {}
        for j, a in enumerate(row):
            key = _normalise_answer(a)
            if key is None:
                continue
            votes[key] = votes.get(key, 0) + 1
            first.setdefault(key, j)
        if votes:
            winner = max(votes, key=lambda a: (votes[a], -first[a]))
            out[p] = float(correct[p, first[winner]])
    return out


class Evaluation(pl.Callback):
    """Samples ``samples_per_prompt`` responses per held-out problem and logs mean@k, pass@k and maj@k.

    Problems come from the DataModule's ``val_records`` / ``val_prompt_ids`` (``data.val_files``);
    generation goes through ``RolloutDataModule.evaluate`` (the training engine, the module's reward).

    Args:
        every_n_steps: evaluate before every step that is a multiple of this.
        name: metric infix, e.g. ``aime24`` gives ``eval/aime24_mean@32``.
        samples_per_prompt: k. The paper: 32.
        temperature: sampling temperature (0 = greedy, only with k = 1). The paper: 1.0.
        top_p: nucleus sampling. The paper: 0.7.
        max_tokens: response cap; default the DataModule's ``max_response_length``. Must fit the
            engine's ``max_model_len`` together with the prompt.
        max_problems: evaluate only the first this many problems (None: all).
        at_start: also evaluate the initial policy, before the first step (logged at step 0).
        at_end: also evaluate the final policy when training ends (if that step was not evaluated yet).
        prompts_per_call: problems per ``generate`` call, to bound the engine's memory.

    ``history`` holds one dict per evaluation, ``{"step": s, "eval/...": value, ...}``; it is saved in
    checkpoints. ``vapo-pl validate`` (or ``test``) runs one evaluation without training.
    """

    def __init__(
        self,
        every_n_steps: int,
        name: str = "heldout",
        samples_per_prompt: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        max_problems: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        prompts_per_call: int = 64,
    ) -> None:
        super().__init__()
        for arg, value in (("every_n_steps", every_n_steps), ("samples_per_prompt", samples_per_prompt),
                           ("prompts_per_call", prompts_per_call)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Evaluation.{arg} must be an integer >= 1, got {value!r}")
        for arg, value in (("max_tokens", max_tokens), ("max_problems", max_problems)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Evaluation.{arg} must be None or an integer >= 1, got {value!r}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"Evaluation.name must be non-empty letters, digits, '_', '-' or '.', got {name!r}")
        if not temperature >= 0:
            raise ValueError(f"Evaluation.temperature must be >= 0, got {temperature}")
        if temperature == 0 and samples_per_prompt > 1:
            raise ValueError(
                f"Evaluation.temperature=0 (greedy) needs samples_per_prompt=1, got {samples_per_prompt}"
            )
        if not 0 < top_p <= 1:
            raise ValueError(f"Evaluation.top_p must be in (0, 1], got {top_p}")
        self.every_n_steps = every_n_steps
        self.name = name
        self.k = samples_per_prompt
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.max_problems = max_problems
        self.at_start = at_start
        self.at_end = at_end
        self.prompts_per_call = prompts_per_call
        self.history: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def metric_names(self) -> list[str]:
        p = f"eval/{self.name}"
        return [f"{p}_mean@{self.k}", f"{p}_pass@{self.k}", f"{p}_maj@{self.k}", f"{p}_response_length_mean",
                f"{p}_clip_ratio"]

    # ------------------------------------------------------------------ the evaluation itself
    def sampling(self, datamodule: Any, step: int, first_problem: int) -> Sampling:
        return Sampling(n=self.k, temperature=self.temperature, top_p=self.top_p,
                        max_tokens=self.max_tokens or datamodule.max_response_length,
                        seed=derive_seed(datamodule.seed, _EVAL_STREAM, step, first_problem))

    def problem_sums(self, correct: Tensor, extracted: Sequence[str | None], lengths: Tensor,
                     truncated: Tensor) -> Tensor:
        """Sums over this rank's problems, ready to all-reduce.

        Args:
            correct: (P * k,) bool, grouped by problem (the k samples of a problem are adjacent).
            extracted: P * k extracted answers in the same order.
            lengths: (P * k,) response lengths.
            truncated: (P * k,) bool.

        Returns:
            (7,) float64: [sum mean@k, sum pass@k, sum maj@k, problems, sum of lengths, samples, truncated].
        """
        by_problem = correct.bool().cpu().reshape(-1, self.k)  # (P, k)
        n_problems = by_problem.shape[0]
        answers = [list(extracted[i * self.k : (i + 1) * self.k]) for i in range(n_problems)]
        c = by_problem.sum(dim=1)
        return torch.tensor([
            float((c.double() / self.k).sum()),
            float(pass_at_k(self.k, c, self.k).sum()),
            float(maj_at_k(answers, by_problem).sum()),
            float(n_problems),
            float(lengths.double().sum()),
            float(lengths.numel()),
            float(truncated.double().sum()),
        ], dtype=torch.float64)

    @torch.no_grad()
    def evaluate(self, datamodule: Any, step: int) -> dict[str, float]:
        """Evaluate the engine's current policy on the held-out problems, append to ``history``, return the
        metrics. Call it on every rank (it all-reduces)."""
        if not datamodule.val_prompt_ids:
            raise ValueError(
                f"Evaluation({self.name!r}): the DataModule has no held-out prompts; set data.val_files"
            )
        total = len(datamodule.val_prompt_ids)
        if self.max_problems is not None:
            total = min(total, self.max_problems)
        if hasattr(datamodule, "deal"):  # per engine replica: a tensor-parallel group submits the same prompts
            mine = datamodule.deal(range(total))
        else:
            rank, world = _world()
            mine = list(range(total))[rank::world]
        sums = torch.zeros(9, dtype=torch.float64)
        sampling = lambda first: self.sampling(datamodule, step, first)
        for batch in datamodule.evaluate(mine, sampling, self.prompts_per_call):
            extracted = [m.get("extracted") for m in batch.metadata] if batch.metadata else [None] * len(batch)
            sums[:7] += self.problem_sums(batch.correct, extracted, batch.lengths, batch.truncated)
            if batch.observation_mask is not None:  # multi-turn episodes: turns and tool use
                sums[7] += sum(m.get("turns", 0) for m in batch.metadata)
                sums[8] += sum(m.get("tool_calls", 0) > 0 for m in batch.metadata)
        mean, pas, maj, n_problems, len_sum, n_samples, n_trunc, turns, tooled = _sum_across_ranks(sums).tolist()
        names = self.metric_names()
        metrics = dict(zip(names, [mean / n_problems, pas / n_problems, maj / n_problems, len_sum / n_samples,
                                   n_trunc / n_samples]))
        if getattr(datamodule, "environment", None) is not None:
            metrics[f"eval/{self.name}_turns_mean"] = turns / n_samples
            metrics[f"eval/{self.name}_tool_call_rate"] = tooled / n_samples
        self.history.append({"step": step, **metrics})
        return metrics

    # ------------------------------------------------------------------ when
    def _evaluated_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    def due(self, step: int) -> bool:
        if self._evaluated_at(step):
            return False
        if step == 0:
            return self.at_start
        return step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == 0 and self.due(0):  # the initial policy, before the first rollout
            self._run(trainer, 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Right after step s's weight sync, before ModelCheckpoint (Lightning runs it last) saves step s: the
        # evaluation of the policy after s updates is then part of checkpoint s, and a resumed run never redoes it.
        step = trainer.global_step
        if step > 0 and self.due(step):
            self._run(trainer, step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``vapo-pl validate``: evaluate the policy (``model_path``, or ``--ckpt_path``'s actor) once."""
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking:
            # the RL step the policy is at: a checkpoint's (restored by the module), else 0
            self._run(trainer, int(getattr(pl_module, "rl_step", trainer.global_step)))

    on_test_epoch_end = on_validation_epoch_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.at_end and not self._evaluated_at(step):
            self._run(trainer, step)
        if trainer.is_global_zero and len(self.history) >= 2:
            print(self.summary(), flush=True)

    def _run(self, trainer: pl.Trainer, step: int) -> None:
        metrics = self.evaluate(trainer.datamodule, step)
        self.publish(trainer, metrics, step)
        if trainer.is_global_zero:  # progress while a run goes on, not only in TensorBoard
            print(self.progress_line(metrics, step), flush=True)

    def progress_line(self, metrics: dict[str, float], step: int) -> str:
        """``held-out 'heldout' at step 10: mean@4 0.794  pass@4 0.955  maj@4 0.870``."""
        prefix = f"eval/{self.name}_"
        shown = "  ".join(f"{name} {metrics[prefix + name]:.3f}"
                          for name in (f"mean@{self.k}", f"pass@{self.k}", f"maj@{self.k}", "tool_call_rate")
                          if prefix + name in metrics)
        return f"held-out '{self.name}' at step {step}: {shown}"

    def summary(self) -> str:
        """One line per metric: first evaluation (the base policy when ``at_start``) -> last."""
        first, last = self.history[0], self.history[-1]
        lines = [f"held-out evaluation '{self.name}': step {int(first['step'])} -> step {int(last['step'])}"]
        extra = [k for k in last if k.endswith(("_turns_mean", "_tool_call_rate"))]
        for key in [*self.metric_names(), *extra]:
            if key in first and key in last:
                lines.append(f"  {key:32s} {first[key]:.3f} -> {last[key]:.3f}")
        return "\n".join(lines)

    @staticmethod
    def publish(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Write to the loggers at ``step`` and expose to ``ModelCheckpoint(monitor=...)`` (``publish_metrics``;
        ``self.log`` is refused in ``on_train_end``)."""
        publish_metrics(trainer, metrics, step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
