"""The critic's training beyond the joint update: value pretraining steps, the critic-only passes, the replay pool,
and the critic's share of a single joint update when its targets are Monte-Carlo returns.

Which of these an RL step uses is decided here, from the configuration (``algorithm.critic_replay_batches``,
``VAPOModule.values_from_update``); the RL step calls ``values_and_advantages`` and ``after_update`` either way.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vapo_pl.algorithms.value import explained_variance
from vapo_pl.batch import RolloutBatch
from vapo_pl.parallel import gradient_sync
from vapo_pl.update import CriticFirst, UpdateSkipped

if TYPE_CHECKING:
    from vapo_pl.algorithms.advantages import AdvantageOutputs
    from vapo_pl.batch import PreparedBatch
    from vapo_pl.module import VAPOModule


class CriticTraining:
    """The critic-only work of ``module``: pretraining, replayed passes and the critic-first joint pass."""

    def __init__(self, module: VAPOModule) -> None:
        self.m = module
        # earlier RL batches (on CPU) the critic-only passes draw from (algorithm.critic_replay_batches)
        self.pool: deque[RolloutBatch] = deque(maxlen=max(1, module.algorithm.critic_replay_batches))

    @property
    def replays(self) -> bool:
        return self.m.critic is not None and self.m.algorithm.critic_replay_batches > 0

    @property
    def joint_epochs(self) -> int | None:
        """Epochs of the joint update: with replay, the critic's extra epochs are drawn from the pool instead."""
        return self.m.algorithm.ppo_epochs if self.replays else None

    # ------------------------------------------------------------------ during an RL step
    def values_and_advantages(self, batch: RolloutBatch, rewards: Tensor, prep: PreparedBatch
                              ) -> tuple[AdvantageOutputs, CriticFirst | None]:
        """The advantages of the update. When the critic's old values come from its own update pass
        (``values_from_update``: Monte-Carlo targets need no values), that pass runs first, fills
        ``prep.old_values`` and leaves its gradients for the joint optimizer step (returned as ``CriticFirst``)."""
        m = self.m
        first = None
        if m.values_from_update(len(batch)):
            returns = m.compute_advantages(batch, rewards, torch.zeros_like(rewards)).returns
            bad = m.updater.first_bad_tensor({"token rewards": rewards, "returns": returns}, batch.response_mask,
                                             bound={"token rewards": m.algorithm.max_abs_reward})
            if bad is None:
                prep.old_values, first = self.first_pass(batch, returns)
            else:
                prep.old_values = torch.zeros_like(rewards)
        return m.compute_advantages(batch, rewards, prep.old_values), first

    def first_pass(self, batch: RolloutBatch, returns: Tensor) -> tuple[Tensor, CriticFirst]:
        """The critic's share of the single joint update when ``values_from_update``: forward and backward of the
        value loss on the update's own micro-batches, with these values (detached) as the old values, so value
        clipping does nothing, as on any first pass. The gradients wait for the joint optimizer step; actor and
        critic are separate models, so running all critic micro-batches before the actor's gives the same
        gradients. Returns the (B, T) values and the loss statistics the update logs."""
        m, updater = self.m, self.m.updater
        device = batch.scores.device
        n_val_tok = m._sum_across_ranks(batch.response_mask.sum().float()) / m._world
        values = torch.zeros(batch.response_mask.shape, device=device)
        total = torch.zeros((), device=device)
        clipfrac = []
        parts = updater.micro_batches(updater.minibatches(len(batch))[0], device)
        for i, (idx, host_idx) in enumerate(parts):
            mb = batch.select(idx, host_idx)
            v = m.critic_values(mb)
            values[idx] = v.detach()
            loss, vstats = updater.value_loss(mb, v, values[idx], returns[idx], n_val_tok)
            with gradient_sync(m, sync=i == len(parts) - 1):
                m.manual_backward(loss)
            total = total + loss.detach()
            clipfrac.append(vstats["vf_clipfrac"])
        return values, CriticFirst(value_loss=total, vf_clipfrac=torch.stack(clipfrac))

    def after_update(self, batch: RolloutBatch) -> dict[str, float]:
        """With ``algorithm.critic_replay_batches``: the critic-only passes drawn from the pool, then ``batch`` joins
        the pool. Nothing otherwise."""
        if not self.replays:
            return {}
        metrics = self.replay_passes(batch)
        self.pool.append(batch.to("cpu"))
        return metrics

    def replay_passes(self, batch: RolloutBatch) -> dict[str, float]:
        """The critic-only passes of an RL step with ``algorithm.critic_replay_batches``: as many rows as those passes
        would train on (``len(batch)`` x (``critic_epochs`` - ``ppo_epochs``)), drawn without repeats (while the
        pool lasts) from the current batch and the earlier RL batches kept in ``pool``; targets are the returns
        under the configured ``lambda_critic``, from the critic as it is now. Rows of earlier batches carry their own
        policy's returns: off-policy, which is the trade for seeing more prompts per update. Logged as
        ``critic/replay_*``."""
        m, cfg = self.m, self.m.algorithm
        n = len(batch) * ((cfg.critic_epochs or cfg.ppo_epochs) - cfg.ppo_epochs)
        pool = m.rollout_data.concat([*self.pool, batch.to("cpu")])
        g = torch.Generator().manual_seed(m.seed * 1_000_003 + m.rl_step + 7_777_777)
        rows = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(-(-n // len(pool)))])[:n]

        def renamed(metrics: dict[str, float]) -> dict[str, float]:
            out = {"critic/replay_" + k.removeprefix("critic/"): v for k, v in metrics.items() if k.startswith("critic/")}
            out["critic/replay_rows_from_earlier_batches"] = float((rows < len(pool) - len(batch)).float().mean())
            return out

        try:
            return renamed(self.pass_on_rows(pool, rows))
        except UpdateSkipped as skip:
            raise UpdateSkipped(skip.reason, renamed(skip.metrics)) from None

    def pass_on_rows(self, pool: RolloutBatch, rows: Tensor, monte_carlo_critic: bool = False) -> dict[str, float]:
        """One critic-only pass over rows ``rows`` of ``pool`` (replay during pretraining and RL), with targets from
        the critic as it is now."""
        m = self.m
        sub = pool.select(rows).to(m.device)
        prep = m.prepare(sub, critic_only=True)
        adv = m.compute_advantages(sub, m.token_rewards(sub), prep.old_values, monte_carlo_critic)
        return m.update(sub, prep, adv, critic_only=True, epochs=1)

    # ------------------------------------------------------------------ value pretraining
    def pretrain_step(self, batch: RolloutBatch, replay: Sequence[RolloutBatch] = (), draw: int = 0
                      ) -> dict[str, float]:
        """One critic-only update on Monte-Carlo returns; the policy and the engine stay unchanged. Runs in the
        trainer's precision context (it is called from a callback, outside ``training_step``, which is all Lightning
        wraps).

        With ``replay`` (earlier pretraining batches of the same frozen policy, so still on-policy) the update trains
        on ``len(batch)`` x ``critic_epochs`` rows drawn at random from ``replay`` and ``batch`` together, in one pass:
        its minibatches then mix the prompts of many batches instead of a few prompts' samples in a row (``draw``
        seeds the choice). Explained variance is measured on ``batch`` alone, before the update, either way."""
        with self.m.trainer.precision_plugin.train_step_context():
            return self._pretrain_step(batch, replay, draw)

    def _pretrain_step(self, batch: RolloutBatch, replay: Sequence[RolloutBatch], draw: int) -> dict[str, float]:
        m = self.m
        m.check_on_policy(batch)
        for old in replay:
            m.check_on_policy(old)
        batch = batch.to(m.device)
        prep = m.prepare(batch, critic_only=True)
        rewards = m.token_rewards(batch)
        adv = m.compute_advantages(batch, rewards, prep.old_values, monte_carlo_critic=True)
        bad = m.updater.first_bad_tensor({"token rewards": rewards, "returns": adv.returns}, batch.response_mask,
                                         bound={"token rewards": m.algorithm.max_abs_reward})
        ev = float(explained_variance(prep.old_values, adv.returns, batch.response_mask))
        reward_mean = float(batch.scores.mean())
        skipped = None
        try:
            if bad is not None:
                raise UpdateSkipped(bad, {"critic/value_loss": math.nan})
            if replay:
                pool = m.rollout_data.concat([*(b.to("cpu") for b in replay), batch.to("cpu")])
                g = torch.Generator().manual_seed(m.seed * 1_000_003 + draw)
                n = min(len(pool), len(batch) * (m.algorithm.critic_epochs or m.algorithm.ppo_epochs))
                rows = torch.randperm(len(pool), generator=g)[:n].sort().values
                metrics = self.pass_on_rows(pool, rows, monte_carlo_critic=True)
            else:
                metrics = m.update(batch, prep, adv, critic_only=True)
        except UpdateSkipped as skip:
            metrics, skipped = skip.metrics, skip.reason
        m.updater.record_skip(skipped)
        metrics["critic/explained_var"] = ev  # both of the newest batch, whatever the update trained on
        metrics["rollout/reward_mean"] = reward_mean
        m._pin_global_step()
        return {k: v for k, v in metrics.items() if not k.startswith("actor/")}
