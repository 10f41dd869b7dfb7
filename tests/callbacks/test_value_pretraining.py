"""ValuePretraining: duration by steps or thresholds, saving and starting from a saved critic."""

from __future__ import annotations

import pytest
import torch

from callbacks import ValuePretraining


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


def test_saved_critic_is_loaded_and_pretraining_skipped(make_run, tmp_path):
    path = tmp_path / "critic.pt"
    vp = ValuePretraining(steps=2, save_path=str(path))
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[vp]))
    trainer.fit(module, dm)
    saved = torch.load(path, weights_only=True)
    # the critic moved away from its zero-initialised head during pretraining
    assert float(saved["value_head.weight"].abs().sum()) > 0

    from tests.trainer.test_module import Recorder

    loader, rec = ValuePretraining(steps=50, load_path=str(path)), Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[loader, rec]))
    trainer.fit(module, dm)
    assert loader.done and loader.steps_done == 0
    # a fresh critic's zero head gives values of exactly 0 on the first rollout; the loaded one does not
    assert rec.metrics[0]["critic/values_mean"] != 0.0


def test_needs_a_critic(make_run):
    module, dm, trainer = make_run(algorithm=dict(estimator="grpo"),
                                   trainer=dict(max_steps=1, callbacks=[ValuePretraining(steps=1)]))
    with pytest.raises(ValueError, match="needs a critic"):
        trainer.fit(module, dm)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="ValuePretraining.steps"):
        ValuePretraining(steps=-1)
    with pytest.raises(ValueError, match="ValuePretraining.lr"):
        ValuePretraining(lr=0.0)
