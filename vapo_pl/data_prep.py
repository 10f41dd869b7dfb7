"""``vapo-pl data``: a Hugging Face dataset turned into the jsonl files the DataModule reads.

    vapo-pl data gsm8k --out data/gsm8k [--source openai/gsm8k] [--splits train test]

``--source`` is a hub name (``datasets.load_dataset(source, "main")``), a directory written by ``save_to_disk``, or a
directory of ``<split>.jsonl`` / ``<split>.parquet`` files. Each split becomes ``<out>/<split>.jsonl`` with the rows as
GSM8K has them (``question``, ``answer`` ending in ``#### <number>``, and ``idx``), the format of the shipped
``vapo_pl/data/gsm8k_test.jsonl`` (read with ``prompt_key: question``, ``answer_after: "####"``). Every row is checked
first; a bad one stops the command with one line naming the split and row, and nothing is written. Files are written
to a temporary name and renamed, so an interrupted run leaves no half file. Exit status: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A source or row the command cannot use (one line)."""


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars: one line per split on stderr
    datasets.utils.logging.set_verbosity_error()


def _load_split(source: str, split: str) -> list[dict[str, Any]]:
    _quiet_datasets()
    path = Path(source).expanduser()
    if path.is_dir():
        for ext, kind in ((".jsonl", "json"), (".parquet", "parquet")):
            f = path / f"{split}{ext}"
            if f.is_file():
                from datasets import load_dataset

                return list(load_dataset(kind, data_files=str(f), split="train"))
        if (path / "dataset_dict.json").is_file() or (path / split / "dataset_info.json").is_file():
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
            if split not in ds:
                raise DataError(f"--source {source}: no split {split!r} (has {', '.join(ds)})")
            return list(ds[split])
        raise DataError(f"--source {source}: no {split}.jsonl, {split}.parquet or save_to_disk dataset there")
    if path.exists():
        raise DataError(f"--source {source}: not a directory")
    from datasets import load_dataset

    try:
        return list(load_dataset(source, "main", split=split))
    except Exception as e:  # noqa: BLE001 - the hub's errors are long; one line names what failed
        raise DataError(f"--source {source}: could not load split {split!r} from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def gsm8k_rows(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The rows in the shipped format, each checked: a non-empty ``question`` and an ``answer`` with a final number
    after ``####``."""
    out = []
    for i, row in enumerate(rows):
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{split} row {i}: 'question' is missing or empty")
        if not isinstance(a, str) or "####" not in a or not a.rsplit("####", 1)[1].strip():
            raise DataError(f"{split} row {i}: 'answer' has no final answer after '####'")
        out.append({"question": q, "answer": a, "idx": i})
    if not out:
        raise DataError(f"{split}: no rows")
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def prepare_gsm8k(out: str | Path, source: str = "openai/gsm8k", splits: tuple[str, ...] = ("train", "test")
                  ) -> dict[str, int]:
    """Write ``<out>/<split>.jsonl`` for each split; returns the row count per split. Every split is read and
    checked before any file is written."""
    converted = {s: gsm8k_rows(_load_split(source, s), s) for s in splits}
    for split, rows in converted.items():
        _write_jsonl(Path(out) / f"{split}.jsonl", rows)
    return {s: len(r) for s, r in converted.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vapo-pl data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    g = sub.add_parser("gsm8k", help="GSM8K (openai/gsm8k) as jsonl: question, answer (#### number), idx")
    g.add_argument("--out", required=True, help="directory for <split>.jsonl")
    g.add_argument("--source", default="openai/gsm8k",
                   help="hub name, save_to_disk directory, or directory of <split>.jsonl/.parquet files")
    g.add_argument("--splits", nargs="+", default=["train", "test"])
    args = ap.parse_args(argv)
    try:
        counts = prepare_gsm8k(args.out, args.source, tuple(args.splits))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for split, n in counts.items():
        print(f"{Path(args.out) / (split + '.jsonl')}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
