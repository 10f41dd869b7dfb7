"""Every command in the README's code blocks, parsed from the README itself, is run or checked here; a command no
handler knows fails the test, so a new README command needs a check.

- ``vapo-pl fit`` / ``validate`` commands run through ``vapo_pl.cli.main`` (what the ``vapo-pl`` script calls) with
  ``--print_config`` added: the merged config must print. GPU configs can only get that far on these machines; the
  CPU demo's training itself runs in ``tests/trainer/test_demo_config.py`` and ``tests/test_quiet_run.py``, and the
  2-process commands in ``tests/launch/test_launch.py`` (Lightning's launcher and ``torchrun``, every strategy).
- ``vapo-pl plan`` runs as written; ``vapo-pl data gsm8k`` runs as written with the hub unreachable (here it must fail
  in one line naming the hub load) and again with ``--source`` a local copy in the hub's format.
- ``make`` targets must exist in the Makefile with the recipes the README describes; ``pip install -e '.[x]'`` must
  name an extra of ``pyproject.toml``; ``huggingface-cli download`` needs the network (not reachable here): its
  repository id must be one the plan's built-in table knows; ``tensorboard`` must be installed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STRATEGIES = sorted(p.stem for p in (REPO / "configs" / "strategies").glob("*.yaml"))


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            cmd = re.split(r"\s{2,}#", line)[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


COMMANDS = readme_commands()


def _main(args: list[str], monkeypatch) -> tuple[int, str]:
    """``vapo-pl <args>`` in this process (``vapo_pl.cli.main``); returns (exit code, stdout + stderr)."""
    from vapo_pl import quiet
    from vapo_pl.cli import main

    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")  # no process-wide log filters from this test process
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue()


def _printed(args: list[str], monkeypatch) -> dict:
    code, out = _main([*args, "--print_config"], monkeypatch)
    assert code == 0, out[-2000:]
    return yaml.safe_load(out[out.index("# lightning.pytorch=="):])


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10 and "make demo" in COMMANDS and "make test" in COMMANDS


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command(cmd, monkeypatch, tmp_path):
    words = cmd.split()
    if words[0] == "make":
        makefile = (REPO / "Makefile").read_text()
        recipe = re.search(rf"^{re.escape(words[1])}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
        assert recipe, f"Makefile has no target {words[1]}"
        body = recipe.group(1)
        if words[1] == "demo":
            assert "vapo_pl.demo.prepare" in body and "vapo-pl fit --config configs/demo.yaml" in body
            _printed(["fit", "--config", "configs/demo.yaml"], monkeypatch)
        else:
            assert "pytest" in body and " tests" in body
    elif words[:3] == ["pip", "install", "-e"]:
        extra = re.fullmatch(r"'?\.\[(\w+)\]'?", words[3]).group(1)
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extra in extras
    elif words[:2] == ["huggingface-cli", "download"]:
        from vapo_pl.memory_plan import _builtin_for

        assert _builtin_for(words[2]) is not None and words[words.index("--local-dir") + 1].endswith(
            words[2].split("/")[1])
    elif words[0] == "tensorboard":
        assert shutil.which("tensorboard", path=str(Path(sys.executable).parent)), "tensorboard is not installed"
    elif words[:3] == ["vapo-pl", "data", "gsm8k"]:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        args = words[1:]
        args[args.index("--out") + 1] = str(tmp_path / "a")  # the README's command, writing under tmp_path
        code, out = _main(args, monkeypatch)
        assert code == 2 and "could not load split 'train' from the hub" in out  # no hub here: one line, no files
        assert not (tmp_path / "a").exists()
        src = tmp_path / "src"
        src.mkdir()
        rows = (REPO / "vapo_pl" / "data" / "gsm8k_test.jsonl").read_text().splitlines()
        (src / "train.jsonl").write_text("\n".join(rows[:20]) + "\n")
        (src / "test.jsonl").write_text("\n".join(rows[20:30]) + "\n")
        code, out = _main(["data", "gsm8k", "--out", str(tmp_path / "b"), "--source", str(src)], monkeypatch)
        assert code == 0 and "20 rows" in out and "10 rows" in out
    elif words[:2] == ["vapo-pl", "plan"]:
        r = subprocess.run([sys.executable, "-m", "vapo_pl.cli", *words[1:]], cwd=REPO, capture_output=True,
                           text=True, timeout=300, check=False)
        assert r.returncode == 0 and "verdict: fits" in r.stdout, r.stdout + r.stderr
    elif words[:2] == ["vapo-pl", "fit"] and "<s>" in cmd:
        for s in STRATEGIES:
            printed = _printed([w.replace("<s>", s) for w in words[1:]], monkeypatch)
            assert str(printed["trainer"]["devices"]) == words[words.index("--trainer.devices") + 1]
    elif words[0] == "torchrun":
        assert words[1:4] == ["--nproc_per_node", "2", "-m"] and words[4:6] == ["vapo_pl.cli", "fit"]
        launch = (REPO / "tests" / "launch" / "test_launch.py").read_text()
        # run there as the README writes it (the torchrun script, 2 processes, the CLI module, a step-2 resume)
        assert '"torchrun"), "--nproc_per_node", str(WORLD)' in launch and "torchrun_resume" in launch
    elif words[0] == "vapo-pl" and words[1] in ("fit", "validate"):
        args = [w for w in words[1:] if w != "--print_config"]
        printed = _printed(args, monkeypatch)
        for w in words[2:]:
            if w.startswith("--model.init_args.algorithm."):
                key, value = w.removeprefix("--model.init_args.algorithm.").split("=")
                assert printed["model"]["init_args"]["algorithm"][key] == float(value)
    else:
        pytest.fail(f"no check for the README command {cmd!r}: add one to {Path(__file__).name}")
