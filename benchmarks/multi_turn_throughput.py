"""Multi-turn against single-turn rollout throughput: tokens generated per second for the same number of tokens.

Both sides are ``RolloutDataModule.next_batch()`` on the same vLLM engine settings and the same tiny model:

- single-turn: ``prompts x samples`` responses of up to ``turns x turn_tokens`` tokens, one generate call;
- multi-turn: the same episodes split into ``turns`` turns of up to ``turn_tokens`` tokens
  (``episode.max_turn_tokens``), an environment answering each turn with a short observation; every turn is a
  generate call over the episodes still running, prefix caching on.

On CPU the multi-turn DataModule builds its engine with KV blocks of 32 tokens (vLLM's CPU default is 128, and its
prefix cache reuses whole blocks only, so with 128 every turn recomputed the episode's whole context: 0.69 of
single-turn throughput before that change); ``--same-block-size`` gives the single-turn engine 32 as well.

Throughput is generated (policy) tokens divided by generate seconds, and by the whole rollout's seconds (which adds
the environments, tokenising observations, scoring and batching). Runs alternate A and B ``--reps`` times after a
warm-up each; the ratio of medians is printed. Run it alone: two CPU-heavy jobs on 2 cores distort each other.

    python benchmarks/multi_turn_throughput.py [--prompts 16 --samples 8 --turns 4 --turn-tokens 16 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vapo_pl.envs import Environment, StepResult


class Echo(Environment):
    """Answers every turn with a short fixed observation until the episode's turns are used."""

    turns = 4

    def __init__(self) -> None:
        self.turn = 0

    def reset(self, record, prompt):
        return prompt

    def step(self, turn_ids, turn_text):
        self.turn += 1
        if self.turn >= self.turns:
            return StepResult(None, done=True)
        return StepResult(f"\nok {self.turn}\nA:")


def build(model: Path, prompts_file: Path, args, multi: bool):
    from vapo_pl import RolloutDataModule

    Echo.turns = args.turns
    kw = {"train_files": str(prompts_file), "model_path": str(model), "max_prompt_length": 32,
              "max_response_length": args.turns * (args.turn_tokens + 8), "prompts_per_step": args.prompts,
              "samples_per_prompt": args.samples, "reward": [{"name": "math_verify"}],
              "engine": {"kind": "vllm", "dtype": "float32", "enforce_eager": True}}
    if multi:
        kw.update(environment=Echo, episode={"max_turns": args.turns, "max_total_tokens": 4096,
                                             "max_turn_tokens": args.turn_tokens})
    else:
        kw["max_response_length"] = args.turns * args.turn_tokens
        if args.same_block_size:  # the multi-turn DataModule's CPU block size for the single-turn engine too
            kw["engine"]["block_size"] = 32
    dm = RolloutDataModule(**kw)
    dm.setup("fit")
    return dm


def measure(dm) -> dict[str, float]:
    batch = dm.next_batch()
    s = batch.stats
    tokens = float(batch.response_mask.sum())
    return {"tokens": tokens, "generate_s": s["perf/generate_s"], "rollout_s": s["perf/rollout_s"],
            "gen_tok_s": tokens / s["perf/generate_s"], "rollout_tok_s": tokens / s["perf/rollout_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--same-block-size", action="store_true",
                    help="single-turn engine with the multi-turn one's CPU KV block size (32) instead of vLLM's 128")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()

    import torch

    from vapo_pl.tiny import build_tiny_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="mt_bench_"))
    model = build_tiny_model(work / "model", hidden_size=128, num_layers=2, num_heads=4, seed=0)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=?", "answer": str(i + i % 7)}) + "\n"
                               for i in range(4096)))
    single, multi = build(model, prompts, args, False), build(model, prompts, args, True)
    measure(single), measure(multi)  # warm-up: first calls compile and fill caches
    runs: dict[str, list[dict[str, float]]] = {"single": [], "multi": []}
    for _ in range(args.reps):
        runs["single"].append(measure(single))
        runs["multi"].append(measure(multi))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"{args.prompts} prompts x {args.samples} samples, {args.turns} turns x {args.turn_tokens} tokens "
          f"(single-turn: one response of {args.turns * args.turn_tokens}); medians of {args.reps} alternating runs")
    print(f"{'':12s} {'tokens':>8s} {'generate s':>11s} {'rollout s':>10s} {'gen tok/s':>10s} {'rollout tok/s':>14s}")
    for k in ("single", "multi"):
        m = med[k]
        print(f"{k:12s} {m['tokens']:8.0f} {m['generate_s']:11.3f} {m['rollout_s']:10.3f} {m['gen_tok_s']:10.0f} "
              f"{m['rollout_tok_s']:14.0f}")
    gen = med["multi"]["gen_tok_s"] / med["single"]["gen_tok_s"]
    whole = med["multi"]["rollout_tok_s"] / med["single"]["rollout_tok_s"]
    print(f"multi-turn / single-turn throughput: generate {gen:.2f}, whole rollout {whole:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "generate_ratio": gen,
                                               "rollout_ratio": whole}, indent=1))


if __name__ == "__main__":
    main()
