"""Preference pairs from the embedded demo task, for the reward-model example (``configs/rm_demo.yaml``).

For every problem with at least one carry, the chosen response is its correct worked solution and the rejected one
the same solution with one or more carries forgotten (the demonstrator's slip, so a wrong final answer): a
preference a reward model can only learn by checking the arithmetic. Train pairs come from the training
problems, held-out pairs from the held-out problems; the seed fixes which carries are dropped.

    python -m vapo_pl.demo.preferences            # writes .cache/demo/prefs/{train,heldout}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from vapo_pl.demo.task import DATA_DIR, read_split

OUT = Path(".cache/demo/prefs")


def pairs(problems, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for p in problems:
        carries = p.carries
        if not carries:
            continue
        k = rng.randint(1, len(carries))
        forgotten = tuple(sorted(rng.sample(carries, k)))
        out.append({"prompt": p.prompt, "chosen": p.solution(), "rejected": p.solution(forgotten)})
    return out


def write(out_dir: str | Path = OUT, seed: int = 0) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split in (("train", "train.jsonl"), ("heldout", "heldout.jsonl")):
        rows = pairs(read_split(DATA_DIR / split), seed + (name == "heldout"))
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train, heldout = write(a.out, a.seed)
    print(f"{sum(1 for _ in train.open())} train pairs -> {train}, {sum(1 for _ in heldout.open())} held-out -> {heldout}")
