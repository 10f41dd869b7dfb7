"""``vapo-pl plan``: the GPU (and host) memory of a run per rank, from its config alone, before anything loads.

    vapo-pl plan --config configs/vapo_qwen2.5_32b.yaml [--config overlay.yaml] [--gpu-memory-gb 80] [--key value]

The config is parsed by the same parser as ``vapo-pl fit`` (overlays and ``--key value`` overrides included). The
architecture comes from ``config.json`` in ``model.model_path``, else from a built-in table of public models keyed by
the name in the path. Exit status: 0 if the run fits, 1 if it does not (with suggestions), 2 for a bad input.
``vapo-pl fit`` runs the same plan against the real device memory on GPUs and stops in one line when it cannot fit
(``VAPO_PL_SKIP_MEMORY_PLAN=1`` skips that check).

What is counted, per rank (docs/memory_plan.md explains each term):

- states: actor, critic (when the estimator uses one) and reference (when a KL term is on) weights, the actor's and
  critic's gradients and AdamW states (two fp32 moments per trainable parameter; the trainer builds every model in
  float32, so the master weights are fp32), placed by the strategy: DDP keeps everything on every rank; FSDP2 divides
  it by the world size (``cpu_offload``: all of it on the host); DeepSpeed ZeRO-2 keeps (bf16) weights whole and
  divides gradients and optimizer state, ZeRO-3 divides all, ``offload_optimizer``/``offload_param`` move terms to
  the host;
- the update's transients: FSDP2's unsharded layers (bf16 under ``bf16-mixed``: its MixedPrecisionPolicy covers the
  decoder layers) and root (embeddings, heads: fp32, gathered through backward), FSDP2's full fp32 gradients between
  micro-batches under ``gradient_sync: step``, autocast's bf16 weight copies (DDP under ``bf16-mixed``), the fp32
  copy of a bf16 output head (DeepSpeed bf16), ZeRO's buckets;
- activations of one micro-batch of full-length sequences (``micro_batch_size x (max_prompt_length +
  max_response_length)`` tokens, packed as ``forward.row_groups`` packs them), actor and critic together (their
  losses share one backward), with and without gradient checkpointing (``activation_bytes_per_token_layer`` has the
  formula, measured on CPU by ``benchmarks/memory_plan_check.py``); logits of the response tokens only;
- the rollout engine: vLLM's weights (``data.engine.dtype``, divided by the tensor-parallel size) and the KV cache
  that ``gpu_memory_utilization`` leaves, in tokens and sequences of ``max_model_len``; asleep during the update.

Not counted: the host memory of loading a checkpoint, the reward workers, vLLM's CPU-side buffers, and a sequence
longer than ``max_prompt_length + max_response_length``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vapo_pl.config_checks import ConfigError, _as_dict, _build, _class_of, _get, _world_size

GiB = 2**30
CUDA_CONTEXT_BYTES = int(1.5 * GiB)  # CUDA context, NCCL buffers, cuBLAS workspaces: outside PyTorch's allocator
FRAGMENTATION = 0.05  # share of a GPU a phase may not use: the caching allocator's fragmentation
ENGINE_ASLEEP_BYTES = int(0.5 * GiB)  # what a sleeping vLLM engine keeps (CUDA-graph pool, sampler buffers)
ENGINE_NON_TORCH_BYTES = 1 * GiB  # vLLM's own non-torch memory and CUDA graphs, inside its budget
DEFAULT_GPU_GB = 80.0


class PlanError(ConfigError):
    """An input the plan cannot use (one line naming the field)."""


# ---------------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Arch:
    """A Qwen2/Llama-style decoder: what the memory of training and serving it depends on."""

    name: str
    source: str  # where the numbers came from
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool
    max_positions: int | None
    dtype: str = "bfloat16"  # the checkpoint's dtype (vLLM's dtype "auto")
    qkv_bias: bool = True  # Qwen2: biases on q, k, v; Llama: attention_bias

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        q, kv, h = self.heads * self.head_dim, self.kv_dim, self.hidden
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h  # + gate/up/down, two RMSNorm weights

    @property
    def layer_matmul_params(self) -> int:
        """The weights of a layer's linear layers (what autocast casts to bf16)."""
        q, kv, h = self.heads * self.head_dim, self.kv_dim, self.hidden
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

    @property
    def backbone_params(self) -> int:
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden  # embeddings, layers, norm

    @property
    def causal_lm_params(self) -> int:
        return self.backbone_params + (0 if self.tie_word_embeddings else self.vocab * self.hidden)

    def describe(self) -> str:
        tie = "tied" if self.tie_word_embeddings else "untied"
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, {self.heads} heads / "
                f"{self.kv_heads} KV heads (head dim {self.head_dim}), vocab {self.vocab}, {tie} embeddings")


def _qwen25(name: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
            tie: bool, context: int) -> Arch:
    return Arch(name, "built-in table", hidden, intermediate, layers, heads, kv_heads, hidden // heads, vocab, tie,
                context)


# The published config.json of each base model (https://huggingface.co/Qwen/Qwen2.5-<size>/blob/main/config.json:
# hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size,
# tie_word_embeddings) and the context length of its model card (Qwen2.5 technical report, arXiv 2412.15115,
# Table 1). Qwen2.5-32B's numbers give 32,763,876,352 parameters, the count of its safetensors.
BUILTIN_ARCHS: dict[str, Arch] = {a.name: a for a in (
    _qwen25("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, 32768),
    _qwen25("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 32768),
    _qwen25("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072),
    _qwen25("Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, 131072),
    _qwen25("Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, 131072),
)}


def _builtin_for(path: str) -> Arch | None:
    """The table entry whose size the path names (``/models/Qwen2.5-32B-Instruct`` -> Qwen2.5-32B)."""
    m = re.search(r"qwen2\.5[-_](?:math[-_]|coder[-_])?(\d+(?:\.\d+)?)b(?![\d.])", Path(path).name.lower()) or \
        re.search(r"qwen2\.5[-_](?:math[-_]|coder[-_])?(\d+(?:\.\d+)?)b(?![\d.])", str(path).lower())
    return BUILTIN_ARCHS.get(f"Qwen2.5-{m.group(1)}B") if m else None


def arch_from_config(config: dict, name: str, source: str) -> Arch:
    """An ``Arch`` from a Hugging Face ``config.json`` (a ``text_config`` inside it when there is one)."""
    cfg = config.get("text_config") or config
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", ""))
        bias = bool(cfg.get("attention_bias", model_type.startswith("qwen2")))
        return Arch(
            name=name, source=source, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            max_positions=cfg.get("max_position_embeddings"),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "float32"),
            qkv_bias=bias,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{source}: not a decoder config the plan can read (missing or bad {e})") from None


def load_arch(model_path: str | None, field_name: str = "model.model_path") -> Arch:
    """From ``<model_path>/config.json``; else the built-in table entry the path names; else a one-line error."""
    if not model_path:
        raise PlanError(f"{field_name} is not set")
    cfg_file = Path(str(model_path)).expanduser() / "config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise PlanError(f"{field_name}: {cfg_file} does not read as JSON ({e})") from None
        return arch_from_config(config, Path(str(model_path)).name, str(cfg_file))
    arch = _builtin_for(str(model_path))
    if arch is None:
        raise PlanError(f"{field_name}: {model_path} has no config.json and names no architecture the plan knows "
                        f"({', '.join(BUILTIN_ARCHS)})")
    return replace(arch, source=f"built-in table (no config.json at {model_path})")


# ---------------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Setup:
    """Everything the plan reads from a run config."""

    arch: Arch
    world: int  # ranks = GPUs
    nodes: int
    accelerator: str
    strategy: str  # "ddp" (also a single device) | "fsdp2" | "zero2" | "zero3"
    strategy_label: str
    precision: str  # "32" | "bf16-mixed" | "bf16-true"
    gradient_checkpointing: bool
    micro_batch: int
    prompt_len: int
    response_len: int
    chunk_size: int
    attn: str  # auto | sdpa | eager | flash_attention_2
    critic: bool
    reference: bool
    rollout_per_rank: int  # samples of one RL step on this rank
    cpu_offload: bool = False  # FSDP2
    gradient_sync: str = "step"  # FSDP2: reduce-scatter once per optimizer step ("step") or per micro-batch
    minibatch: int = 1  # samples per optimizer step, over all ranks
    offload_optimizer: bool = False  # DeepSpeed
    offload_params: bool = False  # DeepSpeed ZeRO-3
    ds_bf16: bool = False  # DeepSpeed holds bf16 weights (fp32 masters in the optimizer)
    ds_buffer_elems: int = 0  # DeepSpeed bucket sizes that live on the GPU during the update
    packing: bool = True
    pack_row_tokens: int = 128
    engine_kind: str = "vllm"
    engine_dtype: str = "auto"
    engine_util: float = 0.5
    engine_tp: int = 1
    engine_sleep: bool = True
    engine_sleep_level: int = 2
    engine_kv_space_gb: int = 1  # CPU engine
    engine_max_model_len: int | None = None
    engine_bucket_bytes: int = 256 * 2**20
    args: tuple[str, ...] = ()  # the command line (configs and overrides), for the printout

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def max_model_len(self) -> int:
        if self.engine_max_model_len:
            return self.engine_max_model_len
        limit = self.arch.max_positions
        return min(self.seq_len, limit) if limit else self.seq_len

    @property
    def micro_steps(self) -> int:
        """Micro-batches per optimizer step on one rank."""
        return max(1, self.minibatch // max(self.world, 1) // self.micro_batch)

    @property
    def accumulates_unsharded(self) -> bool:
        """FSDP2 with ``gradient_sync: step`` keeps every layer's full fp32 gradient between the micro-batches of a
        step (FSDP2 accumulates in the reduce dtype)."""
        return self.strategy == "fsdp2" and self.gradient_sync == "step" and self.micro_steps > 1

    @property
    def on_gpu(self) -> bool:
        return self.accelerator != "cpu"

    @property
    def regime(self) -> str:
        """How the trainer's tensors are typed: 'fp32'; 'autocast' (fp32 weights, bf16 matmuls: DDP under
        bf16-mixed); 'bf16' (bf16 weights in the forward: FSDP2's MixedPrecisionPolicy, DeepSpeed bf16, bf16-true)."""
        if self.precision == "bf16-true" or (self.strategy.startswith("zero") and self.ds_bf16):
            return "bf16"
        if self.precision == "bf16-mixed":
            return "bf16" if self.strategy == "fsdp2" else "autocast"
        return "fp32"


def _strategy(cfg) -> dict[str, Any]:
    """The strategy's kind and options from ``trainer.strategy`` (a name or a class_path with init_args)."""
    s = _get(cfg, "trainer.strategy", "auto")
    if isinstance(s, str):
        name = s.lower()
        if name.startswith("deepspeed"):
            stage = int(m.group(1)) if (m := re.search(r"stage_(\d)", name)) else 2
            off = "offload" in name
            return {"strategy": "zero3" if stage == 3 else "zero2", "label": f"DeepSpeed ZeRO-{stage} ({s})",
                    "offload_optimizer": off, "offload_params": off and stage == 3, "ds_bf16": None,
                    "ds_buffer_elems": _ds_buffers({}, stage)}
        if name.startswith("fsdp"):
            return {"strategy": "fsdp2", "label": f"Lightning FSDP ({s}), planned as FSDP2 full sharding"}
        return {"strategy": "ddp", "label": "DDP" if name != "auto" else "auto (DDP on several devices)"}
    class_path = str(_get(s, "class_path", ""))
    init = _as_dict(_get(s, "init_args"))
    cls = _class_of(class_path)
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    short = class_path.rsplit(".", 1)[-1]
    if isinstance(cls, type) and issubclass(cls, DeepSpeedStrategy):
        ds = _deepspeed_config(init.get("config"))
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", init.get("stage", 2)))
        opt_off = _offloaded(zero.get("offload_optimizer")) or bool(init.get("offload_optimizer"))
        par_off = _offloaded(zero.get("offload_param")) or bool(init.get("offload_parameters"))
        bf16 = (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled")
        return {"strategy": "zero3" if stage >= 3 else "zero2", "label": f"DeepSpeed ZeRO-{stage} ({short})",
                "offload_optimizer": opt_off, "offload_params": par_off and stage >= 3,
                "ds_bf16": None if bf16 is None else bool(bf16), "ds_buffer_elems": _ds_buffers(zero, stage)}
    if isinstance(cls, type) and issubclass(cls, (ModelParallelStrategy, FSDPStrategy)):
        off = init.get("cpu_offload", False)
        off = bool(getattr(off, "offload_params", off)) if not isinstance(off, bool) else off
        label = "FSDP2" if issubclass(cls, ModelParallelStrategy) else "Lightning FSDP, planned as FSDP2"
        sync = str(init.get("gradient_sync", "step") or "step")
        return {"strategy": "fsdp2",
                "label": f"{label} ({short}{', cpu_offload' if off else ''}, gradient_sync {sync})",
                "cpu_offload": off, "gradient_sync": sync}
    if isinstance(cls, type) and issubclass(cls, DDPStrategy):
        return {"strategy": "ddp", "label": f"DDP ({short})"}
    return {"strategy": "ddp", "label": f"{short or s}, planned as DDP (everything on every rank)"}


def _offloaded(section) -> bool:
    return bool(section) and str(_get(section, "device", "none")).lower() not in ("none", "")


def _ds_buffers(zero: dict, stage: int) -> int:
    """Elements of DeepSpeed's GPU buckets during the update (DeepSpeed's defaults where the config is silent)."""
    reduce = float(zero.get("reduce_bucket_size", 5e8))
    if stage >= 3:
        return int(float(zero.get("stage3_max_live_parameters", 1e9)) + reduce)
    return int(float(zero.get("allgather_bucket_size", 5e8)) + reduce)


def _deepspeed_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if hasattr(config, "items"):
        return dict(config.items())
    text = str(config)
    if Path(text).is_file():
        text = Path(text).read_text()
    import yaml

    try:
        out = yaml.safe_load(text)  # JSON is YAML; the printed config holds the mapping as a string
    except yaml.YAMLError:
        return {}
    return out if isinstance(out, dict) else {}


def setup_from_config(cfg, args: tuple[str, ...] = ()) -> Setup:
    """A ``Setup`` from the parsed ``fit`` namespace (``build_parser().parse_args(["fit", ...]).fit``)."""
    from vapo_pl.config import AlgorithmConfig
    from vapo_pl.rollout.config import EngineConfig

    model = _get(cfg, "model.init_args", _get(cfg, "model"))
    data = _get(cfg, "data.init_args", _get(cfg, "data"))
    algo = _build(AlgorithmConfig, _get(model, "algorithm"), "model.")
    engine = _build(EngineConfig, _get(data, "engine"), "data.")
    arch = load_arch(_get(model, "model_path"))
    accelerator = str(_get(cfg, "trainer.accelerator", "auto")).lower()
    nodes = int(_get(cfg, "trainer.num_nodes", 1) or 1)
    world = _world_size(_get(cfg, "trainer"))
    if not world:  # "auto" / -1: this machine's GPUs
        world = max(_cuda_count() if accelerator != "cpu" else 1, 1) * nodes
    precision = str(_get(cfg, "trainer.precision", "32") or "32").lower()
    precision = {"bf16": "bf16-mixed", "32-true": "32", "32": "32", "bf16-true": "bf16-true"}.get(precision, precision)
    if precision not in ("32", "bf16-mixed", "bf16-true", "64", "64-true"):
        raise PlanError(f"trainer.precision={precision}: the plan knows 32, bf16-mixed and bf16-true")
    strat = _strategy(cfg)
    if world == 1 and strat["strategy"] == "ddp":
        strat["label"] = "one device"
    ds_bf16 = strat.pop("ds_bf16", None)
    if ds_bf16 is None:
        ds_bf16 = precision.startswith("bf16")
    prompts = int(_get(data, "prompts_per_step", 8))
    samples = int(_get(data, "samples_per_prompt", 4))
    attn = str(_get(model, "attn_implementation", "auto") or "auto")
    if attn == "auto":  # VAPOModule's rule: flash-attention on CUDA when flash_attn is installed, else SDPA
        import importlib.util

        attn = "flash_attention_2" if _cuda_count() and importlib.util.find_spec("flash_attn") else "auto"
    chunk = int(_get(model, "logprob_chunk_size", 1024))
    return Setup(
        arch=arch, world=world, nodes=nodes, accelerator=accelerator, strategy=strat.pop("strategy"),
        strategy_label=strat.pop("label"), precision=precision,
        gradient_checkpointing=bool(_get(model, "gradient_checkpointing", False)),
        micro_batch=algo.micro_batch_size, minibatch=algo.minibatch_size,
        prompt_len=int(_get(data, "max_prompt_length", 512)),
        response_len=int(_get(data, "max_response_length", 512)), chunk_size=chunk, attn=attn,
        critic=algo.uses_critic, reference=algo.uses_reference,
        rollout_per_rank=max(1, prompts * samples // world),
        ds_bf16=bool(ds_bf16), packing=bool(_get(model, "packing", True)),
        pack_row_tokens=int(_get(model, "pack_row_tokens", 128)),
        engine_kind=engine.kind, engine_dtype=engine.dtype, engine_util=engine.gpu_memory_utilization,
        engine_tp=engine.tensor_parallel_size if engine.kind == "vllm" else 1,
        engine_sleep=engine.enable_sleep_mode, engine_sleep_level=engine.sleep_level,
        engine_kv_space_gb=engine.kv_cache_space_gb, engine_max_model_len=engine.max_model_len,
        engine_bucket_bytes=engine.weight_sync_bucket_bytes, args=tuple(args), **strat,
    )


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except RuntimeError:  # a broken driver: plan for one device
        return 0


# ---------------------------------------------------------------------------------------------------- formulas
@dataclass(frozen=True)
class DTypes:
    """Bytes of the trainer's tensors in a precision regime (``Setup.regime``)."""

    residual: int  # the residual stream (hidden states between layers)
    compute: int  # matmul outputs
    casts_per_layer: int  # copies of a norm's output the layers' linear inputs keep (autocast casts per linear)
    param: int  # the weights a forward reads (FSDP2 all-gathers them in this dtype)


REGIMES = {
    "fp32": DTypes(residual=4, compute=4, casts_per_layer=2, param=4),
    "autocast": DTypes(residual=4, compute=2, casts_per_layer=5, param=4),  # q, k, v and gate, up cast separately
    "bf16": DTypes(residual=2, compute=2, casts_per_layer=2, param=2),
}


def has_dense_mask(setup: Setup) -> bool:
    """Whether transformers builds a (rows, 1, L, L) mask (SDPA, eager): for packed rows of ``pack_row_tokens``
    (several sequences or padding; a real micro-batch's sequences differ in length) and for a padded batch of several
    sequences. A sequence longer than ``pack_row_tokens`` runs alone and unpadded (``forward.row_groups``), and
    flash-attention's varlen kernel needs no mask."""
    if setup.attn == "flash_attention_2":
        return False
    if not setup.packing:
        return setup.micro_batch > 1
    if setup.seq_len > setup.pack_row_tokens:
        return False
    return setup.micro_batch > 1 or setup.seq_len < setup.pack_row_tokens


def activation_bytes_per_token_layer(arch: Arch, dt: DTypes, repeat_kv: bool = False) -> int:
    """Bytes a transformers Qwen2/Llama decoder layer saves for backward per token, SDPA or flash attention (no
    L^2 term). Each RMSNorm keeps its fp32 input (4h), its rsqrt (4), its normalised output (r*h) and what the
    linear layers keep of its output (one copy, or one per linear under autocast); attention keeps q, k, v after
    the rotary embedding, its output (c*(2h + 2kv)) and one fp32 logsumexp per head; the MLP keeps gate, silu(gate),
    up and their product (4*i*c). Rotary cos/sin need no grad, so q and k before the rotation are not kept.
    ``repeat_kv``: SDPA with a mask and grouped KV heads gets k and v repeated to every head (+2*(h - kv)*c).
    fp32: 4*(8h + 2kv + 4i + heads + 2), measured exactly on CPU (benchmarks/memory_plan_check.py)."""
    h, kv, i, c = arch.hidden, arch.kv_dim, arch.intermediate, dt.compute
    norms = 2 * (4 * h + 4 + dt.residual * h) + dt.casts_per_layer * c * h
    attn = (2 * h + 2 * kv) * c + 4 * arch.heads
    if repeat_kv and kv < h:
        attn += 2 * (h - kv) * c
    return norms + attn + 4 * i * c


@dataclass
class Term:
    name: str
    gpu: float = 0.0  # bytes per rank
    host: float = 0.0
    note: str = ""


@dataclass
class Activations:
    per_token_layer: int
    no_checkpointing: float
    checkpointed_kept: float  # one hidden state per layer (+ what outside the layers keeps)
    recomputed_layer: float  # one layer's full activations, rebuilt in backward
    outside_layers: float  # embedding/positions, final norm, head input
    mask: float  # a dense SDPA mask (per layer without checkpointing, one layer with)

    @property
    def with_checkpointing(self) -> float:
        return self.checkpointed_kept + self.recomputed_layer


def model_activations(setup: Setup, arch: Arch, policy: bool) -> Activations:
    """Saved-for-backward bytes of one micro-batch's training forward of the actor (``policy``) or the critic."""
    dt = REGIMES[setup.regime]
    rows, row_len = _rows(setup)
    tokens = rows * row_len  # every slot of the forward, padding included
    mask = has_dense_mask(setup)
    per = activation_bytes_per_token_layer(arch, dt, repeat_kv=mask and setup.attn != "eager")
    mask_layer = rows * row_len**2 * dt.compute if mask else 0.0  # SDPA converts the bool mask per call and keeps it
    if setup.attn == "eager":  # softmax in fp32 and its cast, per head
        mask_layer += rows * arch.heads * row_len**2 * (4 + dt.compute)
    mask_once = rows * row_len**2 if mask else 0.0  # the bool mask transformers builds once per forward
    response = setup.micro_batch * setup.response_len
    # rotary cos/sin (residual dtype) and the ids; the final norm (fp32 input, rsqrt, output); the head's input: fp32
    # for the linear layer, or the hidden states a chunked, checkpointed head keeps for its recompute
    outside = tokens * (2 * arch.head_dim * dt.residual + 8 + 4 * arch.hidden + 4 + dt.residual * arch.hidden)
    if policy:
        outside += response * arch.hidden * (dt.residual if _chunked_head(setup) else 4)
    else:
        outside += tokens * arch.hidden * 4
    full = tokens * per * arch.layers + mask_layer * arch.layers + mask_once + outside
    kept = tokens * arch.hidden * dt.residual * arch.layers + mask_once + outside
    return Activations(per, full, kept, tokens * per + mask_layer, outside, mask_layer + mask_once)


def _rows(setup: Setup) -> tuple[int, int]:
    """(rows, row length) of a micro-batch of full-length sequences as ``forward.row_groups`` runs it: packed rows of
    ``pack_row_tokens`` slots; a longer sequence alone at its own length (SDPA, eager); under flash-attention rows of
    ``max(pack_row_tokens, longest sequence)``; without packing one padded row per sequence."""
    n, s, rt = setup.micro_batch, setup.seq_len, setup.pack_row_tokens
    if not setup.packing:
        return n, s
    if setup.attn == "flash_attention_2":
        row_len = max(rt, s)
        return math.ceil(n / max(row_len // s, 1)), row_len
    if s > rt:
        return n, s
    return math.ceil(n / max(rt // s, 1)), rt


def forwards_per_micro_batch(setup: Setup) -> int:
    """Model calls per micro-batch: a packed micro-batch runs each sequence longer than ``pack_row_tokens`` alone
    under SDPA and eager attention (``forward.row_groups``), otherwise it is one call."""
    alone = setup.packing and setup.attn != "flash_attention_2" and setup.seq_len > setup.pack_row_tokens
    return setup.micro_batch if alone else 1


def forward_response_tokens(setup: Setup) -> int:
    """Response tokens that reach the output head in one model call."""
    return setup.micro_batch * setup.response_len // forwards_per_micro_batch(setup)


def logits_bytes(setup: Setup) -> tuple[float, float]:
    """(one logits tensor, what the head holds at its peak) for the response tokens of one micro-batch, fp32.

    With gradient checkpointing a call's head runs ``logprob_chunk_size`` tokens at a time and recomputes each chunk
    in backward: about three chunk-sized tensors at once (logits, softmax, their gradient). Otherwise every call's
    logits are kept for backward, and backward adds the gradient of one call's logits at a time."""
    v = setup.arch.vocab
    if _chunked_head(setup):
        tensor = setup.chunk_size * v * 4
        return tensor, 3 * tensor
    tensor = forward_response_tokens(setup) * v * 4
    return tensor, logits_saved(setup) + tensor


def logits_saved(setup: Setup) -> float:
    """The logits autograd keeps for backward: all of them, unless the head is chunked and recomputed."""
    return 0.0 if _chunked_head(setup) else setup.micro_batch * setup.response_len * setup.arch.vocab * 4


def _chunked_head(setup: Setup) -> bool:
    """The policy head runs chunk by chunk, recomputed in backward: with gradient checkpointing, when the response
    tokens of one model call exceed a chunk (``forward.ResponseHead``)."""
    return setup.gradient_checkpointing and forward_response_tokens(setup) > setup.chunk_size


def critic_params(arch: Arch) -> int:
    return arch.backbone_params + arch.hidden + 1  # + value head (the optional log-prob head is ~200 parameters)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class EnginePlan:
    weights: float  # bytes per GPU
    budget: float  # gpu_memory_utilization x GPU
    overhead: float
    kv_bytes: float
    kv_per_token: float
    kv_tokens: int
    sequences: float
    max_model_len: int
    build_free: float  # free memory when the engine is built
    asleep: float
    host: float  # level-1 sleep keeps the weights in host memory
    on_cpu: bool = False


@dataclass
class Plan:
    setup: Setup
    gpu_bytes: float
    states: list[Term]
    update: list[Term]
    actor_acts: Activations
    critic_acts: Activations | None
    logits_tensor: float
    logits_peak: float
    engine: EnginePlan
    update_peak: float
    generation_peak: float
    sync_peak: float
    resident: float  # trainer tensors that stay on the GPU between phases
    host_per_rank: float
    problems: list[str] = field(default_factory=list)

    @property
    def limit(self) -> float:
        return self.gpu_bytes * (1 - FRAGMENTATION)

    @property
    def fits(self) -> bool:
        return not self.problems


def _state_rates(setup: Setup) -> dict[str, tuple[float, int, bool]]:
    """(bytes per parameter, ranks it is divided over, on the host) of the weights, gradients and optimizer state of
    a trainable model, and of the reference model's weights."""
    n = setup.world
    half = setup.precision == "bf16-true"
    w, g, o = (2, 2, 4) if half else (4, 4, 8)
    if setup.strategy == "ddp":
        return {"weights": (w, 1, False), "grads": (g, 1, False), "optim": (o, 1, False), "ref": (w, 1, False)}
    if setup.strategy == "fsdp2":
        off = setup.cpu_offload
        return {"weights": (w, n, off), "grads": (g, n, off), "optim": (o, n, off), "ref": (w, n, off)}
    # DeepSpeed: bf16 weights and gradients with fp32 masters (4) and moments (8) in the optimizer, or all fp32
    w, g, o = (2, 2, 12) if setup.ds_bf16 else (4, 4, 8)
    opt_off, par_off = setup.offload_optimizer, setup.offload_params
    if setup.strategy == "zero2":
        return {"weights": (w, 1, False), "grads": (g, n, opt_off), "optim": (o, n, opt_off), "ref": (w, 1, False)}
    return {"weights": (w, n, par_off), "grads": (g, n, opt_off), "optim": (o, n, opt_off), "ref": (w, n, par_off)}


def make_plan(setup: Setup, gpu_bytes: float) -> Plan:
    arch = setup.arch
    dt = REGIMES[setup.regime]
    pa, pc = arch.causal_lm_params, critic_params(arch)
    rates = _state_rates(setup)
    states: list[Term] = []

    def state(name: str, params: float, kind: str, what: str) -> None:
        rate, ranks, host = rates[kind]
        b = params * rate / ranks
        where = f" / {ranks} ranks" if ranks > 1 else ""
        place = ", host" if host else ""
        states.append(Term(name, 0.0 if host else b, b if host else 0.0,
                           f"{_count(params)} params x {rate:g} B ({what}){where}{place}"))

    wdtype = "bf16" if rates["weights"][0] == 2 else "fp32"
    state("actor weights", pa, "weights", wdtype)
    if setup.critic:
        state("critic weights", pc, "weights", wdtype)
    if setup.reference:
        state("reference weights (no grads)", pa, "ref", "bf16" if rates["ref"][0] == 2 else "fp32")
    trainable = pa + (pc if setup.critic else 0)
    state("gradients (actor + critic)" if setup.critic else "gradients", trainable, "grads",
          "bf16" if rates["grads"][0] == 2 else "fp32")
    state("optimizer state", trainable, "optim", "fp32 master + 2 AdamW moments" if rates["optim"][0] == 12
          else "2 AdamW moments")

    # transients of the update
    update: list[Term] = []
    if setup.regime == "autocast":
        models = 1 + setup.critic
        update.append(Term("autocast bf16 weight copies", 2 * arch.layers * arch.layer_matmul_params * models,
                           note="autocast caches a bf16 copy of every linear weight for the whole step"))
    if setup.strategy == "fsdp2":
        # The root (embeddings, final norm, head) is not resharded after forward and stays fp32 under the
        # MixedPrecisionPolicy, which covers the decoder layers only (vapo_pl.parallel.fully_shard_model).
        root = (pa - arch.layers * arch.layer_params) + ((pc - arch.layers * arch.layer_params) if setup.critic else 0)
        layer = arch.layer_params
        update.append(Term("FSDP2 unsharded root (embeddings, heads)", root * 8,
                           note="fp32 weights gathered from forward to the end of backward, and their fp32 gradients"))
        update.append(Term("FSDP2 unsharded layers", layer * (3 * dt.param + 4),
                           note=f"2 layers in flight and one layer's gradient "
                                f"({'bf16' if dt.param == 2 else 'fp32'} + fp32 for the reduce)"))
        if setup.accumulates_unsharded:
            update.append(Term("FSDP2 accumulated full gradients", trainable * 4,
                               note=f"gradient_sync step: {setup.micro_steps} micro-batches per step, every layer's "
                                    "full fp32 gradient kept between them"))
    if setup.strategy.startswith("zero") and setup.ds_buffer_elems:
        update.append(Term("DeepSpeed buckets", setup.ds_buffer_elems * (2 if setup.ds_bf16 else 4),
                           note="reduce + allgather buckets (ZeRO-3: max live parameters)"))
    if dt.param == 2 and setup.strategy != "fsdp2":  # FSDP2 keeps the root (and so the head) in fp32
        copies = 1 if _chunked_head(setup) else forwards_per_micro_batch(setup)  # saved by each unchunked call
        update.append(Term("fp32 copy of the output head", copies * arch.vocab * arch.hidden * 4,
                           note="the head computes in fp32 over bf16 weights"
                                + (f" ({copies} model calls keep one each)" if copies > 1 else "")))
    actor = model_activations(setup, arch, policy=True)
    critic = model_activations(setup, arch, policy=False) if setup.critic else None
    gc = setup.gradient_checkpointing
    act = actor.with_checkpointing if gc else actor.no_checkpointing
    if critic is not None:  # both forwards are alive at the one backward; one layer recomputes at a time
        act += critic.checkpointed_kept if gc else critic.no_checkpointing
    update.append(Term("activations (actor + critic)" if critic else "activations", act,
                       note="gradient checkpointing" if gc else "no gradient checkpointing"))
    rows, row_len = _rows(setup)
    call_tokens = rows * row_len // forwards_per_micro_batch(setup)
    update.append(Term("backward working set (estimate)",
                       call_tokens * (2 * arch.intermediate + 2 * arch.hidden) * dt.compute,
                       note="one layer's activation gradients at a time (not measured on CPU)"))
    lt, lp = logits_bytes(setup)
    update.append(Term("logits (response tokens)", lp, note="chunked, recomputed in backward" if _chunked_head(setup)
                       else "kept for backward, and their gradient"))
    per_sample = setup.seq_len * 16 + setup.response_len * 37  # ids + mask (int64); masks, log-probs, advantages...
    update.append(Term("rollout batch tensors", setup.rollout_per_rank * per_sample,
                       note=f"{setup.rollout_per_rank} samples on this rank"))

    eng = engine_plan(setup, gpu_bytes, states)
    resident = sum(t.gpu for t in states)
    # vLLM measured free memory when it was built: the trainer's weights existed, its optimizer state did not yet
    if setup.on_gpu:
        update.append(Term("vLLM engine, asleep" if setup.engine_sleep else "vLLM engine (awake: no sleep mode)",
                           eng.asleep))
        update.append(Term("CUDA context, NCCL", CUDA_CONTEXT_BYTES))
    update_peak = resident + sum(t.gpu for t in update)
    context = CUDA_CONTEXT_BYTES if setup.on_gpu else 0
    if setup.on_gpu and setup.engine_kind == "vllm":
        generation_peak = resident + eng.budget + context
    else:
        generation_peak = resident + eng.weights + eng.kv_bytes + context
    gathered = 0.0
    if setup.strategy == "fsdp2":
        gathered = arch.vocab * arch.hidden * 4  # one full tensor at a time, the largest is an embedding
    elif setup.strategy == "zero3":
        gathered = setup.engine_bucket_bytes
    sync_peak = resident + eng.weights + gathered + context
    host = sum(t.host for t in states) + eng.host
    plan = Plan(setup, gpu_bytes, states, update, actor, critic, lt, lp, eng, update_peak, generation_peak, sync_peak,
                resident, host)
    plan.problems = _problems(plan)
    return plan


def engine_plan(setup: Setup, gpu_bytes: float, states: list[Term]) -> EnginePlan:
    arch = setup.arch
    dtype = arch.dtype if setup.engine_dtype == "auto" else setup.engine_dtype
    eb = 4 if "32" in dtype else 2
    tp = setup.engine_tp
    weights = arch.causal_lm_params * eb / tp
    kv_heads = max(arch.kv_heads // tp, 1)  # vLLM replicates KV heads when TP exceeds their number
    kv_per_token = 2 * arch.layers * kv_heads * arch.head_dim * eb
    max_len = setup.max_model_len
    host = weights if setup.engine_sleep and setup.engine_sleep_level == 1 else 0.0
    if not setup.on_gpu or setup.engine_kind != "vllm":
        kv = setup.engine_kv_space_gb * GiB if setup.engine_kind == "vllm" else 0.0
        tokens = int(kv // kv_per_token)
        return EnginePlan(weights, weights + kv, 0.0, kv, kv_per_token, tokens, tokens / max_len, max_len, gpu_bytes,
                          0.0, 0.0, on_cpu=True)
    budget = setup.engine_util * gpu_bytes
    # vLLM's profile run: max_num_batched_tokens through the MLP, and the sampler's fp32 logits for max_num_seqs rows
    big = gpu_bytes >= 70 * GiB
    batched, seqs = (16384, 1024) if big else (8192, 256)
    overhead = ENGINE_NON_TORCH_BYTES + batched * (2 * arch.intermediate + 4 * arch.hidden) * eb / tp \
        + seqs * arch.vocab * 4 * 2
    kv = max(budget - weights - overhead, 0.0)
    tokens = int(kv // kv_per_token)
    built_with = sum(t.gpu for t in states if "weights" in t.name)
    build_free = gpu_bytes - CUDA_CONTEXT_BYTES - built_with
    asleep = ENGINE_ASLEEP_BYTES if setup.engine_sleep else budget
    return EnginePlan(weights, budget, overhead, kv, kv_per_token, tokens, tokens / max_len, max_len, build_free,
                      asleep, host)


def _problems(plan: Plan) -> list[str]:
    out = []
    g = plan.limit
    if plan.update_peak > g:
        out.append(f"update peak {_gib(plan.update_peak)} GiB > {_gib(g)} GiB")
    if plan.generation_peak > g:
        out.append(f"generation peak {_gib(plan.generation_peak)} GiB > {_gib(g)} GiB")
    if plan.sync_peak > g:
        out.append(f"weight-sync peak {_gib(plan.sync_peak)} GiB > {_gib(g)} GiB")
    e = plan.engine
    if plan.setup.engine_kind == "vllm":
        if not e.on_cpu and e.build_free < e.budget:
            out.append(f"vLLM asks for {_gib(e.budget)} GiB at start-up but only {_gib(e.build_free)} GiB are free")
        if e.kv_tokens < e.max_model_len:
            out.append(f"the KV cache holds {e.kv_tokens} tokens, less than one sequence of max_model_len "
                       f"{e.max_model_len} (vLLM refuses to start)")
    return out


def _gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


# ---------------------------------------------------------------------------------------------------- suggestions
def suggestions(setup: Setup, gpu_bytes: float) -> list[tuple[str, Plan]]:
    """Changes in order, each applied on top of the previous ones, until the run fits: (change, plan after it)."""
    out: list[tuple[str, Plan]] = []
    cur = setup
    plan = make_plan(cur, gpu_bytes)

    def step(text: str, new: Setup) -> None:
        nonlocal cur, plan
        cur, plan = new, make_plan(new, gpu_bytes)
        out.append((text, plan))

    def trainer_too_big(p: Plan) -> bool:
        return p.update_peak > p.limit or p.generation_peak > p.limit or p.sync_peak > p.limit

    if not cur.gradient_checkpointing and plan.update_peak > plan.limit:
        step("turn on gradient checkpointing: --model.init_args.gradient_checkpointing true",
             replace(cur, gradient_checkpointing=True))
    if plan.update_peak > plan.limit and cur.accumulates_unsharded:
        step("reduce-scatter gradients after every micro-batch: --trainer.strategy.init_args.gradient_sync micro_batch",
             replace(cur, gradient_sync="micro_batch"))
    if plan.problems and trainer_too_big(plan):
        if cur.strategy == "fsdp2" and not cur.cpu_offload:
            step("FSDP2 cpu_offload (params, grads and optimizer state on the host): "
                 "--trainer.strategy.init_args.cpu_offload true", replace(cur, cpu_offload=True))
        elif cur.strategy.startswith("zero") and not (cur.offload_optimizer and
                                                      (cur.offload_params or cur.strategy == "zero2")):
            both = cur.strategy == "zero3"
            step("DeepSpeed offload to the host: zero_optimization: {offload_optimizer: {device: cpu}"
                 + (", offload_param: {device: cpu}}" if both else "}"),
                 replace(cur, offload_optimizer=True, offload_params=both))
        elif cur.strategy == "ddp" and cur.world > 1:
            step("FSDP2 with cpu_offload: trainer.strategy: {class_path: vapo_pl.parallel.FSDP2Strategy, "
                 "init_args: {cpu_offload: true, gradient_sync: micro_batch}}",
                 replace(cur, strategy="fsdp2", strategy_label="FSDP2 (cpu_offload, gradient_sync micro_batch)",
                         cpu_offload=True, gradient_sync="micro_batch"))
    per_node = max(cur.world // max(cur.nodes, 1), 1)
    if plan.problems and cur.on_gpu and cur.engine_kind == "vllm":
        tp = cur.engine_tp
        while plan.problems and tp * 2 <= per_node and _engine_short(plan):
            tp *= 2
            step(f"raise the rollout tensor parallelism: --data.init_args.engine.tensor_parallel_size {tp}",
                 replace(cur, engine_tp=tp))
        if plan.generation_peak > plan.limit or plan.engine.build_free < plan.engine.budget:
            spare = min(plan.limit - plan.resident - CUDA_CONTEXT_BYTES, plan.engine.build_free)
            util = math.floor(spare / gpu_bytes * 100) / 100
            if 0.05 <= util < cur.engine_util:
                step(f"lower the engine's share: --data.init_args.engine.gpu_memory_utilization {util:.2f}",
                     replace(cur, engine_util=util))
    while plan.update_peak > plan.limit and cur.micro_batch > 1:
        mb = max(cur.micro_batch // 2, 1)
        step(f"lower the micro-batch: --model.init_args.algorithm.micro_batch_size {mb}", replace(cur, micro_batch=mb))
    if plan.problems and cur.on_gpu and not cur.engine_sleep:
        step("let the engine sleep during the update: --data.init_args.engine.enable_sleep_mode true "
             "(sleep_level 2)", replace(cur, engine_sleep=True, engine_sleep_level=2))
    nodes = cur.nodes
    while plan.problems and trainer_too_big(plan) and cur.strategy != "ddp" and nodes < 64:
        nodes *= 2
        world = per_node * nodes
        step(f"more GPUs: --trainer.num_nodes {nodes} ({world} GPUs)",
             replace(cur, nodes=nodes, world=world, rollout_per_rank=max(1, cur.rollout_per_rank * cur.world // world)))
    return out


def _engine_short(plan: Plan) -> bool:
    e = plan.engine
    return e.kv_tokens < e.max_model_len or plan.generation_peak > plan.limit or e.build_free < e.budget \
        or plan.sync_peak > plan.limit


# ---------------------------------------------------------------------------------------------------- printout
def render(plan: Plan, with_suggestions: bool = True) -> str:
    s, a = plan.setup, plan.setup.arch
    big = max(plan.update_peak, plan.host_per_rank) >= GiB
    unit, uname = (GiB, "GiB") if big else (2**20, "MiB")  # a tiny model's plan in MiB
    g = lambda b: f"{b / unit:9.2f}"
    u = lambda b: f"{b / unit:.2f}"
    lines = []
    lines.append(f"vapo-pl plan {' '.join(s.args)}".rstrip())
    lines.append(f"model:     {a.name} ({a.source}): {a.describe()}")
    lines.append(f"           actor {_count(a.causal_lm_params)} params"
                 + (f", critic {_count(critic_params(a))}" if s.critic else ", no critic")
                 + (", reference model (KL)" if s.reference else ", no reference model"))
    lines.append(f"run:       {s.world} rank(s) on {s.nodes} node(s), {s.accelerator}; strategy {s.strategy_label}; "
                 f"precision {s.precision} ({s.regime} tensors)")
    lines.append(f"           micro-batch {s.micro_batch} x {s.seq_len} tokens ({s.prompt_len} prompt + "
                 f"{s.response_len} response); {s.micro_batch * s.response_len} response tokens; attention {s.attn}; "
                 f"logprob_chunk_size {s.chunk_size}")
    lines.append(f"device:    {plan.gpu_bytes / GiB:.1f} GiB per GPU; a phase may use {100 - 100 * FRAGMENTATION:.0f}% "
                 f"of it ({_gib(plan.limit)} GiB; the rest for allocator fragmentation)")
    lines.append("")
    lines.append(f"{'states (per rank)':<46}{'GPU ' + uname:>9}  {'host ' + uname:>9}")
    for t in plan.states:
        lines.append(f"  {t.name:<44}{g(t.gpu)}  {g(t.host)}   {t.note}")
    lines.append("")
    lines.append(f"{'update phase (per rank)':<46}{'GPU ' + uname:>9}")
    lines.append(f"  {'states above, on the GPU':<44}{g(plan.resident)}")
    for t in plan.update:
        lines.append(f"  {t.name:<44}{g(t.gpu)}   {t.note}")
    verdict = "fits" if plan.update_peak <= plan.limit else "DOES NOT FIT"
    lines.append(f"  {'PEAK':<44}{g(plan.update_peak)}   {verdict}")
    lines.append("")
    mark = {True: " <- configured", False: ""}
    lines.append("activations of one micro-batch (per model):")
    lines.append(f"  per token per layer: {plan.actor_acts.per_token_layer:,} bytes "
                 f"({s.regime}: residual {REGIMES[s.regime].residual} B, compute {REGIMES[s.regime].compute} B)")
    for label, acts in (("actor", plan.actor_acts), ("critic", plan.critic_acts)):
        if acts is None:
            continue
        lines.append(f"  {label:<7} without checkpointing {g(acts.no_checkpointing)} {uname}"
                     f"{mark[not s.gradient_checkpointing]}")
        lines.append(f"  {'':<7} with checkpointing    {g(acts.with_checkpointing)} {uname} (kept: one hidden state "
                     f"per layer and the head's input {u(acts.checkpointed_kept)} + one layer recomputed "
                     f"{u(acts.recomputed_layer)})"
                     f"{mark[s.gradient_checkpointing]}")
    if has_dense_mask(s):
        lines.append(f"  dense SDPA mask (micro-batch > 1, {s.attn}): {u(plan.actor_acts.mask)} {uname} included "
                     "(rows x L^2 per layer; attn_implementation flash_attention_2 needs none)")
    else:
        rows, row_len = _rows(s)
        lines.append(f"  no L^2 term (sequences longer than pack_row_tokens run alone and unpadded, or flash-attention "
                     f"varlen); SDPA with a dense mask would add "
                     f"{u(rows * row_len**2 * REGIMES[s.regime].compute)} {uname} per layer kept "
                     f"(+ {u(rows * row_len**2)} {uname} bool mask) and repeat k, v to every head")
    how = (f"chunks of {s.chunk_size} tokens, recomputed in backward" if _chunked_head(s)
           else "all response tokens kept, and their gradient")
    lines.append(f"  logits: {how}"
                 f": one tensor {u(plan.logits_tensor)} {uname}, peak {u(plan.logits_peak)} {uname}")
    lines.append("")
    e = plan.engine
    if s.engine_kind != "vllm":
        lines.append(f"rollout engine: {s.engine_kind} (transformers generate on the trainer's actor)")
    elif e.on_cpu:
        lines.append(f"rollout engine: vLLM on CPU: weights {u(e.weights)} {uname}, "
                     f"KV cache {s.engine_kv_space_gb} GiB "
                     f"(VLLM_CPU_KVCACHE_SPACE) = {e.kv_tokens:,} tokens = {e.sequences:.1f} sequences of "
                     f"{e.max_model_len}; {e.kv_per_token:,.0f} B per token")
    else:
        lines.append(f"generation phase (per rank), vLLM TP {s.engine_tp}, {s.engine_dtype} weights, "
                     f"gpu_memory_utilization {s.engine_util}:")
        lines.append(f"  {'trainer states on the GPU':<44}{g(plan.resident)}")
        lines.append(f"  {'vLLM budget (utilization x GPU)':<44}{g(e.budget)}")
        lines.append(f"    {'weights (/ TP)':<42}{g(e.weights)}")
        lines.append(f"    {'profile activations, sampler, graphs (est.)':<42}{g(e.overhead)}")
        lines.append(f"    {'KV cache':<42}{g(e.kv_bytes)}   {e.kv_per_token / 1024:,.1f} KiB per token = "
                     f"{e.kv_tokens:,} tokens = {e.sequences:.1f} sequences of max_model_len {e.max_model_len}")
        lines.append(f"  {'CUDA context, NCCL':<44}{g(CUDA_CONTEXT_BYTES)}")
        lines.append(f"  {'PEAK':<44}{g(plan.generation_peak)}   "
                     f"{'fits' if plan.generation_peak <= plan.limit else 'DOES NOT FIT'}")
        lines.append(f"  vLLM measures free memory once, when it is built (trainer weights loaded, no optimizer state "
                     f"yet): {_gib(e.build_free)} GiB free for a budget of {_gib(e.budget)} GiB")
        sleep = (f"asleep during the update (level {s.engine_sleep_level}"
                 + (": weights kept in host memory)" if s.engine_sleep_level == 1 else ": weights dropped)")
                 if s.engine_sleep else "never asleep: its whole budget stays allocated during the update")
        lines.append(f"  engine {sleep}")
        lines.append(f"weight sync (engine weights awake, trainer states, one gathered tensor/bucket): "
                     f"peak {_gib(plan.sync_peak)} GiB")
    lines.append("")
    lines.append(f"host memory per rank: {u(plan.host_per_rank)} {uname}"
                 + (f" ({plan.host_per_rank * s.world / max(s.nodes, 1) / GiB:.0f} GiB per node)"
                    if s.world > 1 else "")
                 + " (offloaded states, level-1 sleep weights; not counted: loading, reward workers)")
    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits {plan.gpu_bytes / GiB:.0f} GiB GPUs: update peak {_gib(plan.update_peak)} GiB, "
                     f"generation peak {_gib(plan.generation_peak)} GiB")
    else:
        lines.append(f"verdict: DOES NOT FIT {plan.gpu_bytes / GiB:.0f} GiB GPUs: " + "; ".join(plan.problems))
        if with_suggestions:
            steps = suggestions(s, plan.gpu_bytes)
            if steps:
                lines.append("suggestions, in order, each on top of the previous:")
                for k, (text, p) in enumerate(steps, 1):
                    lines.append(f"  {k}. {text}: update {_gib(p.update_peak)} GiB, generation "
                                 f"{_gib(p.generation_peak)} GiB, KV {p.engine.sequences:.1f} sequences"
                                 + (" -> fits" if p.fits else ""))
                if not steps[-1][1].fits:
                    lines.append("  still does not fit: " + "; ".join(steps[-1][1].problems))
            else:
                lines.append("no change the plan knows makes it fit")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- entry points
USAGE = """usage: vapo-pl plan --config CONFIG [--config OVERLAY ...] [--gpu-memory-gb N] [--key value ...]

The memory of a run per GPU (and host memory per rank), from the config alone: parsed as `vapo-pl fit` parses it,
before anything loads. --gpu-memory-gb: default the first CUDA device's memory, or 80 without a GPU.
Exit status 0: fits; 1: does not fit (suggestions printed); 2: bad input."""


def device_memory_bytes() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except RuntimeError:  # a CUDA that cannot be initialised: no device to plan for
        return None
    return None


def parse_plan_args(args: list[str]) -> tuple[list[str], float | None, tuple[str, ...]]:
    rest, gb, configs = [], None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if a == "--gpu-memory-gb" or a.startswith("--gpu-memory-gb="):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise PlanError("--gpu-memory-gb needs a number")
            try:
                gb = float(value)
            except ValueError:
                raise PlanError(f"--gpu-memory-gb must be a number, got {value!r}") from None
            if not (gb > 0 and math.isfinite(gb)):
                raise PlanError(f"--gpu-memory-gb must be > 0, got {value}")
        else:
            if a == "--config" and i + 1 < len(args):
                configs.append(args[i + 1])
            elif a.startswith("--config="):
                configs.append(a.split("=", 1)[1])
            rest.append(a)
        i += 1
    if not configs:
        raise PlanError("vapo-pl plan needs --config (the run's config, as for vapo-pl fit)")
    return rest, gb, tuple(configs)


def main(args: list[str]) -> int:
    """``vapo-pl plan ...``: print the plan; 0 if it fits, 1 if not, 2 for a bad input (one ``error:`` line)."""
    try:
        rest, gb, configs = parse_plan_args(args)
        for c in configs:
            if not Path(c).is_file():
                raise PlanError(f"--config: {c} does not exist")
        from vapo_pl.cli import build_parser

        cfg = build_parser().parse_args(["fit", *rest]).fit  # a parse error prints one line and exits 2
        setup = setup_from_config(cfg, tuple(args))
        gpu = gb * GiB if gb is not None else (device_memory_bytes() or DEFAULT_GPU_GB * GiB)
        plan = make_plan(setup, gpu)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(render(plan), flush=True)
    return 0 if plan.fits else 1


def check_fits_device(cfg, args: list[str] | None) -> str | None:
    """At the start of ``vapo-pl fit`` on GPUs: None if the plan fits the device's memory (or is not for a GPU run),
    else the one-line reason. A failure of the plan itself never stops a run (a warning instead)."""
    if os.environ.get("VAPO_PL_SKIP_MEMORY_PLAN"):
        return None
    accelerator = str(_get(cfg, "trainer.accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda", "auto"):
        return None
    gpu = device_memory_bytes()
    if gpu is None:  # no CUDA here: Lightning reports a gpu run itself; "auto" runs on the CPU
        return None
    try:
        plan = make_plan(setup_from_config(cfg), gpu)
    except Exception as e:  # noqa: BLE001
        print(f"warning: the memory plan could not be made ({' '.join(str(e).split())}); continuing",
              file=sys.stderr, flush=True)
        return None
    if plan.fits:
        return None
    argv = [a for a in (sys.argv[1:] if args is None else list(args)) if a != "fit"]
    return (f"the run does not fit {gpu / GiB:.0f} GiB per GPU ({'; '.join(plan.problems)}); "
            f"vapo-pl plan {' '.join(argv)} for details (VAPO_PL_SKIP_MEMORY_PLAN=1 skips this check)")
