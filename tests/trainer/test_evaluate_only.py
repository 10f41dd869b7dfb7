"""``vapo-pl validate``: an evaluation-only run of the ``Evaluation`` callback, no training, real vLLM."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.vllm


def test_validate_evaluates_a_model_directory_without_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vapo_pl.cli import main

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": f"{i}+1=?", "answer": f"work #### {i + 1}"}) + "\n"
                           for i in range(6)))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
trainer:
  accelerator: cpu
  devices: 1
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / 'tb'}, name: eval}}
  callbacks:
    - class_path: vapo_pl.callbacks.Evaluation
      init_args: {{every_n_steps: 1, name: tiny, samples_per_prompt: 3, max_tokens: 8}}
model:
  class_path: vapo_pl.VAPOModule
  init_args: {{model_path: {tiny_model_dir}}}
data:
  class_path: vapo_pl.RolloutDataModule
  init_args:
    val_files: {val}
    val_prompt_key: question
    val_answer_after: "####"
    max_prompt_length: 32
    max_response_length: 8
    engine: {{kind: vllm, dtype: float32}}
""")
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])
    built = []
    import vapo_pl.critic

    real = vapo_pl.critic.ValueModel.from_pretrained
    monkeypatch.setattr(vapo_pl.critic.ValueModel, "from_pretrained",
                        lambda *a, **k: built.append("critic") or real(*a, **k))
    assert main(["validate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("held-out 'tiny' at step 0:"))
    assert "mean@3" in line and "pass@3" in line and "maj@3" in line
    assert built == []  # the default estimator (gae) has a critic, but an evaluation does not build it
    acc = EventAccumulator(str(next((tmp_path / "tb" / "eval").iterdir())))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/tiny_mean@3")] == [0]
    assert 0.0 <= acc.Scalars("eval/tiny_pass@3")[0].value <= 1.0
