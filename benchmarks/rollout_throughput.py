"""Rollout throughput on the tiny model: the DataModule's rollout path against raw ``LLM.generate``.

Prints generated tokens/s for
  1. raw ``vllm.LLM.generate`` (the same engine object, same prompts and sampling parameters),
  2. the engine wrapper (``VLLMEngine.generate``: seeds, flat log-probs, Completion objects),
  3. the full DataModule rollout path (``RolloutDataModule.next_batch``: generate, decode, verify with
     math-verify, pad into a RolloutBatch),
their ratios to (1), and the seconds one weight sync takes.

    python benchmarks/rollout_throughput.py [--prompts 64] [--samples 4] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vapo_pl.datamodule import RolloutDataModule
    from vapo_pl.rewards.base import RewardTerm
    from vapo_pl.rollout.config import EngineConfig
    from vapo_pl.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vapo_bench_"))
    model = build_tiny_model(work / "model", seed=0)
    data = work / "train.jsonl"
    n_prompts = args.prompts * (args.repeats + 1)
    data.write_text("".join(json.dumps({"prompt": f"{i}*{i % 13}+{i % 7}=?", "answer": str(i * (i % 13) + i % 7)})
                            + "\n" for i in range(n_prompts)))
    dm = RolloutDataModule(train_files=str(data), model_path=str(model), max_prompt_length=64,
                           max_response_length=args.max_tokens, prompts_per_step=args.prompts,
                           samples_per_prompt=args.samples, shuffle=False,
                           engine=EngineConfig(kind="vllm", dtype="float32"), reward=[RewardTerm(name="math_verify")])
    dm.setup("fit")
    engine = dm.engine
    prompts = dm.train_prompt_ids[: args.prompts]
    sampling = dm.training_sampling(seed=1)
    # what the engine asks vLLM for: sampled-token log-probs in flat form, no detokenisation (the DataModule
    # decodes in one batch call afterwards)
    params = SamplingParams(n=args.samples, temperature=sampling.temperature, max_tokens=args.max_tokens,
                            logprobs=0, flat_logprobs=True, detokenize=False, seed=1)
    vllm_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def raw() -> tuple[int, float]:
        t = time.perf_counter()
        outs = engine.llm.generate(vllm_prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t

    def wrapper() -> tuple[int, float]:
        t = time.perf_counter()
        outs = engine.generate(prompts, sampling)
        return sum(len(c.token_ids) for g in outs for c in g), time.perf_counter() - t

    def datamodule() -> tuple[int, float]:
        t = time.perf_counter()
        batch = dm.next_batch()
        return int(batch.lengths.sum()), time.perf_counter() - t

    raw(), wrapper(), datamodule()  # warm-up (first generate and the verifier workers' start-up)
    results = {}
    for name, fn in (("raw LLM.generate", raw), ("VLLMEngine.generate", wrapper), ("DataModule.next_batch", datamodule)):
        runs = [fn() for _ in range(args.repeats)]
        results[name] = statistics.median(tok / sec for tok, sec in runs)

    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model).state_dict()
    syncs = []
    for _ in range(5):
        t = time.perf_counter()
        engine.update_weights(weights.items())
        syncs.append(time.perf_counter() - t)

    base = results["raw LLM.generate"]
    print(f"tiny Qwen2 ({sum(v.numel() for v in weights.values()) / 1e6:.2f} M params), {args.prompts} prompts x "
          f"{args.samples} samples, max_tokens {args.max_tokens}, temperature {sampling.temperature}, "
          f"torch threads {torch.get_num_threads()}")
    for name, tps in results.items():
        print(f"{name:24s} {tps:10.0f} generated tokens/s   ratio to raw {tps / base:.3f}")
    print(f"weight sync (update_weights + prefix-cache reset): median {statistics.median(syncs):.3f} s over 5")


if __name__ == "__main__":
    main()
