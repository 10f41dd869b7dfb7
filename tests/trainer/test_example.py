"""The examples/ subclass trains a new task end to end (real vLLM rollouts)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def test_reverse_digits_example_runs(tiny_model_dir, tmp_path):
    source = (REPO / "examples" / "reverse_digits.py").read_text()
    assert len(source.splitlines()) <= 40
    spec = importlib.util.spec_from_file_location("reverse_digits", REPO / "examples" / "reverse_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(str(tiny_model_dir), out_dir=str(tmp_path), max_steps=2)
    module = trainer.lightning_module
    assert trainer.global_step == 2 and module.policy_version == 2
    # the subclass's prompt hook was used, and its reward terms were logged
    assert trainer.datamodule.train_records and "reward/exact" in trainer.callback_metrics
    assert "reward/partial" in trainer.callback_metrics
