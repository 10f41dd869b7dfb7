"""The distribution installs the top-level ``callbacks/`` folder as ``vapo_pl.callbacks`` and nothing generic."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def _packages_on_disk() -> set[str]:
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vapo_pl").rglob("__init__.py")}
    return found | {"vapo_pl.callbacks"}


def test_wheel_maps_callbacks_into_the_package(tmp_path):
    """Build a real (non-editable) wheel from a copy of the sources and read its file list."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("vapo_pl", "callbacks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    code = ("import sys; from setuptools import build_meta as b; "
            f"print(b.build_wheel({str(out)!r}))")
    built = subprocess.run([sys.executable, "-c", code], cwd=src, check=True, capture_output=True, text=True)
    name = built.stdout.strip().splitlines()[-1]
    assert "would be ignored" not in built.stdout + built.stderr  # setuptools' banner about unlisted data folders
    files = zipfile.ZipFile(out / name).namelist()
    for data in ("vapo_pl/data/gsm8k_test.jsonl", "vapo_pl/data/aime24.jsonl", "vapo_pl/data/README.md",
                 "vapo_pl/demo/data/train.jsonl", "vapo_pl/demo/data/heldout.jsonl"):
        assert data in files, data
    top = {f.split("/")[0] for f in files if not f.startswith("vapo_pl-")}
    assert top == {"vapo_pl"}, f"top-level names besides vapo_pl: {sorted(top - {'vapo_pl'})}"
    for module in ("__init__", "evaluation", "entropy", "length", "samples", "value_pretraining"):
        assert f"vapo_pl/callbacks/{module}.py" in files
    packaged = {"/".join(f.split("/")[:-1]).replace("/", ".") for f in files if f.endswith("/__init__.py")}
    assert packaged == _packages_on_disk(), "pyproject's [tool.setuptools] packages is out of date"


def test_callbacks_import_under_the_package_name():
    import vapo_pl.callbacks as cbs

    assert cbs.Evaluation.__module__ == "vapo_pl.callbacks.evaluation"
    assert set(cbs.__all__) == \
        {"EntropyTracker", "Evaluation", "ExportActor", "LengthScaling", "SampleLogger", "ValuePretraining"}
