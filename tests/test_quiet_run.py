"""A healthy ``vapo-pl fit`` prints a start summary, the RL-step progress bar and the project's own result lines, and
none of the third-party messages catalogued in ``vapo_pl.quiet``; ``--verbose`` shows them again. Run as a user runs
it: the CLI in a subprocess, the demo config as shipped plus an overlay (the session's random tiny model, 2 steps,
a small evaluation), real vLLM."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

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
    r = subprocess.run([sys.executable, "-m", "vapo_pl.cli", "fit", "--config", "configs/demo.yaml", "--config",
                        str(overlay), *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**clean, **(env or {})}, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


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

    loud = _fit(overlay, "--verbose", "--trainer.max_steps", "1")
    assert "INFO" in loud and len(_catalogued(loud)) >= 3  # the filtered lines exist: the filter is what hides them
