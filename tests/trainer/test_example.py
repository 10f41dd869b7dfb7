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


def test_guess_number_environment_example_runs(tiny_model_dir, tmp_path):
    """The multi-turn example: an Environment subclass in at most about 50 lines trains through real vLLM episodes."""
    path = REPO / "examples" / "guess_number.py"
    assert len(path.read_text().splitlines()) <= 50
    spec = importlib.util.spec_from_file_location("guess_number", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(str(tiny_model_dir), out_dir=str(tmp_path), max_steps=2)
    assert trainer.global_step == 2 and trainer.lightning_module.policy_version == 2
    metrics = trainer.callback_metrics
    assert float(metrics["episode/turns"]) > 1  # the environment answered and the policy took more turns
    env = example.GuessNumber()
    env.reset(type("R", (), {"answer": "7"})(), "guess 1-20")
    assert env.step([], "5").observation == "\nhigher\nA:" and env.step([], "9").observation == "\nlower\nA:"
    done = env.step([], "I say 7")
    assert done.done and done.reward == 1.0
