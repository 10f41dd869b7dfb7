"""vapo-pl: VAPO and its sibling RL algorithms for reasoning language models, on PyTorch Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["VAPOModule", "RolloutDataModule", "RolloutBatch", "AlgorithmConfig", "OptimConfig", "EngineConfig"]

_LAZY = {
    "VAPOModule": "vapo_pl.module",
    "RolloutDataModule": "vapo_pl.datamodule",
    "EngineConfig": "vapo_pl.rollout.config",
    "RolloutBatch": "vapo_pl.batch",
    "AlgorithmConfig": "vapo_pl.config",
    "OptimConfig": "vapo_pl.config",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that `import vapo_pl.algorithms` does not pay for Lightning and transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vapo_pl' has no attribute {name!r}")
