"""Build a rollout engine by name: ``"vllm"`` (vLLM in process) or ``"hf"`` (transformers ``generate``).

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vapo_pl.common import derive_seed, require_model_dir  # noqa: F401  (re-exported)
from vapo_pl.rollout.base import RolloutEngine

ENGINE_KINDS = ("vllm", "hf")


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
