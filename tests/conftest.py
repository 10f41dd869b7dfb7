"""Shared fixtures: a tiny Qwen2 model with a character tokenizer, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pin_xdist_worker() -> None:
    """Under ``pytest -n N`` (``make test``) each worker, and every process it starts, keeps to its own share of the
    cores, with as many OpenMP threads as it has cores, vLLM's bound to them: two workers spreading busy-waiting
    OpenMP threads over the same cores stall each other several times over."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    mine = cores[int(worker.removeprefix("gw")) % count::count]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))


_pin_xdist_worker()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2 (hidden 128) saved with ``save_pretrained``."""
    from vapo_pl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """Same as ``tiny_model_dir`` but with tied input/output embeddings."""
    from vapo_pl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied") / "model", seed=1, tie_word_embeddings=True)


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
    from vapo_pl.rewards.base import RewardTerm
    from vapo_pl.rollout.config import EngineConfig

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


@pytest.fixture
def refuse_model_loads(monkeypatch):
    """Loading a policy, a critic or a rollout engine records the call and raises: for tests of what must fail
    (or finish) before any model loads. Returns the list of attempted loads."""
    import transformers

    import vapo_pl.critic
    import vapo_pl.rollout.factory

    calls: list[str] = []

    def refuse(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called before any model may load")

        return load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("AutoModelForCausalLM"))
    monkeypatch.setattr(vapo_pl.critic.ValueModel, "from_pretrained", refuse("ValueModel"))
    monkeypatch.setattr(vapo_pl.rollout.factory, "build_engine", refuse("build_engine"))
    return calls


# The files that take minutes (several processes each), longest first. ``make test`` runs two workers, each taking
# whole files (``--dist loadfile``) in collection order: these start first, so neither worker is left with one of
# them while the other has finished.
LONG_FILES = ("tests/launch/test_launch.py", "tests/faults/test_kill_and_resume.py", "tests/launch/test_lora_launch.py",
              "tests/trainer/test_overlap.py", "tests/distributed/", "tests/test_quiet_run.py")


def pytest_collection_modifyitems(config, items):
    def order(item):
        return next((i for i, prefix in enumerate(LONG_FILES) if item.nodeid.startswith(prefix)), len(LONG_FILES))

    items.sort(key=order)  # stable: the rest keep their order
