"""Peak extra memory of one weight sync (trainer -> vLLM) against the model's size, streamed vs materialised.

The sync gathers and casts the actor's weights for the engine. Materialised (the former path), every cast copy
exists at once: the whole model in the engine's dtype. Streamed (``vapo_pl.parallel.stream_state_items``), the
copies are made one bucket at a time while vLLM's layer-wise reload consumes them, so the peak is about one
bucket. The tracker counts the bytes of every tensor the sync produces that does not share memory with the
model's own parameters, adds them when produced and subtracts them when the last reference is gone, and keeps
the maximum.

    python benchmarks/weight_sync_memory.py                    # demo base policy, engine in bfloat16
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
    for label in ("materialised", "streamed"):
        tracker = PeakTracker(actor)
        if label == "materialised":  # the former path: every cast tensor first, then the engine
            items = list(tracker.wrap((k, v.detach().to(target)) for k, v in actor.state_dict().items()))
            engine.update_weights(items)
            del items
        else:
            engine.update_weights(tracker.wrap(stream_state_items(actor, None, dtype=target, bucket_bytes=bucket)))
        out[label] = tracker.peak / size
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None, help="model directory (default: the demo base policy)")
    ap.add_argument("--bucket-fraction", type=float, default=0.05, help="bucket size as a share of the model")
    ap.add_argument("--dtype", default="bfloat16", help="engine dtype (the sync casts to it)")
    args = ap.parse_args(argv)
    from vapo_pl.demo.prepare import policy_dir

    policy = policy_dir(args.policy)
    r = measure(policy, args.bucket_fraction, args.dtype)
    print(f"model {r['model_bytes'] / 1e6:.2f} MB in {r['engine_dtype']}, bucket {args.bucket_fraction:.3f} of it")
    print(f"sync peak extra memory / model bytes: materialised {r['materialised']:.3f}, streamed {r['streamed']:.3f}")
    print(f"largest layer vLLM assembles before loading (its floor for any bucket size): {r['largest_layer']:.3f}")
    fp32 = r["model_bytes"] / r["actor_bytes"]
    print(f"the same peaks over the trainer's float32 actor ({r['actor_bytes'] / 1e6:.2f} MB): materialised "
          f"{r['materialised'] * fp32:.3f}, streamed {r['streamed'] * fp32:.3f}")
    return r


if __name__ == "__main__":
    main()
