"""Build (or find) the demo's base policy and point ``<cache>/base`` at it, the path ``configs/demo.yaml`` names.

python -m vapo_pl.demo.prepare
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vapo_pl.demo.base_policy import default_cache_dir, ensure_base_policy


def prepare(cache_dir: str | Path | None = None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.time()
    path = ensure_base_policy(cache, verbose=True)
    link = cache / "base"
    if link.is_symlink() and link.resolve() == path.resolve():
        print(f"base policy: {path} (cached, {time.time() - t0:.1f} s)", flush=True)
        return link
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is not a symlink; move it away so it can point at {path.name}")
    tmp = cache / f".base-link-{os.getpid()}"
    tmp.symlink_to(path.name)
    tmp.replace(link)  # atomic: a reader sees the old or the new target, never none
    print(f"base policy: {path} ready in {time.time() - t0:.1f} s", flush=True)
    return link


if __name__ == "__main__":
    prepare()
