"""GPU-path defects that CPU runs can show: how prompts and seeds are dealt to tensor-parallel engine replicas, which
copies of a batch may be asynchronous, which passes run in the trainer's precision context, and which rank's state a
resume restores.

A tensor-parallel vLLM engine does not run here; the dealing tests stand in the rank of a process group for one
DataModule at a time (``vapo_pl.datamodule.world`` patched) and record what each rank submits to its engine, which is
exactly what vLLM's ``external_launcher`` requires to be identical within a group.
"""

from __future__ import annotations

import json

import pytest
import torch

from vapo_pl import datamodule as dm_module
from vapo_pl.batch import RolloutBatch
from vapo_pl.datamodule import RolloutDataModule
from vapo_pl.rewards.base import RewardTerm
from vapo_pl.rollout.base import Completion, RolloutEngine
from vapo_pl.rollout.config import EngineConfig


class SubmissionRecorder(RolloutEngine):
    """Records every generate call (prompt ids and seed) and answers each prompt with ``n`` one-token completions
    (the dealing, not the text, is under test)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], int | None]] = []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append(([list(p) for p in prompt_token_ids], sampling.seed))
        return [[Completion([1], [-0.5], "stop") for _ in range(sampling.n)] for _ in prompt_token_ids]

    def update_weights(self, weights) -> None:
        pass


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=?", "answer": str(i + 1)}) + "\n" for i in range(40)))
    return str(path)


def _rank_dm(monkeypatch, prompt_file, tiny_model_dir, rank: int, world: int, tp: int) -> RolloutDataModule:
    monkeypatch.setattr(dm_module, "world", lambda: (rank, world))
    dm = RolloutDataModule(train_files=prompt_file, val_files=prompt_file, model_path=str(tiny_model_dir),
                           max_prompt_length=32, max_response_length=4, prompts_per_step=8, samples_per_prompt=2,
                           engine=EngineConfig(kind="vllm", tensor_parallel_size=tp),
                           reward=[RewardTerm(name="tests.trainer.task_rewards.coin")])
    dm.setup("fit")
    dm.attach_engine(SubmissionRecorder())
    return dm


def _run_rank(monkeypatch, prompt_file, tiny_model_dir, rank, world, tp, steps=2):
    dm = _rank_dm(monkeypatch, prompt_file, tiny_model_dir, rank, world, tp)
    kept = []
    for _ in range(steps):
        batch = dm.next_batch()
        kept.append([m["prompt"] for m in batch.metadata])
    return dm.replica_layout(), dm._engine.calls, kept


def test_tensor_parallel_group_submits_the_same_prompts_and_seeds(monkeypatch, prompt_file, tiny_model_dir):
    """World 4, TP 2: ranks 0 and 1 are replica 0, ranks 2 and 3 replica 1. Each rank of a group submits the same
    prompts with the same seed at every call, replicas submit different prompts, and the ranks of a group keep
    complementary halves, so every rank trains on prompts_per_step / world = 2 prompts, none twice."""
    runs = {r: _run_rank(monkeypatch, prompt_file, tiny_model_dir, r, 4, 2) for r in range(4)}
    for a, b in ((0, 1), (2, 3)):
        assert runs[a][1] == runs[b][1]  # identical submissions (prompt ids and seeds), call by call
    replica0 = {tuple(p) for call, _ in runs[0][1] for p in call}
    replica1 = {tuple(p) for call, _ in runs[2][1] for p in call}
    assert not replica0 & replica1
    assert [s for _, s in runs[0][1]] != [s for _, s in runs[2][1]]
    for step in range(2):
        trained = [runs[r][2][step] for r in range(4)]
        assert all(len(set(t)) == 2 and len(t) == 2 * 2 for t in trained)  # 2 prompts x 2 samples per rank
        flat = [p for t in trained for p in dict.fromkeys(t)]
        assert len(flat) == len(set(flat)) == 8  # the step's 8 prompts, each trained by one rank
    assert runs[0][0] == (0, 2, 0, 2) and runs[3][0] == (1, 2, 1, 2)


def test_without_tensor_parallelism_every_rank_is_its_own_replica(monkeypatch, prompt_file, tiny_model_dir):
    runs = {r: _run_rank(monkeypatch, prompt_file, tiny_model_dir, r, 2, 1, steps=1) for r in range(2)}
    assert runs[0][1] != runs[1][1]
    assert not set(runs[0][2][0]) & set(runs[1][2][0])


def test_evaluation_deals_per_replica(monkeypatch, prompt_file, tiny_model_dir):
    """The ``Evaluation`` callback's problems go to replicas; a group's ranks score complementary shares of each
    call, an odd call included (5 problems per replica, 2 per call)."""
    from vapo_pl.rollout.base import Sampling

    got = {}
    for rank in range(2):
        dm = _rank_dm(monkeypatch, prompt_file, tiny_model_dir, rank, 2, 2)
        mine = dm.deal(range(5))
        assert mine == [0, 1, 2, 3, 4]  # one replica: both ranks get all five
        scored = []
        for batch in dm.evaluate(mine, lambda first: Sampling(n=1, temperature=1.0, max_tokens=2, seed=first), 2):
            scored += [m["prompt"] for m in batch.metadata]
        got[rank] = (scored, dm._engine.calls)
    assert got[0][1] == got[1][1]  # same calls, same seeds
    assert sorted(got[0][0] + got[1][0]) == sorted(f"{i}+1=?" for i in range(5))
    assert not set(got[0][0]) & set(got[1][0])


def test_copies_to_the_cpu_are_blocking(monkeypatch):
    """An asynchronous device-to-host copy returns before the data is there; the replay pools read it at once. The
    spy records ``non_blocking`` for every tensor copy of ``RolloutBatch.to``."""
    b = RolloutBatch(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long),
                     response_mask=torch.ones(2, 1, dtype=torch.bool), rollout_logprobs=torch.zeros(2, 1),
                     scores=torch.zeros(2), correct=torch.zeros(2, dtype=torch.bool),
                     lengths=torch.ones(2, dtype=torch.long), truncated=torch.zeros(2, dtype=torch.bool),
                     group_index=torch.zeros(2, dtype=torch.long), weight_version=0,
                     reward_terms={"r": torch.zeros(2)})
    flags = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        flags.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    b.to("cpu")
    assert len(flags) == 10 and not any(flags)


def test_value_pretraining_and_hf_evaluation_run_in_the_precision_context(make_run, tiny_model_dir, tmp_path):
    """Under ``bf16-mixed`` every critic forward (value pretraining's included) and every actor forward (the ``hf``
    engine's evaluation generate included) runs under autocast, not only those inside ``training_step``."""
    from vapo_pl.callbacks import Evaluation, ValuePretraining

    from vapo_pl import VAPOModule

    seen: list[tuple[str, bool]] = []

    class Recording(VAPOModule):
        def build_actor(self):
            actor = super().build_actor()
            actor.register_forward_pre_hook(lambda m, a: seen.append(("actor", torch.is_autocast_enabled("cpu"))))
            return actor

        def build_critic(self):
            critic = super().build_critic()
            critic.register_forward_pre_hook(lambda m, a: seen.append(("critic", torch.is_autocast_enabled("cpu"))))
            return critic

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"{i}*2=?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    module, dm, trainer = make_run(module_cls=Recording, data={"val_files": str(val)}, trainer={
        "precision": "bf16-mixed", "max_steps": 1,
        "callbacks": [ValuePretraining(steps=1), Evaluation(every_n_steps=1, samples_per_prompt=1)]})
    trainer.fit(module, datamodule=dm)
    assert {name for name, _ in seen} == {"actor", "critic"}
    assert all(on for _, on in seen), [i for i, (_, on) in enumerate(seen) if not on][:5]


def test_resume_restores_each_ranks_own_state(make_run, monkeypatch):
    """A checkpoint is written by rank 0 alone; the per-rank parts (critic-replay pool, RNG states) are gathered into
    it and each rank restores its own entry. The 2-rank gather is stood in for here (a real 2-process resume runs in
    ``tests/launch``)."""
    import torch.distributed as dist

    module, _, _ = make_run()
    monkeypatch.setattr(type(module), "_world", property(lambda self: 2))
    from vapo_pl import run_state
    other = torch.get_rng_state().clone()
    other[0] ^= 0xFF

    def gather(out, obj):
        out[0] = obj
        out[1] = {"critic_replay": [], "rng": {"torch": other, "python": obj["rng"]["python"], "cuda": None}}

    monkeypatch.setattr(dist, "all_gather_object", gather)
    states = run_state.gather_rank_states(module)
    assert len(states) == 2 and torch.equal(states[1]["rng"]["torch"], other)
    checkpoint = {"vapo": {"rl_step": 3, "policy_version": 3, "kl_coef": 0.0, "ranks": states}}
    monkeypatch.setattr(type(module), "global_rank", property(lambda self: 1))
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.get_rng_state(), other)


def test_vllm_gets_rank_and_the_trainers_device_while_it_is_built(monkeypatch):
    """vLLM's ``external_launcher`` reads ``RANK`` and ``LOCAL_RANK`` and builds its model on ``cuda:LOCAL_RANK``.
    They come from the trainer (its device index, not its local rank: ``devices=[2, 3]`` puts local rank 0 on
    ``cuda:2``) and are set only while the engine is built."""
    import os
    from types import SimpleNamespace

    from vapo_pl.rollout.vllm_engine import _environment, launch_environment

    dm = RolloutDataModule(train_files="x.jsonl")
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 2)), local_rank=0)
    dm.trainer = trainer  # what Lightning sets on a DataModule it runs
    assert dm._device_index() == 2
    trainer.strategy.root_device = torch.device("cpu")
    trainer.local_rank = 1
    assert dm._device_index() == 1
    assert launch_environment(3, 4, 2) == {"RANK": "3", "LOCAL_RANK": "2", "WORLD_SIZE": "4"}
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with _environment(launch_environment(1, 2, 3)):
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("1", "3")
    assert "RANK" not in os.environ and os.environ["LOCAL_RANK"] == "0"  # Lightning's own value is back
