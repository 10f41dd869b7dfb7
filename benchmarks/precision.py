"""bf16-mixed against float32 for the training pass: log-prob error (what enters the PPO ratio) and speed.

On one batch of the demo task (the demo base policy's own samples), computes the response tokens' log-probs
three ways and times forward + backward + AdamW:

- ``fp32``: the reference;
- ``bf16-mixed``: ``torch.autocast(bfloat16)`` with float32 master weights, as ``trainer.precision: bf16-mixed``
  runs it, with the output head in float32 (``vapo_pl.common.fp32_forward``, what the trainer does);
- ``bf16-mixed, bf16 head``: the same without the float32 head (what plain autocast would give).

Prints max and mean absolute log-prob error against fp32, the error of the ratio ``exp(logp - logp_fp32)``, and
each variant's seconds per step (median of ``--repeats``, alternating). Run alone on the machine.

    python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None, help="model directory (default: the demo base policy)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vapo_pl.algorithms.logprob import logprobs_from_logits
    from vapo_pl.common import fp32_forward
    from vapo_pl.demo import task
    from vapo_pl.demo.base_policy import encode_demo
    from vapo_pl.demo.prepare import policy_dir

    policy = policy_dir(args.policy)
    tok = AutoTokenizer.from_pretrained(policy)
    problems = task.read_split(task.TRAIN_FILE)[: args.batch]
    rows = [encode_demo(tok, p.prompt, p.solution()) for p in problems]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (r, start) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, start : len(r)] = True
    attn = ids.ne(tok.pad_token_id).long()
    targets = ids[:, 1:]
    tmask = mask[:, 1:]

    def build(fp32_head: bool):
        m = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        if fp32_head:
            fp32_forward(m.get_output_embeddings())
        return m

    variants = {"fp32": (build(False), False), "bf16-mixed": (build(True), True),
                "bf16-mixed, bf16 head": (build(False), True)}

    def logp(model, autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            return logprobs_from_logits(logits, targets, 1.0)

    with torch.no_grad():
        ref = logp(*variants["fp32"])
        out = {}
        for name, (model, autocast) in variants.items():
            lp = logp(model, autocast)
            err = (lp - ref).abs()[tmask]
            ratio = (lp - ref).exp()[tmask]
            out[name] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                         "ratio_max_dev": float((ratio - 1).abs().max())}

    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, (model, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (model, autocast) in variants.items():
            t0 = time.perf_counter()
            loss = -(logp(model, autocast) * tmask).sum() / tmask.sum()
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    print(f"{len(rows)} sequences, {int(tmask.sum())} response tokens, {args.threads} threads")
    print(f"{'variant':<24} {'max |dlogp|':>12} {'mean |dlogp|':>13} {'max |ratio-1|':>14} {'s/step':>8} {'vs fp32':>8}")
    for name in variants:
        t = statistics.median(times[name])
        out[name]["seconds"] = t
        r = out[name]
        print(f"{name:<24} {r['max_abs']:>12.2e} {r['mean_abs']:>13.2e} {r['ratio_max_dev']:>14.2e} {t:>8.3f} "
              f"{t / base:>8.2f}")
    return out


if __name__ == "__main__":
    main()
