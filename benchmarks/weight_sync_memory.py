"""Peak extra memory of one weight sync (trainer -> vLLM) against the model's size.

Three ways to send the actor, each measured twice:

- ``materialised`` (the former path): every weight cast to the engine's dtype first, then the engine.
- ``gathered``: what a sharded actor (FSDP2 ``full_tensor``, ZeRO-3 buckets) sends: a new full-size tensor per
  parameter, cast to the engine's dtype, produced lazily while vLLM's layer-wise reload consumes them.
- ``views``: what an actor a rank holds whole sends (no strategy, DDP): ``vapo_pl.parallel.stream_state_items``
  yields views of its own parameters in their own dtype and vLLM's loaders cast while they copy.

Measure 1, the sync's own tensors: every tensor the sync produces that does not share memory with the model is
counted from when it is produced until its last reference is gone (vLLM holds the members of a fused layer, q/k/v
or gate/up, until the layer is complete), and the maximum is kept. Measure 2, the whole process: peak resident
memory during the sync minus resident memory before it (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``, free heap memory returned with ``malloc_trim`` first). It also counts what vLLM
allocates itself while it reloads, and is only readable on a model far larger than the allocator's noise:
``--model medium`` builds a random 8-layer, 1024-wide Qwen2 (about 90 M parameters) for it. vLLM's first in-place
reload keeps memory it does not free again; one unmeasured sync runs first and its figures are printed apart.

    python benchmarks/weight_sync_memory.py                    # demo base policy, engine in bfloat16
    python benchmarks/weight_sync_memory.py --model medium     # the whole-process measure is meaningful here
    python benchmarks/weight_sync_memory.py --bucket-fraction 0.05

Runs on CPU (vLLM's CPU backend in bfloat16 needs avx512_bf16, which these machines have); the FSDP2 and ZeRO-3
gathers go through the same generator and are exercised by ``tests/distributed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PeakTracker:
    """Wraps a ``(name, tensor)`` iterator and records the peak bytes of produced tensors alive at once that are
    not views of ``model``'s parameters or buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        self.live = 0
        self.peak = 0
        self.count = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def wrap(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in items:
            if t.untyped_storage().data_ptr() not in self.own:
                n = t.numel() * t.element_size()
                self.live += n
                self.count += 1
                weakref.finalize(t, self._free, n)
                self.peak = max(self.peak, self.live)
            yield name, t
            del t


def model_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(t.numel() for t in model.state_dict().values()) * torch.empty((), dtype=dtype).element_size()


def largest_fused_layer(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the largest group of checkpoint tensors that vLLM loads into one layer (q/k/v into qkv_proj,
    gate/up into gate_up_proj): its layer-wise reload holds such a group until the last member arrives."""
    import re

    groups: dict[str, int] = {}
    for name, t in model.state_dict().items():
        key = re.sub(r"\.(q|k|v)_proj\.", ".qkv_proj.", re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", name))
        key = key.rsplit(".", 1)[0]  # weight and bias of one layer together
        groups[key] = groups.get(key, 0) + t.numel()
    return max(groups.values()) * torch.empty((), dtype=dtype).element_size()


def _status_kb(field: str) -> int:
    import re

    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class ProcessPeak:
    """Peak resident memory of this process during a block, minus resident memory at its start (bytes)."""

    def __enter__(self) -> Self:
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the baseline may include free heap memory
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.extra = (_status_kb("VmHWM") - self.before) * 1024


def build_medium_model(path: Path) -> Path:
    from vapo_pl.tiny import build_tiny_model

    return build_tiny_model(path, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                            intermediate_size=2816)


def measure(policy: Path, bucket_fraction: float, dtype: str = "bfloat16") -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from vapo_pl.parallel import stream_state_items
    from vapo_pl.rollout.vllm_engine import VLLMEngine

    actor = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    engine = VLLMEngine(policy, dtype=dtype, max_model_len=128, kv_cache_space_gb=1, enforce_eager=True)
    target = engine.weight_dtype
    size = model_bytes(actor, target)
    out = {"model_bytes": size, "engine_dtype": str(target), "largest_layer": largest_fused_layer(actor, target) / size,
           "actor_bytes": model_bytes(actor, torch.float32)}
    bucket = max(1, int(size * bucket_fraction))
    with ProcessPeak() as first:  # vLLM's first in-place reload keeps memory for good; not any mode's cost
        engine.update_weights(stream_state_items(actor, None, dtype=target, bucket_bytes=bucket))
    out["first_sync_process"] = first.extra / size
    out["first_sync_kept"] = (_status_kb("VmRSS") - first.before) * 1024 / size
    for label in ("materialised", "gathered", "views"):
        tracker = PeakTracker(actor)
        with ProcessPeak() as process:
            if label == "materialised":  # every cast tensor first, then the engine
                items = list(tracker.wrap((k, v.detach().to(target)) for k, v in actor.state_dict().items()))
                engine.update_weights(items)
                del items
            elif label == "gathered":  # a new full tensor per parameter, cast, as after a gather
                engine.update_weights(tracker.wrap((k, v.detach().clone().to(target))
                                                   for k, v in actor.state_dict().items()))
            else:
                engine.update_weights(tracker.wrap(stream_state_items(actor, None, dtype=target,
                                                                      bucket_bytes=bucket)))
        out[label] = tracker.peak / size
        out[f"{label}_process"] = process.extra / size
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None, help="model directory (default: the demo base policy)")
    ap.add_argument("--model", choices=("demo", "medium"), default="demo",
                    help="without --policy: the demo base policy, or a random 90 M-parameter Qwen2 built in a temp dir")
    ap.add_argument("--bucket-fraction", type=float, default=0.05, help="bucket size as a share of the model")
    ap.add_argument("--dtype", default="bfloat16", help="engine dtype (gathered weights are cast to it)")
    args = ap.parse_args(argv)
    from vapo_pl.demo.prepare import policy_dir

    with tempfile.TemporaryDirectory(prefix="vapo_sync_") as tmp:
        policy = build_medium_model(Path(tmp)) if args.policy is None and args.model == "medium" \
            else policy_dir(args.policy)
        r = measure(policy, args.bucket_fraction, args.dtype)
    print(f"model {r['model_bytes'] / 1e6:.2f} MB in {r['engine_dtype']} (actor {r['actor_bytes'] / 1e6:.2f} MB in "
          f"float32), bucket {args.bucket_fraction:.3f} of it")
    print("sync peak extra memory / model bytes (the sync's own tensors | whole process):")
    for label in ("materialised", "gathered", "views"):
        print(f"  {label:13s} {r[label]:.3f} | {r[label + '_process']:.3f}")
    print(f"largest layer vLLM assembles before loading (the floor of 'gathered'): {r['largest_layer']:.3f}")
    print(f"before these, an unmeasured first sync: whole-process peak {r['first_sync_process']:.3f}, of which "
          f"{r['first_sync_kept']:.3f} vLLM still holds after it")
    return r


if __name__ == "__main__":
    main()
