"""Trainer fixtures: a prompt file and a factory of (module, datamodule, trainer) on the tiny model."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=?", "answer": str(i + i % 7)}) + "\n"
                            for i in range(64)))
    return str(path)


@pytest.fixture
def make_run(tiny_model_dir, prompt_file, tmp_path):
    """Build a VAPOModule, a RolloutDataModule and a Trainer with small, fast settings."""
    import lightning.pytorch as pl

    from vapo_pl import RolloutDataModule, VAPOModule
    from vapo_pl.config import AlgorithmConfig, OptimConfig
    from vapo_pl.datamodule import EngineConfig
    from vapo_pl.rewards.base import RewardTerm

    def build(algorithm=None, data=None, trainer=None, engine="hf", module_cls=VAPOModule, reward=None):
        algo = dict(minibatch_size=8, micro_batch_size=4)
        algo.update(algorithm or {})
        dkw = dict(train_files=prompt_file, max_prompt_length=32, max_response_length=12, prompts_per_step=4,
                   samples_per_prompt=4, engine=EngineConfig(kind=engine, dtype="float32"), seed=0,
                   reward=[RewardTerm(name=reward or "tests.trainer.task_rewards.ones_share")])
        dkw.update(data or {})
        module = module_cls(model_path=str(tiny_model_dir), algorithm=AlgorithmConfig(**algo),
                            optim=OptimConfig(actor_lr=1e-3, critic_lr=1e-3))
        dm = RolloutDataModule(**dkw)
        tkw = dict(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        tkw.update(trainer or {})
        return module, dm, pl.Trainer(**tkw)

    return build
