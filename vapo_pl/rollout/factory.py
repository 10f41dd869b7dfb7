"""Build a rollout engine from an ``EngineConfig``: ``"vllm"`` (vLLM in process) or ``"hf"`` (transformers).

This is the one construction path; ``RolloutDataModule`` calls it when it first needs its engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vapo_pl.common import require_model_dir
from vapo_pl.rollout.base import RolloutEngine
from vapo_pl.rollout.config import ENGINE_KINDS, EngineConfig


def build_engine(config: EngineConfig | str, model_path: str | Path, *, seed: int = 0, rank: int | None = None,
                 local_rank: int | None = None, shared_model: nn.Module | None = None, **overrides: Any
                 ) -> RolloutEngine:
    """The engine ``config`` describes, for the model saved (``save_pretrained``) at ``model_path``.

    ``config`` may be just a kind (``"vllm"``/``"hf"``), with fields given as ``overrides``. ``shared_model``:
    the ``hf`` engine generates with this module (the trainer's actor: no second copy of the weights).
    """
    if isinstance(config, str):
        if config not in ENGINE_KINDS:
            raise ValueError(f"kind: unknown rollout engine {config!r}; choose one of {list(ENGINE_KINDS)}")
        config = EngineConfig(kind=config)
    config = config.with_overrides(**overrides)
    path = require_model_dir(model_path)
    if config.kind == "vllm":
        from vapo_pl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(path, config, seed=seed, rank=rank, local_rank=local_rank)
    from vapo_pl.rollout.hf_engine import HFEngine

    return HFEngine(shared_model if shared_model is not None else path, dtype=config.dtype, seed=seed, rank=rank)
