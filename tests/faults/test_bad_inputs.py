"""The bad-input catalogue, ``docs/bad_inputs.md``: one case per table row, read from the document.

Each case runs ``vapo_pl.cli.main`` in this process on a valid configuration (the tiny model, a vLLM engine that
must never start) with one mistake, and checks: exit code 2, stderr is exactly the documented line, stdout is
empty, no model or engine was loaded, nothing was written to the run's directory, and it took seconds.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "bad_inputs.md"
GOOD = [{"prompt": f"{i}+{i % 7}=?", "answer": str(i + i % 7)} for i in range(16)]


def _rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("case", "---"):
            rows[cells[0]] = (cells[1], cells[2].strip("`"))
    return rows


ROWS = _rows()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _config(tmp: Path, model: Path, train: Path, val: Path, ckpt_dir: str) -> Path:
    cfg = tmp / "run.yaml"
    cfg.write_text(f"""
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp / 'tb'}, name: run}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, every_n_train_steps: 1}}
model:
  class_path: vapo_pl.VAPOModule
  init_args: {{model_path: {model}, algorithm: {{minibatch_size: 8, micro_batch_size: 8}}}}
data:
  class_path: vapo_pl.RolloutDataModule
  init_args:
    train_files: {train}
    val_files: {val}
    max_prompt_length: 32
    max_response_length: 8
    prompts_per_step: 4
    samples_per_prompt: 2
    engine: {{kind: vllm, dtype: float32}}
    reward: [{{name: math_verify}}]
""")
    return cfg


def _setup(case: str, tmp: Path, tiny_model_dir: Path) -> list[str]:
    """The command line of ``case``: the valid configuration plus its one mistake."""
    model, train, val, ckpt_dir, extra = tiny_model_dir, _jsonl(tmp / "train.jsonl", GOOD), None, str(tmp / "ckpt"), []
    val = _jsonl(tmp / "val.jsonl", GOOD[:4])
    bad = tmp / "bad.jsonl"
    (tmp / "afile").write_text("a file, not a directory\n")
    if case == "malformed-json":
        train = _jsonl(bad, [GOOD[0], '{"prompt": "1+1=?", "answer": '])
    elif case == "missing-prompt":
        train = _jsonl(bad, [{"question": "1+1=?", "answer": "2"}])
    elif case == "empty-prompt":
        train = _jsonl(bad, [{"prompt": "  ", "answer": "2"}])
    elif case == "missing-answer":
        val = _jsonl(bad, [{"prompt": "1+1=?"}])
    elif case == "empty-file":
        bad.write_text("")
        train = bad
    elif case == "not-utf8":
        bad.write_bytes(b'{"prompt": "\xff1+1=?", "answer": "2"}\n')
        train = bad
    elif case == "parquet-columns":
        train = _parquet(tmp / "bad.parquet", [{"question": "1+1=?", "answer": "2"}])
    elif case == "parquet-corrupt":
        train = tmp / "bad.parquet"
        train.write_bytes(b"PAR1 but no more")
    elif case == "missing-file":
        extra = ["--data.init_args.train_files", str(tmp / "nope.jsonl")]
    elif case == "prompts-too-long":
        extra = ["--data.init_args.max_prompt_length", "2"]
    elif case == "ckpt-dir-under-file":
        ckpt_dir = str(tmp / "afile" / "ckpt")
    elif case in ("no-config-json", "no-tokenizer"):
        model = tmp / "model"
        shutil.copytree(tiny_model_dir, model)
        doomed = ["config.json"] if case == "no-config-json" else \
            [p.name for p in model.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens", "chat_"))]
        for name in doomed:
            (model / name).unlink()
    elif case == "corrupt-checkpoint":
        (tmp / "bad.ckpt").write_bytes(b"\x9c" + b"garbage" * 64)
        extra = ["--ckpt_path", str(tmp / "bad.ckpt")]
    else:  # the rows whose input is a command-line override, written in the table's input column
        given = re.search(r"`([^`]+)`", ROWS[case][0]).group(1).replace("{tmp}", str(tmp))
        extra = given.split(" ", 1)
    return ["fit", "--config", str(_config(tmp, model, train, val, ckpt_dir)), *extra]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(ROWS))
def test_bad_input_fails_in_one_line_before_anything_loads(case, tmp_path, tiny_model_dir, monkeypatch, capfd,
                                                          refuse_model_loads):
    from vapo_pl.cli import main

    loaded = refuse_model_loads
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])
    monkeypatch.chdir(tmp_path)
    args = _setup(case, tmp_path, tiny_model_dir)
    before = _tree(tmp_path)
    capfd.readouterr()
    t0 = time.perf_counter()
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    took = time.perf_counter() - t0
    out, err = capfd.readouterr()
    expected = ROWS[case][1].replace("{tmp}", str(tmp_path))
    assert code == 2, err
    assert err.splitlines() == [expected]
    assert out == ""
    assert loaded == []
    assert _tree(tmp_path) == before, "the failed run wrote files"
    assert took < 30, f"{took:.1f} s"


def test_the_catalogue_has_every_kind_of_bad_input():
    """Bad file, bad value, bad directory, bad model directory, bad checkpoint: each kind has rows."""
    kinds = {"file": ("malformed-json", "not-utf8", "parquet-columns", "empty-file"),
             "value": ("eps-low", "unknown-option", "wrong-type"),
             "directory": ("log-dir-under-file", "ckpt-dir-under-file"),
             "model": ("no-model-dir", "no-tokenizer"),
             "checkpoint": ("missing-checkpoint", "corrupt-checkpoint")}
    for kind, cases in kinds.items():
        assert set(cases) <= set(ROWS), kind


@pytest.mark.parametrize(("module", "line"), [
    ("LongPrompts", "error: data.max_prompt_length=32: every training prompt is longer"),
    ("BrokenActor", "error: model.model_path: this actor cannot be built (test)"),
])
def test_an_input_error_found_while_setting_up_is_one_line_and_removes_the_new_log_dir(tmp_path, tiny_model_dir,
                                                                                       monkeypatch, capfd, module,
                                                                                       line):
    """What the parse-time checks cannot see fails while the trainer sets up, before training starts: a module's own
    ``build_prompt`` that makes every prompt too long (the DataModule's setup), or an actor that cannot be built
    (after Lightning has written the run's config into the new TensorBoard version directory). One ``error:`` line,
    exit 2, no traceback, and no version directory left."""
    import lightning.pytorch.cli

    from vapo_pl.cli import main

    monkeypatch.setattr(sys, "argv", ["vapo-pl"])
    monkeypatch.chdir(tmp_path)
    written = []
    real = lightning.pytorch.cli.SaveConfigCallback.setup

    def spy(self, trainer, pl_module, stage):
        real(self, trainer, pl_module, stage)
        written.append(trainer.log_dir)

    monkeypatch.setattr(lightning.pytorch.cli.SaveConfigCallback, "setup", spy)
    args = _setup("eps-low", tmp_path, tiny_model_dir)[:3]  # the valid configuration
    args += ["--model.class_path", f"tests.faults._modules.{module}"]
    # Library loggers created during an earlier case of this process may still write to that case's captured (now
    # closed) stderr, which logging reports with a traceback of its own: point them at the current one.
    for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    assert code == 2
    assert err.strip().splitlines()[-1] == line
    assert "Traceback" not in err and "Traceback" not in out
    if module == "BrokenActor":
        assert written, "the config was not written: the cleanup would not be exercised"
    run_dir = tmp_path / "tb" / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir())
