"""Peak memory of chunked vs naive token log-probs on CPU.

    python benchmarks/logprob_memory.py                       # (4, 512, 150000) float32, ~1.2 GB of logits
    python benchmarks/logprob_memory.py --batch 2 --seq 128   # quicker

Compares ``vapo_pl.algorithms.logprob.logprobs_from_logits`` with the naive
``torch.log_softmax(logits / T, -1).gather(-1, labels)``, for inference (no grad, as when
computing old/ref log-probs) and for training (forward + backward).

How it measures: ``torch.cuda.max_memory_allocated`` has no CPU counterpart and ``tracemalloc``
does not see torch's allocator, so each case runs in a fresh Python process and reports the growth
of the process's resident-set high-water mark (``resource.getrusage(...).ru_maxrss``) during the
call, after the logits exist and the kernels are warmed up. That counts every page the call
touched at its worst moment, whichever allocator served it. Linux only (ru_maxrss in KiB).

In training both versions must also hold the gradient of the logits (one full (B, T, V) tensor);
the figures include it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("naive-infer", "chunked-infer", "naive-train", "chunked-train")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(mode: str, batch: int, seq: int, vocab: int, chunk_size: int, temperature: float) -> dict:
    import torch

    from vapo_pl.algorithms.logprob import logprobs_from_logits

    def naive(logits, labels):
        return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)

    def chunked(logits, labels):
        return logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk_size)

    fn = naive if mode.startswith("naive") else chunked
    train = mode.endswith("train")

    def run(logits, labels):
        if train:
            logits.requires_grad_()
            logp = fn(logits, labels)
            logp.sum().backward()
        else:
            with torch.no_grad():
                fn(logits, labels)

    gen = torch.Generator().manual_seed(0)
    run(torch.randn(4, 8, 64, generator=gen), torch.randint(0, 64, (4, 8), generator=gen))  # warm-up
    logits = torch.randn(batch, seq, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    before = _peak_rss_bytes()
    start = time.perf_counter()
    run(logits, labels)
    seconds = time.perf_counter() - start
    return {"mode": mode, "extra_peak_bytes": _peak_rss_bytes() - before, "seconds": seconds}


def _run_case(mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        *("--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)),
        *("--chunk-size", str(args.chunk_size), "--temperature", str(args.temperature)),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = _worker(args.worker, args.batch, args.seq, args.vocab, args.chunk_size, args.temperature)
        print(json.dumps(result))
        return

    logits_bytes = args.batch * args.seq * args.vocab * 4
    print(
        f"logits ({args.batch}, {args.seq}, {args.vocab}) float32 = {logits_bytes / 2**20:.0f} MiB, "
        f"chunk_size {args.chunk_size} rows, temperature {args.temperature}"
    )
    results = {mode: _run_case(mode, args) for mode in MODES}
    print(f"{'case':<15}{'extra peak MiB':>16}{'x logits':>10}{'seconds':>10}")
    for mode, r in results.items():
        mib = r["extra_peak_bytes"] / 2**20
        print(f"{mode:<15}{mib:>16.0f}{r['extra_peak_bytes'] / logits_bytes:>10.2f}{r['seconds']:>10.2f}")
    for kind in ("infer", "train"):
        naive = results[f"naive-{kind}"]["extra_peak_bytes"]
        chunked = max(results[f"chunked-{kind}"]["extra_peak_bytes"], 1)
        print(f"{kind}: naive / chunked extra peak = {naive / chunked:.1f}x")
    # The logits' gradient is the same unavoidable (B, T, V) tensor in both; what remains is overhead.
    naive_over = results["naive-train"]["extra_peak_bytes"] - logits_bytes
    chunked_over = max(results["chunked-train"]["extra_peak_bytes"] - logits_bytes, 1)
    print(
        f"train beyond the logits' gradient: naive {naive_over / 2**20:.0f} MiB, "
        f"chunked {chunked_over / 2**20:.0f} MiB ({naive_over / chunked_over:.1f}x)"
    )


if __name__ == "__main__":
    main()
