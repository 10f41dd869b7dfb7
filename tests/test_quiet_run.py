"""A healthy ``vapo-pl fit`` prints a start summary, the RL-step progress bar and the project's own result lines, and
none of the third-party messages catalogued in ``vapo_pl.quiet``; ``--verbose`` shows them again. Each run leaves no
process behind and a complete TensorBoard file. Run as a user runs it: the CLI in a subprocess, the demo config as
shipped plus an overlay (the session's random tiny model, 2 steps, a small evaluation), real vLLM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO
from tests.trainer.test_demo_config import smoke_callbacks
from vapo_pl import quiet

pytestmark = pytest.mark.vllm


def _overlay(tmp_path, tiny_model_dir):
    callbacks = smoke_callbacks("demo.yaml")
    overlay = tmp_path / "smoke.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "callbacks": callbacks,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "tb"), "name": "quiet"}}},
        "model": {"init_args": {"model_path": str(tiny_model_dir)}},
    }))
    return overlay


def _fit(overlay, *extra: str, env: dict | None = None) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("VLLM_LOGGING", quiet.VERBOSE_ENV, "PYTHONWARNINGS"))}
    marker = f"vapo-quiet-test-{uuid.uuid4().hex}"  # every process the CLI starts inherits its environment
    p = subprocess.Popen([sys.executable, "-m", "vapo_pl.cli", "fit", "--config", "configs/demo.yaml", "--config",
                          str(overlay), *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**clean, **(env or {}), "VAPO_PL_TEST_MARKER": marker})
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    # nothing the CLI started (verifier workers, engine children) outlives it
    assert _still_running(marker) == []
    return out + err


def _still_running(marker: str) -> list[str]:
    """The live processes whose environment holds ``marker``: the CLI's verifier workers, engine children."""
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker.encode() in (proc / "environ").read_bytes():  # a zombie has ended
                left.append(proc.name + " " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return left


def _catalogued(text: str) -> list[str]:
    found = [m for m in quiet.VLLM_MESSAGES + quiet.LIGHTNING_INFO if m in text]
    found += [p for p in quiet.PYTHON_WARNINGS if re.search(p, text)]
    found += [s for s in ("LOAD REPORT", "Epoch 0/", "v_num", "UserWarning", "Loading weights:") if s in text]
    return found


def test_a_healthy_run_prints_only_its_own_lines_and_verbose_shows_the_rest(tmp_path, tiny_model_dir):
    overlay = _overlay(tmp_path, tiny_model_dir)
    out = _fit(overlay)
    assert _catalogued(out) == []
    assert "INFO" not in out  # vLLM's start-up INFO lines
    lines = [ln for ln in re.split(r"[\r\n]+", out) if ln.strip()]
    bar = [ln for ln in lines if re.match(r"\s*step \d+/2 ", ln)]
    assert bar and re.match(r"\s*step 2/2 ", bar[-1]) and "reward=" in bar[-1] and "acc=" in bar[-1]
    own = [ln for ln in lines if ln not in bar]
    assert len(own) <= 20, "\n".join(own)
    for start in ("model ", "algorithm ", "run ", "tensorboard ", "checkpoints "):
        assert any(ln.startswith(start) for ln in own), start
    assert "held-out evaluation 'heldout': step 0 -> step 2" in out  # (tqdm may leave it on the bar's line)
    assert "sampler/trainer mismatch over 2 steps" in out
    # the TensorBoard file holds the last step once the process has ended
    acc = EventAccumulator(str(next((tmp_path / "tb" / "quiet").iterdir())), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/heldout_mean@2")][-1] == 2

    loud = _fit(overlay, "--verbose", "--trainer.max_steps", "1")
    assert "INFO" in loud and len(_catalogued(loud)) >= 3  # the filtered lines exist: the filter is what hides them


def test_the_leftover_check_sees_a_process_that_inherited_the_marker():
    """``_still_running`` (the check after each run above) finds a live child that carries the marker."""
    marker = f"vapo-quiet-test-{uuid.uuid4().hex}"
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, "VAPO_PL_TEST_MARKER": marker})
    try:
        assert [ln.split()[0] for ln in _still_running(marker)] == [str(child.pid)]
    finally:
        child.kill()
        child.wait()
    assert _still_running(marker) == []
