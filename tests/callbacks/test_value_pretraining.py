"""ValuePretraining: duration by steps or thresholds, saving and starting from a saved critic."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from vapo_pl.callbacks import ValuePretraining


def test_threshold_mode_stops_when_good_enough_and_respects_the_cap(make_run):
    # an unreachable explained variance: runs until the cap
    vp = ValuePretraining(explained_variance_threshold=2.0, max_steps=3)
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[vp]))
    trainer.fit(module, dm)
    assert vp.steps_done == 3
    # a value loss any critic meets: stops after the first step
    vp = ValuePretraining(value_loss_threshold=1e9, max_steps=5)
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[vp]))
    trainer.fit(module, dm)
    assert vp.steps_done == 1 and vp.done
    # the same threshold over a window of 3 steps: the mean needs 3 steps before it exists
    vp = ValuePretraining(value_loss_threshold=1e9, window=3, max_steps=5)
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[vp]))
    trainer.fit(module, dm)
    assert vp.steps_done == 3


class HeadAtStart(pl.Callback):
    """The critic's value head when this callback's ``on_train_start`` runs (callbacks run in list order)."""

    def on_train_start(self, trainer, pl_module):
        self.head = pl_module.critic.value_head.weight.detach().clone()


def test_saved_critic_is_loaded_and_pretraining_skipped(make_run, tmp_path):
    path = tmp_path / "critic.pt"
    initial, vp = HeadAtStart(), ValuePretraining(steps=2, save_path=str(path))
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[initial, vp]))
    trainer.fit(module, dm)
    saved = torch.load(path, weights_only=True)
    # the critic moved away from its initial head during pretraining
    assert not torch.equal(saved["value_head.weight"], initial.head)

    loader, probe = ValuePretraining(steps=50, load_path=str(path)), HeadAtStart()
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[loader, probe]))
    trainer.fit(module, dm)
    assert loader.done and loader.steps_done == 0
    # RL starts from the saved critic, not from a fresh head
    assert torch.equal(probe.head, saved["value_head.weight"])


def test_needs_a_critic(make_run):
    module, dm, trainer = make_run(algorithm=dict(estimator="grpo"),
                                   trainer=dict(max_steps=1, callbacks=[ValuePretraining(steps=1)]))
    with pytest.raises(ValueError, match="needs a critic"):
        trainer.fit(module, dm)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="ValuePretraining.steps"):
        ValuePretraining(steps=-1)
    with pytest.raises(ValueError, match="ValuePretraining.window"):
        ValuePretraining(window=0)
    with pytest.raises(ValueError, match="ValuePretraining.lr"):
        ValuePretraining(lr=0.0)
    with pytest.raises(ValueError, match="ValuePretraining.replay_batches"):
        ValuePretraining(replay_batches=0)


def test_replay_mixes_earlier_batches_into_each_update(make_run):
    """``replay_batches=3``, ``critic_epochs=2``: step s gets the previous min(s, 2) batches; each update makes one
    pass over as many rows as two batches hold (one batch alone: two passes over it), drawn from the newest batch
    and those, and once there are earlier batches some rows come from them. The explained variance is the one
    measured on the newest batch before the update."""
    from vapo_pl import VAPOModule

    calls = []

    class Recording(VAPOModule):
        def value_pretrain_step(self, batch, replay=(), draw=0):
            calls.append({"batch": batch, "replay": list(replay), "trained": []})
            metrics = super().value_pretrain_step(batch, replay, draw)
            calls[-1]["ev"] = metrics["critic/explained_var"]
            return metrics

        def update(self, batch, prep, adv, critic_only=False, epochs=None, **kwargs):
            if calls and critic_only and "ev" not in calls[-1]:
                calls[-1]["trained"].append((batch, epochs))
            return super().update(batch, prep, adv, critic_only, epochs, **kwargs)

    vp = ValuePretraining(steps=4, replay_batches=3)
    module, dm, trainer = make_run(module_cls=Recording, trainer=dict(max_steps=1, callbacks=[vp]),
                                   algorithm=dict(critic_epochs=2))
    trainer.fit(module, dm)
    assert [len(c["replay"]) for c in calls] == [0, 1, 2, 2]
    assert all(c["replay"][-1] is calls[i]["batch"] for i, c in enumerate(calls[1:]))

    def rows(b):  # each rollout row as its unpadded prompt + response ids
        return [tuple(ids[m.bool()].tolist()) for ids, m in zip(b.input_ids, b.attention_mask)]

    mixed = 0
    for i, c in enumerate(calls):
        ((trained, epochs),) = c["trained"]
        assert (len(trained), epochs) == ((len(c["batch"]), None) if i == 0 else (2 * len(c["batch"]), 1))
        newest = set(rows(c["batch"]))
        pool = newest.union(*(rows(b) for b in c["replay"]))
        assert set(rows(trained)) <= pool
        mixed += bool(c["replay"]) and not set(rows(trained)) <= newest
        assert vp.history[i]["critic/explained_var"] == c["ev"]
        assert vp.history[i]["rollout/reward_mean"] == pytest.approx(float(c["batch"].scores.float().mean()))
    assert mixed >= 2
