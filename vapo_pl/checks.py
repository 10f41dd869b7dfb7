"""Early, one-line checks of user-supplied paths."""

from __future__ import annotations

from pathlib import Path


def require_model_dir(path: str | Path | None, field: str) -> str:
    """Return ``path`` if it is a directory holding a Hugging Face ``config.json``; else raise one clear line."""
    if path is None:
        raise ValueError(f"{field} is not set: give a local Hugging Face model directory")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{field}: model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{field}: {p} has no config.json (not a Hugging Face model directory)")
    return str(p)
