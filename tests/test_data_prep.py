"""``vapo-pl data gsm8k``, run as a user runs it (the console script's module as a subprocess), on local datasets in
the hub's GSM8K format: the hub itself is not reachable from these machines, so ``--source`` is a ``save_to_disk``
directory or a folder of jsonl files built from the shipped GSM8K test rows. The written files load with the
quickstart config's keys; a bad row stops the command in one line and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "vapo_pl" / "data" / "gsm8k_test.jsonl"
QUICKSTART = REPO / "configs" / "quickstart_gsm8k.yaml"


def _rows(n: int, start: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()[start : start + n]]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]  # the hub's columns


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vapo_pl.cli", "data", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def test_from_a_save_to_disk_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    src = tmp_path / "hub_copy"
    DatasetDict({"train": Dataset.from_list(_rows(40, 100)), "test": Dataset.from_list(_rows(12))}).save_to_disk(src)
    out = tmp_path / "gsm8k"
    r = _cli("gsm8k", "--out", str(out), "--source", str(src))
    assert r.returncode == 0, r.stderr
    assert f"{out / 'train.jsonl'}: 40 rows" in r.stdout
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [(t["question"], t["answer"]) for t in train] == [(x["question"], x["answer"]) for x in _rows(40, 100)]
    assert [t["idx"] for t in train] == list(range(40))

    # the quickstart config's own keys read them: question, and the number after "####"
    from vapo_pl.prompts import load_prompts

    cfg = yaml.safe_load(QUICKSTART.read_text())["data"]["init_args"]
    records = load_prompts(str(out / "train.jsonl"), cfg["prompt_key"], cfg["answer_key"], cfg["answer_after"])
    assert len(records) == 40 and records[0].answer == _rows(1, 100)[0]["answer"].rsplit("####", 1)[1].strip()


def test_from_jsonl_files_and_a_bad_row(tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    out = tmp_path / "out"
    assert _cli("gsm8k", "--out", str(out), "--source", str(src), "--splits", "train").returncode == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 5

    bad = _rows(5)
    bad[3]["answer"] = "no final answer here"
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    fresh = tmp_path / "fresh"
    r = _cli("gsm8k", "--out", str(fresh), "--source", str(src), "--splits", "train")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: train row 3: 'answer' has no final answer after '####'"
    assert not fresh.exists()  # nothing written

    r = _cli("gsm8k", "--out", str(fresh), "--source", str(tmp_path / "nowhere" / "x"))
    assert r.returncode == 2 and "could not load split 'train'" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("gpu_gb", [80])
def test_quickstart_memory_plan_fits_one_gpu(gpu_gb):
    """``vapo-pl plan`` on the quickstart config as shipped (its model directory does not exist here: the plan takes
    the architecture from its built-in Qwen2.5 table)."""
    r = subprocess.run([sys.executable, "-m", "vapo_pl.cli", "plan", "--config", str(QUICKSTART), "--gpu-memory-gb",
                        str(gpu_gb)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Qwen2.5-1.5B" in r.stdout and "fits" in r.stdout.lower()
