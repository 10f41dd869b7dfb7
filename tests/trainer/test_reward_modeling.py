"""Reward-model training (Bradley-Terry) and the RLHF chain: train a reward model on demo-task preference pairs,
then PPO with it as the reward and as the critic's initialisation (real vLLM, real Lightning, the tiny model)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from vapo_pl.demo.preferences import pairs
from vapo_pl.demo.task import DATA_DIR, read_split


@pytest.fixture
def pair_files(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pairs(read_split(DATA_DIR / "train.jsonl")[:80], 0)))
    val.write_text("".join(json.dumps(r) + "\n" for r in pairs(read_split(DATA_DIR / "heldout.jsonl")[:30], 1)))
    return train, val


def test_demo_pairs_prefer_the_correct_solution():
    rows = pairs(read_split(DATA_DIR / "heldout.jsonl"), 1)
    assert len(rows) > 100
    for r in rows:
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].rsplit("\\boxed{", 1)[1] != r["rejected"].rsplit("\\boxed{", 1)[1]  # a wrong final answer


def test_bradley_terry_loss_margin_and_centering(tiny_model_dir):
    from vapo_pl.reward_modeling import RewardModelModule

    m = RewardModelModule(model_path=str(tiny_model_dir), center_coef=0.5)
    r_c, r_r, margin = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1.5))) - math.log(1 / (1 + math.exp(3.0)))) / 2 \
        + 0.5 * ((2.5 ** 2) + 0.0) / 2
    assert float(m.loss(r_c, r_r, margin)) == pytest.approx(expected, rel=1e-6)


def test_preference_data_drops_long_pairs_and_names_bad_rows(tiny_model_dir, tmp_path, pair_files):
    from vapo_pl.prompts import DataError
    from vapo_pl.reward_modeling import PreferenceDataModule

    train, _ = pair_files
    n = sum(1 for _ in train.open())
    dm = PreferenceDataModule(train_files=str(train), model_path=str(tiny_model_dir), max_length=40)
    dm.setup("fit")
    assert dm.dropped_pairs > 0 and len(dm.train_pairs) + dm.dropped_pairs == n
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_ids"].shape[0] == batch["rejected_ids"].shape[0] == 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=?", "chosen": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing or empty field 'rejected'"):
        PreferenceDataModule(train_files=str(bad), model_path=str(tiny_model_dir)).setup("fit")


@pytest.mark.vllm
def test_reward_model_then_ppo_with_it(tiny_model_dir, tmp_path, pair_files, monkeypatch, capsys):
    """``vapo-pl-rm fit`` trains and saves a reward model that ``AutoModelForSequenceClassification`` loads; ``vapo-pl
    fit`` then runs PPO with it as the reward and as the critic's initialisation."""
    from transformers import AutoModelForSequenceClassification

    from vapo_pl import cli
    from vapo_pl.reward_modeling import main as rm_main

    monkeypatch.chdir(tmp_path)  # with logger: false, Lightning writes the run's config.yaml into the working directory
    train, val = pair_files
    rm_dir = tmp_path / "rm"
    rm_cfg = tmp_path / "rm.yaml"
    rm_cfg.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_epochs: 1, logger: false, enable_checkpointing: false,
          enable_progress_bar: false, enable_model_summary: false}}
model:
  class_path: vapo_pl.reward_modeling.RewardModelModule
  init_args: {{model_path: {tiny_model_dir}, lr: 1.0e-3, save_dir: {rm_dir}}}
data:
  class_path: vapo_pl.reward_modeling.PreferenceDataModule
  init_args: {{train_files: {train}, val_files: {val}, max_length: 160, batch_size: 16}}
""")
    monkeypatch.setattr(sys, "argv", ["vapo-pl-rm"])
    assert rm_main(["fit", "--config", str(rm_cfg)]) == 0
    out = capsys.readouterr().out
    assert "reward model held-out pairwise accuracy" in out
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    assert rm.config.num_labels == 1

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n"
                               for p in read_split(DATA_DIR / "heldout.jsonl")[:32]))
    ppo_cfg = tmp_path / "ppo.yaml"
    ppo_cfg.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 2, logger: false, enable_checkpointing: false,
          enable_progress_bar: false, enable_model_summary: false}}
model:
  class_path: vapo_pl.VAPOModule
  init_args:
    model_path: {tiny_model_dir}
    critic_init: reward_model
    critic_path: {rm_dir}
    algorithm: {{estimator: gae, nll_coef: 0.0, kl_reward_coef: 0.05, minibatch_size: 8, micro_batch_size: 8}}
data:
  class_path: vapo_pl.RolloutDataModule
  init_args:
    train_files: {prompts}
    max_prompt_length: 48
    max_response_length: 12
    prompts_per_step: 4
    samples_per_prompt: 2
    reward:
      - {{name: reward_model, kwargs: {{path: {rm_dir}}}}}
      - {{name: math_verify, weight: 0.0}}
    engine: {{kind: vllm, dtype: float32}}
""")
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])
    critic_heads = []
    real = cli.VAPOCLI.before_fit

    def spy(self):
        real(self)
        self.model.configure_model()
        critic_heads.append(self.model.critic.value_head.weight.detach().clone())

    monkeypatch.setattr(cli.VAPOCLI, "before_fit", spy)
    run = cli.run(["fit", "--config", str(ppo_cfg)])
    assert run.model.rl_step == 2
    torch.testing.assert_close(critic_heads[0], rm.score.weight.float())  # the critic started as the reward model
    metrics = run.trainer.callback_metrics
    assert "reward/reward_model" in metrics and float(metrics["reward/math_verify"]) == 0.0
