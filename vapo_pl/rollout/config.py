"""The one options object of a rollout engine, with its one set of defaults.

``data.engine`` in a config is an ``EngineConfig``; ``VLLMEngine`` takes the same object (or keyword
overrides of it), so a default is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

ENGINE_KINDS = ("vllm", "hf")
ENGINE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Rollout engine options (vLLM's names where they exist)."""

    kind: Literal["vllm", "hf"] = "vllm"  # "hf" = transformers generate, for machines without vLLM
    dtype: str = "auto"  # "auto" (from the checkpoint), "float32" (CPU) or "bfloat16" (GPU)
    max_model_len: int | None = None  # None: max_prompt_length + max_response_length, capped by the model
    gpu_memory_utilization: float = 0.5  # share of GPU memory vLLM may take (weights + KV cache)
    kv_cache_space_gb: int = 1  # CPU backend: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = True  # GPU only: free vLLM's memory while the trainer updates
    sleep_level: int = 2  # 2: drop the weights while asleep (the next sync reloads them); 1: offload them to host
    enforce_eager: bool | None = None  # skip torch.compile/CUDA graphs; None: eager on CPU (saves ~40 s of start-up)
    enable_prefix_caching: bool = True
    # KV-cache block size in tokens; None: vLLM's default (128 on CPU, 16 on GPU), except that multi-turn rollouts
    # (data.environment) on CPU use 32, since the prefix cache reuses only whole blocks and an episode's context grows
    # by a turn and an observation at a time
    block_size: int | None = None
    enable_chunked_prefill: bool | None = None  # None: off on CPU (vLLM 0.32 CPU bug with seeded requests), on on GPU
    # LoRA (model.lora with sync: adapter): the engine serves the trained adapter; set by the DataModule from the
    # module's model.lora, not usually by hand
    enable_lora: bool = False
    max_lora_rank: int = 16
    weight_sync_bucket_mb: float = 256.0  # weight sync streams the actor to the engine in buckets of at most this size

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine.kind must be one of {list(ENGINE_KINDS)}, got {self.kind!r}")
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"engine.dtype must be one of {list(ENGINE_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"engine.max_model_len must be >= 1, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_space_gb < 1 or int(self.kv_cache_space_gb) != self.kv_cache_space_gb:
            raise ValueError(f"engine.kv_cache_space_gb must be a whole number >= 1, got {self.kv_cache_space_gb}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"engine.sleep_level must be 1 or 2, got {self.sleep_level!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"engine.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size < 1):
            raise ValueError(f"engine.block_size must be an integer >= 1, got {self.block_size!r}")
        if not self.weight_sync_bucket_mb > 0:
            raise ValueError(f"engine.weight_sync_bucket_mb must be > 0, got {self.weight_sync_bucket_mb}")

    @property
    def weight_sync_bucket_bytes(self) -> int:
        return int(self.weight_sync_bucket_mb * 2**20)

    def with_overrides(self, **overrides: Any) -> EngineConfig:
        """A copy with some fields replaced (validated again); unknown names are a one-line error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"EngineConfig has no option {unknown[0]!r}; options: {sorted(names)}")
        return replace(self, **overrides)
