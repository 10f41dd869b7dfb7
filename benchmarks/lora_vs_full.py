"""LoRA against full-parameter training of the actor: what the optimizer holds, what a step costs in memory, and what a
weight sync sends to vLLM and how long it takes.

Each mode runs in its own process (peak RSS is per process): build the actor (a Qwen2 of ``--layers`` layers, hidden
``--hidden``, fp32), take ``--steps`` AdamW steps on a random batch (forward, backward, step), read the optimizer's
state bytes and the process's peak RSS, then build a vLLM engine (CPU) and time ``--syncs`` syncs: full weights
streamed into the engine (``update_weights``), or the adapter written as a peft directory and loaded as a new adapter
version (``load_adapter``). Peak trainer memory is read before the engine exists.

    python benchmarks/lora_vs_full.py [--layers 8 --hidden 512 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(mode: str, model_dir: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from vapo_pl.lora import LoRAConfig, adapter_items, add_adapters, peft_config_dict
    from vapo_pl.rollout.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    if mode == "lora":
        add_adapters(actor, cfg)
    params = [p for p in actor.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(2, actor.config.vocab_size, (args.batch, args.seq_len))
    for _ in range(args.steps):
        loss = actor(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in actor.parameters())

    rank = min(r for r in (8, 16, 32, 64, 128, 256) if r >= args.rank)
    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=args.seq_len, enforce_eager=True,
                        enable_lora=mode == "lora", max_lora_rank=rank)
    times, sent = [], 0
    for v in range(args.syncs):
        with torch.no_grad():
            for p in params:
                p.add_(1e-3)  # new weights each time
        t0 = time.perf_counter()
        if mode == "lora":
            items = list(adapter_items(actor))
            engine.load_adapter(iter(items), peft_config_dict(cfg, model_dir), v + 1)
        else:
            items = [(n, t.detach()) for n, t in actor.state_dict().items()]
            engine.update_weights(iter(items))
        times.append(time.perf_counter() - t0)
        sent = sum(t.numel() * t.element_size() for _, t in items)
    return {"mode": mode, "trainable_params": trainable, "total_params": total, "optimizer_state_bytes": opt_bytes,
            "peak_trainer_rss_gb": peak_gb, "sync_bytes": sent, "sync_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "mode model_dir out.json"
    args = ap.parse_args()
    if args.one:
        mode, model_dir, out = args.one.split()
        Path(out).write_text(json.dumps(measure(mode, model_dir, args)))
        return

    from vapo_pl.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    model = build_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=args.hidden // 64, num_kv_heads=args.hidden // 128 or 1, seed=0)
    rows = {}
    for mode in ("full", "lora"):
        out = work / f"{mode}.json"
        cmd = [sys.executable, __file__, "--one", f"{mode} {model} {out}", *sys.argv[1:]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows[mode] = json.loads(out.read_text())
    f, lo = rows["full"], rows["lora"]
    print(f"Qwen2, {args.layers} layers, hidden {args.hidden}, {f['total_params'] / 1e6:.1f} M parameters; LoRA rank "
          f"{args.rank} on every projection; batch {args.batch} x {args.seq_len} tokens, fp32, CPU")
    print(f"{'':28s} {'full':>14s} {'lora':>14s} {'lora / full':>12s}")
    for key, label, fmt in (("trainable_params", "trainable parameters", "{:,.0f}"),
                            ("optimizer_state_bytes", "optimizer state (MB)", "{:.1f}"),
                            ("peak_trainer_rss_gb", "peak trainer RSS (GB)", "{:.2f}"),
                            ("sync_bytes", "bytes per sync (MB)", "{:.2f}"),
                            ("sync_s", "sync time (s)", "{:.3f}")):
        scale = 1 / 2**20 if key.endswith("bytes") else 1
        a, b = f[key] * scale, lo[key] * scale
        print(f"{label:28s} {fmt.format(a):>14s} {fmt.format(b):>14s} {b / a:12.4f}")


if __name__ == "__main__":
    main()
