"""Build a rollout engine by name: ``"vllm"`` (vLLM in process) or ``"hf"`` (transformers ``generate``).

Also holds the two helpers both engines share: the model-directory check and the seed derivation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vapo_pl.rollout.base import RolloutEngine

ENGINE_KINDS = ("vllm", "hf")


def require_model_dir(model_path: str | Path, field: str = "model_path") -> Path:
    """Return ``model_path`` as a ``Path``, or fail in one line if it is not a directory.

    Checked up front because vLLM and transformers answer a wrong path with a long traceback that
    hides which path was wrong.
    """
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{field}: no model directory at {str(path)!r}")
    return path


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 62-bit seed that depends on every part (e.g. call seed, replica); unrelated for nearby inputs.

    Hashing instead of adding keeps streams apart: ``seed + rank`` for call ``k`` would equal
    ``seed + 1 + (rank - 1)`` for call ``k + 1``. 62 bits leave room to add a request offset and
    stay below ``2**63`` (torch generators take up to ``2**64 - 1``).
    """
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 2


def build_engine(kind: str, model_path: str | Path, **options: Any) -> RolloutEngine:
    """Construct the engine named ``kind`` for the model saved (``save_pretrained``) at ``model_path``.

    ``options`` go to the engine's constructor (see ``VLLMEngine`` and ``HFEngine``).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind: unknown rollout engine {kind!r}; choose one of {list(ENGINE_KINDS)}")
    path = require_model_dir(model_path)
    if kind == "vllm":
        from vapo_pl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(path, **options)
    from vapo_pl.rollout.hf_engine import HFEngine

    return HFEngine(path, **options)
