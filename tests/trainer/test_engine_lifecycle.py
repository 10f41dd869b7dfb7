"""The DataModule is the engine's one owner: no generate call ever reaches a sleeping engine.

vLLM's sleep mode needs CUDA, so on these CPU machines a real engine's ``sleep()`` does nothing and cannot
show the fault. ``RecordingEngine`` is therefore a fake *around a real engine*: it generates with a real
transformers engine, but keeps vLLM's sleep state machine (level-1 sleep releases weights and KV cache;
``update_weights`` on a sleeping engine wakes only the weights; ``wake_up`` brings back the rest) and raises
when ``generate`` is called while any part sleeps. Every path that generates is run through real Lightning
fits: value pretraining, RL steps, evaluation, dynamic sampling, ReMax greedy baselines, and a resume.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import lightning.pytorch as pl
import pytest
from vapo_pl.callbacks.evaluation import Evaluation
from vapo_pl.callbacks.value_pretraining import ValuePretraining

from vapo_pl.rewards.base import RewardTerm
from vapo_pl.rollout.base import RolloutEngine
from vapo_pl.rollout.hf_engine import HFEngine


class GenerateWhileAsleep(AssertionError):
    pass


class RecordingEngine(RolloutEngine):
    def __init__(self, model_dir: str) -> None:
        self.inner = HFEngine(model_dir, dtype="float32")
        self.weights_asleep = self.kv_asleep = False
        self.events: list[str] = []

    def generate(self, prompt_token_ids, sampling):
        state = "asleep" if (self.weights_asleep or self.kv_asleep) else "awake"
        self.events.append(f"generate:{state}")
        if state == "asleep":
            raise GenerateWhileAsleep(f"generate on a sleeping engine (weights asleep: {self.weights_asleep}, "
                                      f"KV cache asleep: {self.kv_asleep}); events: {self.events[-6:]}")
        return self.inner.generate(prompt_token_ids, sampling)

    def update_weights(self, weights: Iterable) -> None:
        self.events.append("update")
        self.weights_asleep = False  # vLLM: wake_up(tags=["weights"]) before loading, the KV cache stays released
        self.inner.update_weights(weights)

    def sleep(self) -> None:
        self.events.append("sleep")
        self.weights_asleep = self.kv_asleep = True

    def wake_up(self) -> None:
        self.events.append("wake")
        self.weights_asleep = self.kv_asleep = False


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}*2=?", "answer": str(2 * i)}) + "\n" for i in range(6)))
    return str(path)


def _fit(make_run, tiny_model_dir, val_file, algorithm, data, callbacks, trainer=None, ckpt_path=None):
    module, dm, tr = make_run(algorithm=algorithm, data={"val_files": val_file, **data},
                              trainer={"callbacks": callbacks, **(trainer or {})})
    engine = RecordingEngine(str(tiny_model_dir))
    dm.attach_engine(engine)
    tr.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return engine, module


def test_vapo_with_pretraining_evaluation_dynamic_sampling_and_resume(make_run, tiny_model_dir, val_file, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    cbs = lambda: [ValuePretraining(steps=2), Evaluation(every_n_steps=1, samples_per_prompt=2),  # noqa: E731
                   pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1, save_top_k=-1)]
    data = {"dynamic_sampling": True, "max_sampling_rounds": 2,
            "reward": [RewardTerm(name="tests.trainer.task_rewards.coin")]}
    engine, module = _fit(make_run, tiny_model_dir, val_file, {"estimator": "gae"}, data, cbs(),
                          trainer={"enable_checkpointing": True})
    ev = engine.events
    assert "generate:asleep" not in ev and module.rl_step == 2
    # the fake did sleep between pretraining steps, RL steps and evaluations, and each time was woken
    assert ev.count("sleep") >= 2 + 2 + 3 and ev.count("wake") >= ev.count("sleep") - 1
    # the first thing the engine saw was the trainer's weights, before any generate call
    assert ev[0] == "update"

    last = sorted(ckpt_dir.glob("*.ckpt"))[-1]
    engine, module = _fit(make_run, tiny_model_dir, val_file, {"estimator": "gae"}, data, cbs(),
                          trainer={"enable_checkpointing": True, "max_steps": 3}, ckpt_path=str(last))
    assert module.rl_step == 3 and "generate:asleep" not in engine.events
    assert engine.events[0] == "update" and engine.events.count("sleep") >= 2


def test_remax_greedy_baselines_and_evaluation(make_run, tiny_model_dir, val_file):
    engine, module = _fit(make_run, tiny_model_dir, val_file, {"estimator": "remax"}, {},
                          [Evaluation(every_n_steps=1, samples_per_prompt=2)])
    ev = engine.events
    assert "generate:asleep" not in ev and module.rl_step == 2
    # ReMax: a sampled and a greedy generate per step, both while awake; evaluation sleeps afterwards too
    assert ev.count("generate:awake") >= 2 * 2 + 3 and ev.count("sleep") >= 2 + 3


def test_the_fake_catches_a_generate_on_a_sleeping_engine(tiny_model_dir):
    """The recorder can fail: a sleep with no wake before generate raises."""
    from vapo_pl.rollout.base import Sampling

    engine = RecordingEngine(str(tiny_model_dir))
    engine.sleep()
    with pytest.raises(GenerateWhileAsleep):
        engine.generate([[1, 2, 3]], Sampling(n=1, temperature=0.0, max_tokens=2))
    engine.update_weights(engine.inner.model.state_dict().items())  # weights only: the KV cache still sleeps
    with pytest.raises(GenerateWhileAsleep):
        engine.generate([[1, 2, 3]], Sampling(n=1, temperature=0.0, max_tokens=2))


class LosesWeightsEngine(RecordingEngine):
    """vLLM's sleep level 2 (``engine.sleep_level: 2``, the default): a sleep discards the weights, and a generate
    call before new weights arrive would run on garbage. The fake raises then instead."""

    def sleep(self) -> None:
        super().sleep()
        self.weights_lost = True

    def update_weights(self, weights: Iterable) -> None:
        super().update_weights(weights)
        self.weights_lost = False

    def generate(self, prompt_token_ids, sampling):
        if self.weights_lost:
            raise GenerateWhileAsleep(f"generate after the weights were discarded; events: {self.events[-6:]}")
        return super().generate(prompt_token_ids, sampling)


def test_level_two_sleep_gets_the_weights_back_before_every_generate(make_run, tiny_model_dir, val_file):
    """Value pretraining, RL steps and evaluations each sleep the engine; after a level-2 sleep the DataModule
    sends the actor's weights again (the current version) before the next generate call."""
    module, dm, tr = make_run(algorithm={"estimator": "gae"}, data={"val_files": val_file},
                              trainer={"callbacks": [ValuePretraining(steps=2),
                                                     Evaluation(every_n_steps=1, samples_per_prompt=2)]})
    engine = LosesWeightsEngine(str(tiny_model_dir))
    dm.attach_engine(engine)
    tr.fit(module, datamodule=dm)
    ev = engine.events
    assert module.rl_step == 2 and "generate:asleep" not in ev
    # every generate that follows a sleep has an update between them
    last_sleep = None
    for i, e in enumerate(ev):
        if e == "sleep":
            last_sleep = i
        elif e.startswith("generate") and last_sleep is not None:
            assert "update" in ev[last_sleep:i], ev[last_sleep: i + 1]
            last_sleep = None
    assert dm.weight_version == module.policy_version == 2  # the re-sends keep the version


def test_the_level_two_fake_fails_without_a_resend(tiny_model_dir):
    from vapo_pl.rollout.base import Sampling

    engine = LosesWeightsEngine(str(tiny_model_dir))
    engine.sleep()
    engine.wake_up()
    with pytest.raises(GenerateWhileAsleep):
        engine.generate([[1, 2, 3]], Sampling(n=1, temperature=0.0, max_tokens=2))
