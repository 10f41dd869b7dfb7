"""Tests for callbacks/export.py: a real (tiny) training run exports the actor at the chosen steps, each export
loads in transformers with the actor's weights of that moment, and nothing half-written is left behind."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from vapo_pl.callbacks import ExportActor


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


class _Snapshot(pl.Callback):
    """The actor's weights after every RL step (runs after ExportActor in the callback list)."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[pl_module.rl_step] = {k: v.detach().clone() for k, v in pl_module.actor.state_dict().items()}


def test_exports_at_the_chosen_steps_with_that_steps_weights(make_run, tmp_path):
    out = tmp_path / "exports"
    export, snap = ExportActor(str(out), every_n_steps=2, at_steps=[1]), _Snapshot()
    module, dm, trainer = make_run(trainer=dict(max_steps=3, callbacks=[export, snap]))
    trainer.fit(module, dm)
    assert sorted(p.name for p in out.iterdir()) == ["step_000001", "step_000002", "step_000003"]  # 3: at_end
    for step in (1, 2, 3):
        loaded = _load(out / f"step_{step:06d}")
        for k, v in snap.weights[step].items():
            assert torch.equal(loaded[k], v), (step, k)
    assert not torch.equal(snap.weights[1]["lm_head.weight"], snap.weights[3]["lm_head.weight"])
    assert (out / "step_000003" / "tokenizer_config.json").is_file()


def test_export_replaces_an_old_directory_and_clears_a_killed_write(make_run, tmp_path):
    module, dm, trainer = make_run(trainer=dict(max_steps=1))
    trainer.fit(module, dm)
    target = tmp_path / "actor"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier run")
    partial = tmp_path / ".actor.partial"  # what a run killed while writing leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    module.export_actor(str(target))
    assert not (target / "stale.txt").exists() and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor"]
    loaded = _load(target)
    for k, v in module.actor.state_dict().items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("kwargs, field", [
    (dict(dirpath=""), "dirpath"),
    (dict(dirpath="x", every_n_steps=0), "every_n_steps"),
    (dict(dirpath="x", every_n_steps=True), "every_n_steps"),
    (dict(dirpath="x", at_steps=[2, 0]), "at_steps"),
    (dict(dirpath="x", at_end=False), "nothing to export"),
])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExportActor(**kwargs)
