"""Strategy-specific pieces: FSDP2 sharding and gathering full actor weights for the rollout engine."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (``model.layers`` under any prefix)."""
    for name in ("model", "backbone", "transformer"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "layers"):
            return list(inner.layers)
        if inner is not None and hasattr(inner, "model") and hasattr(inner.model, "layers"):
            return list(inner.model.layers)
    if hasattr(model, "layers"):
        return list(model.layers)
    return []


def fully_shard_model(model: nn.Module, mesh) -> None:
    """FSDP2: shard every decoder layer, then the whole model, over the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def full_state_items(model: nn.Module, strategy) -> Iterator[tuple[str, Tensor]]:
    """Full (unsharded) weights with Hugging Face names, on every rank (each rank feeds its own engine)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        return iter(state.items())
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return iter(state.items())
    with torch.no_grad():
        return iter(model.state_dict().items())


def load_full_state(model: nn.Module, state: dict[str, Tensor], strategy) -> None:
    """Load full (unsharded) weights into ``model``, sharded or not."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(state)
