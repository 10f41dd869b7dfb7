"""Prompt sources: jsonl, parquet or a local ``datasets`` directory, validated row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset problem, reported in one line that names the file, the row and the field."""


@dataclass
class PromptRecord:
    """One training or evaluation problem."""

    prompt: str  # the raw question, before templating
    answer: str | None  # gold answer (None for unlabeled data, e.g. TTRL)
    source: str  # "<file>:<line>" for error messages and per-source metrics
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of the row
    rendered: str | None = None  # the prompt as the policy sees it (set when the DataModule tokenises it)


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; location is ``file:line`` (1-based) or ``dir[row]``."""
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001  (datasets raises many types for a wrong directory)
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({_first_line(e)})") from None
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take "train"
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow.ArrowInvalid and friends)
            raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
        return [(f"{path}[{i}]", r) for i, r in enumerate(table.to_pylist())]
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                        from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append((f"{path}:{lineno}", row))
        return rows
    raise DataError(f"{path}: unsupported prompt file type {path.suffix!r} (use .jsonl, .parquet or a dataset dir)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _answer_text(value: Any, answer_regex_after: str | None) -> str:
    text = str(value).strip()
    if answer_regex_after and answer_regex_after in text:  # e.g. GSM8K keeps the final number after "####"
        text = text.rsplit(answer_regex_after, 1)[1].strip()
    return text


def load_prompts(
    paths: str | list[str],
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    answer_after: str | None = None,
) -> list[PromptRecord]:
    """Read every row of ``paths``; a row without ``prompt_key`` (or ``answer_key`` when set) fails naming
    file, line and field. An empty result fails too."""
    records: list[PromptRecord] = []
    for p in [paths] if isinstance(paths, str) else paths:
        path = Path(p)
        if not path.exists():
            raise DataError(f"prompt file {path} does not exist")
        for loc, row in _read_rows(path):
            prompt = row.get(prompt_key)
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{loc}: missing or empty field {prompt_key!r}")
            answer = None
            if answer_key is not None:
                if answer_key not in row or row[answer_key] is None or str(row[answer_key]).strip() == "":
                    raise DataError(f"{loc}: missing or empty field {answer_key!r}")
                answer = _answer_text(row[answer_key], answer_after)
            extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
            records.append(PromptRecord(prompt=prompt, answer=answer, source=loc, extra=extra))
    if not records:
        raise DataError(f"no prompts found in {paths}")
    return records


def render_prompt(tokenizer, question: str, template: str) -> str:
    """``template`` is "chat" (the tokenizer's chat template, one user turn) or a plain format string
    with a ``{prompt}`` field, e.g. "Question: {prompt}\\nAnswer:"."""
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return template.format(prompt=question)


def render_conversation(tokenizer, question: str, response: str, template: str = "chat") -> str:
    """The text a reward model reads for one (question, response): with ``template == "chat"`` the tokenizer's chat
    template over a user and an assistant turn; otherwise ``template.format(prompt=question) + response``. Reward
    training (``PreferenceDataModule``) and scoring (the ``reward_model`` reward) both use it."""
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": response}], tokenize=False)
    return template.format(prompt=question) + response
