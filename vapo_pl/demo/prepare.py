"""Build (or find) a demo base policy and point ``<cache>/<link>`` at it, the path the demo configs name.

python -m vapo_pl.demo.prepare               # the demo task: .cache/demo/base (configs/demo.yaml)
python -m vapo_pl.demo.prepare --task long   # the long task: .cache/demo/base-long (configs/demo_long.yaml)
python -m vapo_pl.demo.prepare --task tools  # the calculator task: .cache/demo/base-tools (configs/demo_tools.yaml)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vapo_pl.demo.base_policy import BaseSpec, default_cache_dir, ensure_base_policy

LINKS = {"demo": "base", "long": "base-long", "tools": "base-tools"}


def task_spec(name: str) -> BaseSpec:
    if name == "demo":
        return BaseSpec()
    if name == "long":
        from vapo_pl.demo.long import BASE

        return BASE
    if name == "tools":
        from vapo_pl.demo.tools import ToolSpec

        return ToolSpec().base
    raise ValueError(f"task must be one of {', '.join(LINKS)}, got {name!r}")


def prepare(cache_dir: str | Path | None = None, task: str = "demo") -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.time()
    if task == "tools":
        from vapo_pl.demo.tools import ensure_tool_policy

        path = ensure_tool_policy(cache, verbose=True)
    else:
        path = ensure_base_policy(cache, task_spec(task), verbose=True)
    link = cache / LINKS[task]
    if link.is_symlink() and link.resolve() == path.resolve():
        print(f"base policy: {path} (cached, {time.time() - t0:.1f} s)", flush=True)
        return link
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is not a symlink; move it away so it can point at {path.name}")
    tmp = cache / f".{link.name}-link-{os.getpid()}"
    tmp.symlink_to(path.name)
    tmp.replace(link)  # atomic: a reader sees the old or the new target, never none
    print(f"base policy: {path} ready in {time.time() - t0:.1f} s", flush=True)
    return link


def policy_dir(path: str | Path | None, task: str = "demo") -> Path:
    """``path`` if given, else the task's base policy (built if needed): the ``--policy`` default of benchmarks."""
    return Path(path) if path is not None else prepare(task=task)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Build (or find) a demo base policy.")
    ap.add_argument("--task", choices=sorted(LINKS), default="demo")
    prepare(task=ap.parse_args().task)
