"""Kill -9 and SIGTERM against real ``vapo-pl fit`` processes (real vLLM, real checkpoints, real TensorBoard files).

One unbroken 5-step run is the reference. A second run is stopped three times and resumed each time with
``--ckpt_path last``: SIGKILL in the middle of a checkpoint write (``_slow_checkpoint_cli`` holds each write open for
a few seconds; the write itself is unchanged), SIGTERM after step 2's checkpoint (it saves and exits with 143), and
SIGKILL at a random moment once step 4's checkpoint write has begun. It must end with the reference's metrics, value for value, and
TensorBoard must hold every step once, in one version directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SLOW_CLI = [sys.executable, "-m", "tests.faults._slow_checkpoint_cli"]
CLI = [sys.executable, "-m", "vapo_pl.cli"]
SLOW_WRITE_S = 1.5  # how long _slow_checkpoint_cli holds each checkpoint write open
VOLATILE = ("perf/", "rollout/dropped")  # wall-clock timings differ between any two runs


def _config(root: Path, model: Path, prompts: Path) -> Path:
    cfg = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 5
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root / 'tb'}, name: run}}
  callbacks:
    - class_path: vapo_pl.callbacks.ValuePretraining
      init_args: {{steps: 2}}
    - class_path: vapo_pl.callbacks.Evaluation
      init_args: {{every_n_steps: 2, samples_per_prompt: 2, max_problems: 4}}
    - class_path: vapo_pl.callbacks.EntropyTracker
    - class_path: vapo_pl.callbacks.LengthScaling
      init_args: {{window: 3}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root / 'ckpt'}, every_n_train_steps: 1, save_top_k: -1, save_last: link}}
model:
  class_path: vapo_pl.VAPOModule
  init_args:
    model_path: {model}
    algorithm: {{minibatch_size: 8, micro_batch_size: 8}}
    optim: {{actor_lr: 1.0e-3, critic_lr: 1.0e-3}}
data:
  class_path: vapo_pl.RolloutDataModule
  init_args:
    train_files: {prompts}
    val_files: {prompts}
    max_prompt_length: 32
    max_response_length: 12
    prompts_per_step: 4
    samples_per_prompt: 2
    engine: {{kind: vllm, dtype: float32}}
    reward: [{{name: tests.trainer.task_rewards.ones_share}}]
"""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(cfg)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), VAPO_PL_TEST_SLOW_CKPT_S=str(SLOW_WRITE_S))
    return env


def _start(cmd: list[str], config: Path, *extra: str) -> subprocess.Popen:
    log = open(config.parent / f"run-{time.monotonic_ns()}.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen([*cmd, "fit", "--config", str(config), *extra], cwd=REPO, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    return proc.wait(timeout=timeout)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the awaited moment")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(poll)


def _scalars(root: Path) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(p.name for p in (root / "tb" / "run").iterdir() if p.is_dir())
    acc = EventAccumulator(str(root / "tb" / "run" / versions[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    out = {tag: [(e.step, "nan" if e.value != e.value else e.value) for e in acc.Scalars(tag)]
           for tag in acc.Tags()["scalars"]
           if not tag.startswith(VOLATILE) and "peak_rss" not in tag}
    return versions, out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("faults")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=?", "answer": str(i + i % 7)}) + "\n"
                               for i in range(64)))
    ref = _config(base / "reference", tiny_model_dir, prompts)
    assert _finish(_start(CLI, ref)) == 0, (ref.parent / "run.log")
    versions, scalars = _scalars(ref.parent)
    assert versions == ["version_0"] and scalars["rollout/reward_mean"][-1][0] == 5
    return base, prompts, tiny_model_dir, scalars


def _assert_same_as_reference(root: Path, reference: dict) -> None:
    versions, got = _scalars(root)
    assert versions == ["version_0"], f"resumed into a new TensorBoard version: {versions}"
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: steps logged twice: {steps}"
    assert set(got) == set(reference)
    for tag, points in reference.items():
        assert got[tag] == points, tag  # bit-identical values at the same steps


def _new_run(setup, name: str) -> tuple[Path, Path, Path, dict]:
    """(run dir, config, checkpoint dir, reference scalars) for a run named ``name`` of the shared workload."""
    base, prompts, model, reference = setup
    root = base / name
    return root, _config(root, model, prompts), root / "ckpt", reference


def test_kill_9_mid_write_sigterm_and_kill_9_mid_step_resume_to_the_same_run(setup):
    root, config, ckpt, reference = _new_run(setup, "killed")

    # 1. SIGKILL while step 2's checkpoint is being written: its staging file is complete, the rename is pending
    proc = _start(SLOW_CLI, config)
    _wait_for(lambda: any(ckpt.glob("epoch=*step=1.ckpt")) and any(ckpt.glob(".*step=2.ckpt.*.partial")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(ckpt.glob(".*.partial")) and not any(ckpt.glob("*step=2.ckpt"))

    # 2. resume from "last" (= step 1), then SIGTERM once step 2's checkpoint is written: the run saves at the next
    # step boundary and exits with 143, promptly
    proc = _start(SLOW_CLI, config, "--ckpt_path", "last")
    _wait_for(lambda: any(ckpt.glob("epoch=*step=2.ckpt")), proc)
    assert not any(ckpt.glob(".*step=2.ckpt.*.partial")), "the unfinished write of the killed run was not removed"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = _finish(proc, timeout=120)
    took = time.monotonic() - t0
    assert code == 143, f"exit code {code}"
    assert took < 30, f"SIGTERM took {took:.1f} s to stop the run"
    saved = sorted(ckpt.glob("sigterm-step=*.ckpt"))
    assert len(saved) == 1 and saved[0].name in ("sigterm-step=2.ckpt", "sigterm-step=3.ckpt"), saved

    # 3. resume from "last" (the SIGTERM checkpoint), then SIGKILL at a random moment once step 4's checkpoint write
    # has begun and before step 5 can have finished (its write is held open as long): mid-write or mid-step 5
    proc = _start(SLOW_CLI, config, "--ckpt_path", "last")
    _wait_for(lambda: any(ckpt.glob(".*step=4.ckpt.*.partial")), proc)
    time.sleep(random.Random(0).uniform(0.0, 2 * SLOW_WRITE_S))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 4. resume again and finish
    proc = _start(CLI, config, "--ckpt_path", "last")
    assert _finish(proc) == 0
    assert not any(ckpt.glob(".*.partial"))
    assert (ckpt / "last.ckpt").resolve().name.endswith("step=5.ckpt")
    _assert_same_as_reference(root, reference)


def test_nan_rewards_from_step_3_skip_keep_checkpoints_finite_then_stop_in_one_line(setup):
    """NaN through the ``token_rewards`` hook from RL step 3 on (a module subclass, ``tests/faults/_modules.py``):
    steps 3 and 4 are skipped and reported, their checkpoints hold the finite weights of step 2, and the third skip
    in a row (step 5) stops the run: exit code 1, the last stderr line says why, no traceback."""
    import torch

    root, config, _, _ = _new_run(setup, "nan")
    proc = _start(CLI, config, "--model.class_path", "tests.faults._modules.NaNRewards",
                  "--model.init_args.nan_from_step", "3", "--trainer.max_steps", "8")
    assert _finish(proc) == 1
    log = max(root.glob("run-*.log"), key=lambda p: p.stat().st_mtime).read_text()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: stopping: 3 RL steps in a row skipped their update (step 5: token rewards")
    assert "Traceback" not in log
    assert sum("update skipped, token rewards" in ln for ln in lines) == 3
    ckpt = root / "ckpt"
    states = {s: torch.load(next(ckpt.glob(f"*step={s}.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
              for s in (2, 3, 4)}
    assert not list(ckpt.glob("*step=5.ckpt"))
    for s, state in states.items():
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()), s
    for name, t in states[2].items():
        assert torch.equal(t, states[4][name]), f"{name} changed during skipped steps"


def test_validate_with_a_training_checkpoint_evaluates_its_actor(setup):
    """``vapo-pl validate --ckpt_path``: the checkpoint's actor reaches the engine (not model_path's weights), so the
    evaluation at its step reproduces the training run's own evaluation there, value for value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _, _, reference = setup
    root = base / "reference"
    ckpt = next((root / "ckpt").glob("*step=5.ckpt"))
    proc = subprocess.run([*CLI, "validate", "--config", str(root / "config.yaml"), "--ckpt_path", str(ckpt)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(ln.startswith("held-out 'heldout' at step 5:") for ln in proc.stdout.splitlines())
    version = max((root / "tb" / "run").iterdir())
    acc = EventAccumulator(str(version))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("eval/heldout_mean@2")}
    assert got == {5: dict(reference["eval/heldout_mean@2"])[5]}
