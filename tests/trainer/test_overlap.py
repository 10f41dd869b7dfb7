"""Overlapped rollouts (``data.max_staleness: 1``): the engine in its own process, batches generated one step ahead
and trained on one weight version old, checkpoints holding the batch generated ahead, and resume bit for bit.
Real vLLM (in a child process), real Lightning checkpoints."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.trainer.test_module import Recorder

pytestmark = pytest.mark.vllm

OVERLAP = dict(algorithm={"estimator": "grpo", "rollout_correction": "token_tis"}, data={"max_staleness": 1},
               engine="vllm")
KEYS = ("actor/pg_loss", "actor/nll_loss", "rollout/reward_mean", "actor/grad_norm", "mismatch/kl_k3",
        "rollout_correction/weight_mean")


def test_process_engine_matches_the_in_process_engine(tiny_model_dir):
    """Same seed, same weights: the engine in a child process gives the in-process engine's tokens and log-probs,
    before and after a weight sync (streamed in several buckets); a child that dies is reported, not waited on."""
    from vapo_pl.rollout.base import Sampling
    from vapo_pl.rollout.config import EngineConfig
    from vapo_pl.rollout.process_engine import ProcessEngine
    from vapo_pl.rollout.vllm_engine import VLLMEngine

    cfg = EngineConfig(kind="vllm", dtype="float32", max_model_len=64)
    local = VLLMEngine(tiny_model_dir, cfg, seed=3)
    remote = ProcessEngine(str(tiny_model_dir), cfg, seed=3, bucket_bytes=64 * 1024)
    try:
        prompts, sampling = [[5, 6, 7], [8, 9]], Sampling(n=3, temperature=1.0, max_tokens=8, seed=11)
        assert remote.generate(prompts, sampling) == local.generate(prompts, sampling)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
        state = model.state_dict()
        assert sum(t.numel() * 4 for t in state.values()) > 4 * 64 * 1024  # several buckets
        before = local.generate(prompts, sampling)
        local.update_weights(state.items())
        remote.update_weights(state.items())
        after = remote.generate(prompts, sampling)
        assert after == local.generate(prompts, sampling) and after != before
        assert remote.version == 1
        remote._proc.kill()
        remote._proc.join()
        with pytest.raises(RuntimeError, match="engine process died"):
            remote.generate(prompts, sampling)
    finally:
        remote.close()


def test_overlapped_run_needs_a_correction_and_one_device(make_run):
    module, dm, trainer = make_run(algorithm={"estimator": "grpo"}, data={"max_staleness": 1}, engine="vllm")
    with pytest.raises(ValueError, match="rollout_correction"):
        trainer.fit(module, dm)
    with pytest.raises(ValueError, match="max_staleness must be 0"):
        make_run(data={"max_staleness": 2})
    with pytest.raises(ValueError, match="engine.kind: vllm"):
        make_run(data={"max_staleness": 1}, engine="hf")


class Spans(pl.Callback):
    """When each generate call and each update ran (``time.perf_counter`` intervals)."""

    def __init__(self):
        self.generate, self.update = [], []

    def on_train_start(self, trainer, pl_module):
        def timed(fn, into):
            def call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    into.append((t0, time.perf_counter()))
            return call

        engine = trainer.datamodule.engine
        engine.generate = timed(engine.generate, self.generate)
        pl_module.update = timed(pl_module.update, self.update)


def test_overlapped_run_trains_one_version_old_and_resumes_bit_identical(make_run, tmp_path):
    """One uninterrupted 4-step run with a checkpoint at step 2: the first batch is generated at the first step, every
    later one during the previous step's update (its generation starts before that update ends) and trained one
    weight version after the one that drew it; the checkpoint holds the batch generated ahead. A resume from it to
    step 4 gives the same metrics, versions and final weights, bit for bit."""
    straight, spans = Recorder(), Spans()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1,
                           filename="step{step}", auto_insert_metric_name=False)
    module, dm, trainer = make_run(**OVERLAP, trainer=dict(max_steps=4, callbacks=[straight, spans, ckpt],
                                                           enable_checkpointing=True))
    trainer.fit(module, dm)
    final = {k: v.clone() for k, v in module.actor.state_dict().items()}
    assert [m["rollout/staleness"] for m in straight.metrics] == [0.0, 1.0, 1.0, 1.0]
    assert [v for v, _ in straight.versions] == [0, 0, 1, 2]  # the weight version that drew each trained batch
    assert len(spans.generate) == 5 and len(spans.update) == 4  # one batch at step 1, then one ahead at each step
    for k in range(3):  # batch k + 2 started generating before update k + 1 ended (on-policy: after its sync)
        assert spans.generate[k + 1][0] < spans.update[k][1]
    assert dm._engine is None  # teardown stopped the engine's process

    step2 = tmp_path / "ckpt" / "step2.ckpt"
    state = torch.load(step2, weights_only=True)
    assert state["global_step"] == 2
    ahead = state["RolloutDataModule"]["ahead"]
    assert ahead["weight_version"] == 1 and ahead["input_ids"].shape[0] == 16  # the third batch, drawn during step 2

    resumed = Recorder()
    module, dm, trainer = make_run(**OVERLAP, trainer=dict(max_steps=4, callbacks=[resumed]))
    trainer.fit(module, dm, ckpt_path=str(step2))
    assert [[m[k] for k in KEYS] for m in resumed.metrics] == [[m[k] for k in KEYS] for m in straight.metrics[2:]]
    assert [v for v, _ in resumed.versions] == [v for v, _ in straight.versions[2:]]
    for k, v in module.actor.state_dict().items():
        assert torch.equal(v, final[k]), k
