"""LoRA adapters for actor and critic (``model.lora``), built with peft.

The adapters are injected into the models in place (``peft.inject_adapter_in_model``): the module tree and every name
outside the adapted projections stay as transformers wrote them, so checkpoints, the strategies' wrapping and the
weight names sent to the engine need no translation layer. Each adapted projection becomes a peft ``LoraLayer`` whose
frozen weight is ``<name>.base_layer.weight`` and whose adapter is ``<name>.lora_A.default.weight`` /
``<name>.lora_B.default.weight``. Only the adapters train (and, in the critic, its value and log-prob heads), so the
optimizer holds only those.

- The reference policy is the actor with its adapters switched off (``adapters_disabled``): no second model.
- Sync to vLLM: ``adapter_items`` (peft's names, a few MB), written as a peft adapter directory that the engine loads
  as a new adapter version (``VLLMEngine.load_adapter``); or, with ``lora.sync: merged``, ``merged_items`` streams
  full weights with the adapter folded in, under the base model's names.
- Export (``run_state.export_actor``): ``adapter_items`` in peft's format, and ``merged_items`` for the merged model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LORA_SYNC = ("adapter", "merged")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


@dataclass(frozen=True)
class LoRAConfig:
    """``model.lora``: rank and alpha (the update is scaled by alpha / rank), dropout on the adapter's input, the
    projections adapted (module names), whether the critic trains adapters too (else it trains fully), and how the
    actor reaches the engine (``adapter``: the adapter alone, as a new adapter version; ``merged``: full weights with
    the adapter folded in, for engines or models without LoRA support)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    critic: bool = True
    sync: str = "adapter"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"model.lora.target_modules must be a non-empty list of module names, got "
                             f"{self.target_modules!r}")
        if self.sync not in LORA_SYNC:
            raise ValueError(f"model.lora.sync must be one of {', '.join(LORA_SYNC)}, got {self.sync!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def add_adapters(model: nn.Module, cfg: LoRAConfig, trainable: tuple[str, ...] = (), seed: int = 0) -> nn.Module:
    """Inject ``cfg``'s adapters into ``model`` in place and freeze every other parameter except those whose name
    starts with one of ``trainable`` (e.g. the critic's heads). A target that matches no module is an error naming
    it. The adapters' random initialisation draws from a generator seeded with ``seed``, not from the global RNG,
    so a run builds the same adapters whatever ran before it (and a resumed run's are overwritten anyway)."""
    from peft import inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(f"model.lora.target_modules: no module named {missing[0]!r} in {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg.peft_config(), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(trainable))
    return model


def init_materialized_adapters(model: nn.Module, seed: int) -> None:
    """Initialise adapters that ``loading.materialize`` allocated empty (FSDP2 builds on the meta device and the base
    checkpoint has no adapter): ``lora_A`` as peft draws it (Kaiming-uniform, a = sqrt(5)) from a generator seeded
    per tensor, each rank copying its own shard of the same full draw; ``lora_B`` zero, so the adapted model starts
    as the base model."""
    import math

    from vapo_pl.loading import _local, _shard_slices

    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if ".lora_A." in name:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                fan_in = p.shape[1]
                bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_ with a = sqrt(5)
                full = torch.empty(p.shape).uniform_(-bound, bound, generator=g)
                _local(p).copy_(full[_shard_slices(p)].to(_local(p).dtype))
            elif ".lora_B." in name:
                _local(p).zero_()


def has_adapters(model: nn.Module | None) -> bool:
    return model is not None and any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(m: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(m, LoraLayer)


@contextmanager
def adapters_disabled(model: nn.Module):
    """``model`` without its adapters (the base model) inside the block: the reference policy of a LoRA actor."""
    layers = [m for m in model.modules() if _is_lora_layer(m)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def adapter_items(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The adapter's tensors under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    for name, p in model.named_parameters():
        if ".lora_" in name:
            yield "base_model.model." + name.replace(f".{ADAPTER}.", "."), p.detach()


def merged_items(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """Full weights under the base model's names with each adapter folded in (``W + scaling * B @ A``), one tensor at
    a time; nothing of the model is copied except each adapted projection's merged weight."""
    adapted: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if _is_lora_layer(m)}
    for name, t in model.state_dict(keep_vars=True).items():
        if ".lora_" in name:
            continue
        module_name = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if module_name is not None and module_name in adapted and name.endswith(".base_layer.weight"):
            layer = adapted[module_name]
            delta = layer.get_delta_weight(ADAPTER)
            merged = (t.detach() + delta.to(t.dtype)).to(dtype or t.dtype)
            yield f"{module_name}.weight", merged
        else:
            out = t.detach()
            yield name.replace(".base_layer.", "."), out if dtype is None else out.to(dtype)


def full_tensors(items: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """``items`` with FSDP2's sharded tensors (DTensors) gathered, one at a time (a collective: every rank must
    consume the whole iterator in the same order)."""
    from torch.distributed.tensor import DTensor

    for name, t in items:
        yield name, t.full_tensor() if isinstance(t, DTensor) else t


def peft_config_dict(cfg: LoRAConfig, base_model: str) -> dict:
    """``adapter_config.json``'s content for ``cfg``'s adapter of ``base_model``."""
    config = cfg.peft_config().to_dict()
    config["base_model_name_or_path"] = str(base_model)
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
