"""Small helpers shared across the package: model-directory checks, seed derivation, rank reductions and a
float32 linear layer for mixed precision."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def require_model_dir(path: str | Path | None, field: str = "model_path") -> Path:
    """``path`` as a ``Path`` if it is a Hugging Face model directory; otherwise one clear line.

    Checked up front because vLLM and transformers answer a wrong path with a long traceback that hides
    which path was wrong.
    """
    if path is None:
        raise ValueError(f"{field} is not set: give a local Hugging Face model directory")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{field}: no model directory at {str(p)!r}")
    if not (p / "config.json").is_file():
        raise ValueError(f"{field}: {str(p)!r} has no config.json (not a Hugging Face model directory)")
    return p


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


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective on ``group`` (default: the world): the CPU when the
    backend is gloo (or a mixed backend that includes it, ``"cpu:gloo,cuda:nccl"``), otherwise the current
    accelerator (NCCL serves CUDA tensors only: a CPU tensor fails with "No backend type associated with device
    type cpu")."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise RuntimeError(f"the process group's backend {backend!r} needs an accelerator, and none is available")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def sum_across_ranks(x):
    """``x`` summed over all ranks (a copy on ``x``'s device; ``x`` itself is untouched); ``x`` on one process.
    The reduction runs on the device the process group's backend serves (``collective_device``)."""
    import torch.distributed as dist

    if world()[1] > 1:
        device = collective_device()
        y = x.to(device, copy=True)
        dist.all_reduce(y)
        return y.to(x.device)
    return x


def max_across_ranks(x: int) -> int:
    """The largest ``x`` over all ranks."""
    import torch.distributed as dist

    if world()[1] > 1:
        t = torch.tensor([x], dtype=torch.long, device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return x


def fp32_forward(linear: torch.nn.Linear) -> torch.nn.Linear:
    """Make ``linear`` compute in float32 (input upcast, float32 weights) even inside a bf16 autocast region.

    Its ``forward`` is replaced on the instance, so parameter names, state dicts, ZeRO-3's gather hooks and FSDP2
    sharding are unchanged (they act on ``__call__`` and the parameters). Idempotent.
    """
    import types

    if getattr(linear, "_vapo_fp32", False):
        return linear
    linear.forward = types.MethodType(_fp32_linear_forward, linear)  # a bound method: deepcopy rebinds it
    linear._vapo_fp32 = True
    return linear


def _fp32_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


def publish_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to the trainer's loggers at ``step`` and expose them as callback metrics (for
    ``ModelCheckpoint(monitor=...)``). Every per-step metric of the project goes through this, at the RL step
    just completed, so all curves share one x axis and a resumed run can purge exactly the steps it redoes.

    Not ``LightningModule.log``: Lightning writes those at its own batch counter (one behind the RL step here)
    and re-sends an on-step value at later steps of the epoch.
    """
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Set ``timings[name]`` to the block's wall-clock seconds."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - t
