"""Non-finite and absurd values never reach the weights: the update is skipped, reported, and a run of them stops."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from vapo_pl import VAPOModule


def poisoned(bad_steps: set[int], value: float):
    """A module whose ``token_rewards`` hook returns ``value`` on one token at the given RL steps (0-based)."""

    class Poisoned(VAPOModule):
        def token_rewards(self, batch):
            rewards = super().token_rewards(batch)
            if self.rl_step in bad_steps:
                rewards[0, 0] = value
            return rewards

    return Poisoned


class Weights(pl.Callback):
    """Metrics and a copy of actor and critic weights after every RL step."""

    def __init__(self):
        self.metrics, self.actor, self.critic = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append(dict(outputs.metrics))
        self.actor.append({k: v.detach().clone() for k, v in pl_module.actor.state_dict().items()})
        self.critic.append({k: v.detach().clone() for k, v in pl_module.critic.state_dict().items()})


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("value", "reason"), [(math.nan, "token rewards (non-finite)"),
                                               (1e30, "token rewards (|value| > 10000)")])
def test_a_bad_reward_skips_that_update_and_training_goes_on(make_run, caplog, value, reason):
    rec = Weights()
    module, dm, trainer = make_run(module_cls=poisoned({1}, value), trainer=dict(max_steps=3, callbacks=[rec]))
    with caplog.at_level("WARNING", logger="vapo_pl.module"):
        trainer.fit(module, dm)
    assert [m["train/step_skipped"] for m in rec.metrics] == [0.0, 1.0, 0.0]
    assert rec.metrics[-1]["train/skipped_steps"] == 1.0
    # step 2 changed nothing; steps 1 and 3 did
    assert _same(rec.actor[1], rec.actor[0]) and _same(rec.critic[1], rec.critic[0])
    assert not _same(rec.actor[2], rec.actor[1]) and not _same(rec.actor[0], module.build_actor().state_dict())
    assert all(torch.isfinite(v).all() for w in rec.actor + rec.critic for v in w.values())
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == [f"RL step 2: update skipped, {reason} (1 skipped in a row)"]


def test_too_many_skips_in_a_row_stop_the_run_in_one_line(make_run):
    module, dm, trainer = make_run(module_cls=poisoned({0, 1, 2, 3}, math.inf),
                                   algorithm=dict(max_skipped_steps=3), trainer=dict(max_steps=5))
    with pytest.raises(RuntimeError) as info:
        trainer.fit(module, dm)
    message = str(info.value)
    assert message.startswith("stopping: 3 RL steps in a row skipped their update (step 3: token rewards")
    assert "\n" not in message
    assert all(torch.isfinite(p).all() for p in module.actor.parameters())


def test_a_non_finite_loss_skips_the_optimizer_step(make_run):
    """A NaN that gets past the reward check (here: a NaN old log-prob) makes the loss NaN: that optimizer step
    is dropped, nothing moves, and the step is reported."""
    rec = Weights()

    class NaNOldLogp(VAPOModule):
        def prepare(self, batch, critic_only=False):
            prep = super().prepare(batch, critic_only)
            if prep.old_logp is not None and self.rl_step == 1:
                prep.old_logp[0, 0] = math.nan
            return prep

    module, dm, trainer = make_run(module_cls=NaNOldLogp, algorithm=dict(minibatch_size=16),
                                   trainer=dict(max_steps=2, callbacks=[rec]))
    module.reuse_update_forward = False  # old log-probs from their own forward, where the NaN goes in
    trainer.fit(module, dm)
    assert [m["train/step_skipped"] for m in rec.metrics] == [0.0, 1.0]
    assert _same(rec.actor[1], rec.actor[0])


def test_bad_guard_settings_name_the_field():
    from vapo_pl.config import AlgorithmConfig

    with pytest.raises(ValueError, match="algorithm.max_abs_reward"):
        AlgorithmConfig(max_abs_reward=math.inf)
    with pytest.raises(ValueError, match="algorithm.max_skipped_steps"):
        AlgorithmConfig(max_skipped_steps=0)


def test_value_pretraining_skips_bad_batches_too(make_run):
    """A bad reward during value pretraining skips that critic update; the run of them stops in one line."""
    from vapo_pl.callbacks import ValuePretraining

    vp = ValuePretraining(steps=5)
    module, dm, trainer = make_run(module_cls=poisoned({0}, math.nan), trainer=dict(max_steps=1, callbacks=[vp]))
    with pytest.raises(RuntimeError, match=r"^stopping: 3 RL steps in a row skipped their update \(step 1: token"):
        trainer.fit(module, dm)
    assert vp.steps_done == 2 and module.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in module.critic.parameters())
