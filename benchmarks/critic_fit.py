"""Critic diagnostic: can the value model learn the returns of a fixed policy, and how fast?

Generates rollouts of a policy once with vLLM (cached under ``.cache/critic_fit``), grades them with the
``math_verify`` reward, then trains only the critic, built and aligned exactly as the trainer builds it
(``VAPOModule.build_critic`` / ``critic_values``, the project's ``value_loss``), on Monte-Carlo returns
(lambda = 1, gamma = 1: every token's target is the response's score). Every ``--eval-every`` steps it prints
held-out explained variance, ``1 - Var[R - V] / Var[R]``, over all response tokens and at the first, middle
and last one, next to three references computed on the same held-out rollouts:

- ``batch mean``: the training mean return (0 by construction, up to the held-out shift);
- ``prompt only``: for each sample, the mean score of the other samples of its prompt (knows the prompt's
  success rate, sees nothing of the response);
- ``rule``: the task's own predictor from the response's visible state (for the demo task the carry rule of
  ``vapo_pl.demo.value_rule``): the ceiling to aim at.

    python benchmarks/critic_fit.py                                   # the demo base policy, trainer defaults
    python benchmarks/critic_fit.py --head-init random --head-lr 1e-2 --grad-clip 0 --steps 800
    python benchmarks/critic_fit.py --targets rule                    # learnability: fit the rule's values
    python benchmarks/critic_fit.py --task long --policy exports/step_000020 --logprob-features  # log-prob head

``--logprob-features`` builds the critic with its log-prob head (``model.critic_logprob_features``), computes the
sampled tokens' log-probs with the policy, and adds a fourth reference that sees only their running minimum (the
training success rate in each of 10 quantile bins of it).

``--targets rule`` trains on the rule's noise-free values instead of the returns (explained variance is still
measured against the returns). Run it alone on the machine: it is CPU-bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- rollouts (cached)
def rollouts(policy: Path, files: dict[str, str], n_prompts: dict[str, int], samples: int, max_tokens: int,
             seed: int, cache: Path, grade=None) -> dict[str, dict]:
    """``{"train": ..., "heldout": ...}``, each with prompts, prompt ids, response ids and texts, and scores.

    ``grade(texts, answers) -> (B,) bool`` defaults to the ``math_verify`` reward."""
    info = policy / "build_info.json"
    key = hashlib.sha256(json.dumps({
        "policy": str(policy.resolve()), "build": info.read_text() if info.is_file() else "",
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(policy.glob("*.safetensors"))],
        "files": files, "n": n_prompts, "samples": samples, "max_tokens": max_tokens, "seed": seed,
        "grade": getattr(grade, "__qualname__", "math_verify"),
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"rollouts-{key}.pt"
    if path.is_file():
        print(f"rollouts: cached {path}", flush=True)
        return torch.load(path, weights_only=False)

    from transformers import AutoTokenizer

    if grade is None:
        from vapo_pl.demo.evaluate import grade
    from vapo_pl.prompts import load_prompts, render_prompt
    from vapo_pl.rollout.base import Sampling
    from vapo_pl.rollout.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(policy)
    import json as _j
    limit = _j.loads((policy / "config.json").read_text()).get("max_position_embeddings", 4096)
    engine = VLLMEngine(policy, dtype="float32", max_model_len=limit, kv_cache_space_gb=1, enforce_eager=True,
                        seed=seed)
    out = {}
    for split, file in files.items():
        records = load_prompts(file, prompt_key="prompt", answer_key="answer")[: n_prompts[split]]
        t0 = time.perf_counter()
        ids = [tok(render_prompt(tok, r.prompt, "chat"), add_special_tokens=False).input_ids for r in records]
        comps = engine.generate(ids, Sampling(n=samples, temperature=1.0, max_tokens=max_tokens, seed=seed))
        resp_ids = [c.token_ids for cs in comps for c in cs]
        texts = tok.batch_decode(resp_ids, skip_special_tokens=True)
        answers = [r.answer for r in records for _ in range(samples)]
        scores = grade(texts, answers).float()
        out[split] = {
            "prompts": [r.prompt for r in records for _ in range(samples)],
            "prompt_ids": [i for i in ids for _ in range(samples)],
            "response_ids": resp_ids, "texts": texts, "scores": scores,
            "group": torch.arange(len(records)).repeat_interleave(samples),
        }
        print(f"rollouts: {split} {len(resp_ids)} samples, accuracy {scores.mean():.3f}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def to_batch(split: dict, idx: torch.Tensor, pad_id: int):
    """A ``RolloutBatch`` of rows ``idx``: prompts left-padded, responses right-padded, as the DataModule does."""
    from vapo_pl.batch import RolloutBatch

    rows = idx.tolist()
    p = max(len(split["prompt_ids"][i]) for i in rows)
    t = max(len(split["response_ids"][i]) for i in rows)
    b = len(rows)
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p + t), dtype=torch.long)
    resp_mask = torch.zeros((b, t), dtype=torch.bool)
    for j, i in enumerate(rows):
        pi, ri = split["prompt_ids"][i], split["response_ids"][i]
        input_ids[j, p - len(pi) : p] = torch.tensor(pi)
        input_ids[j, p : p + len(ri)] = torch.tensor(ri)
        attn[j, p - len(pi) : p + len(ri)] = 1
        resp_mask[j, : len(ri)] = True
    scores = split["scores"][idx]
    lengths = resp_mask.sum(1)
    logprobs = torch.zeros(b, t)
    if "logprobs" in split:
        for j, i in enumerate(rows):
            logprobs[j, : len(split["logprobs"][i])] = split["logprobs"][i]
    return RolloutBatch(input_ids=input_ids, attention_mask=attn, response_mask=resp_mask,
                        rollout_logprobs=logprobs, scores=scores, correct=scores > 0, lengths=lengths,
                        truncated=torch.zeros(b, dtype=torch.bool), group_index=split["group"][idx],
                        weight_version=0)


@torch.no_grad()
def add_logprobs(module, split: dict, pad_id: int) -> None:
    """``split["logprobs"]``: each response's sampled tokens' log-probs under the policy at temperature 1 (what
    the sampler reports), computed with the trainer's own ``policy_logprobs``."""
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(module.model_path, dtype=torch.float32).eval()
    out = []
    n = len(split["scores"])
    for i in range(0, n, 256):
        batch = to_batch(split, torch.arange(i, min(i + 256, n)), pad_id)
        logp, _ = module.policy_logprobs(actor, batch)
        out.extend(row[: int(k)] for row, k in zip(logp, batch.lengths))
    split["logprobs"] = out


def binned_reference(train_x: torch.Tensor, train_mask: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor,
                     bins: int = 10) -> torch.Tensor:
    """A predictor of one scalar feature: the training success rate within each of ``bins`` quantile bins."""
    edges = torch.quantile(train_x[train_mask], torch.linspace(0, 1, bins + 1)[1:-1])
    which = torch.bucketize(train_x.contiguous(), edges)
    rate = torch.full((bins,), float(train_y[train_mask].mean()))
    for k in range(bins):
        sel = (which == k) & train_mask
        if sel.any():
            rate[k] = train_y[sel].mean()
    return rate[torch.bucketize(x.contiguous(), edges)]


# ----------------------------------------------------------------------------- explained variance
def ev(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    from vapo_pl.algorithms.value import explained_variance

    return float(explained_variance(values, returns, mask))


def positions(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks of the first, middle and last response token of every row."""
    lengths = mask.sum(1)
    cols = torch.arange(mask.shape[1]).unsqueeze(0)
    out = {}
    for name, at in (("first", torch.zeros_like(lengths)), ("middle", lengths // 2), ("last", lengths - 1)):
        out[name] = mask & (cols == at.unsqueeze(1))
    return out


def report(name: str, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    row = {"all": ev(values, returns, mask)}
    row.update({k: ev(values, returns, m) for k, m in positions(mask).items()})
    print(f"  {name:<22} " + "  ".join(f"{k} {v:+.3f}" for k, v in row.items()), flush=True)
    return row


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, grade=None) -> dict:
    """Run the diagnostic; ``grade`` replaces the ``math_verify`` grading (tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None, help="policy directory (default: the task's base policy, built if needed)")
    ap.add_argument("--train-file", default=None, help="default: the task's training split")
    ap.add_argument("--heldout-file", default=None, help="default: the task's held-out split")
    ap.add_argument("--train-prompts", type=int, default=512)
    ap.add_argument("--heldout-prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 96 (demo), 140 (long)")
    ap.add_argument("--task", default="demo", choices=["demo", "long", "none"],
                    help="embedded task (base policy, splits and the carry rule as reference); none: no rule")
    ap.add_argument("--steps", type=int, default=400, help="minibatches (each --epochs optimizer steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1, help="optimizer steps per minibatch (critic epochs)")
    ap.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate")
    ap.add_argument("--head-lr", type=float, default=None, help="value head learning rate (default --lr)")
    ap.add_argument("--head-init", default="random", choices=["zero", "random"],
                    help="zero: values start at 0; random: nn.Linear's uniform init (model.critic_head_init)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--value-clip", type=float, default=0.5, help="0 = unclipped")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0 = off")
    ap.add_argument("--return-scale", type=float, default=1.0, help="targets multiplied by this (values divided back)")
    ap.add_argument("--targets", default="returns", choices=["returns", "rule"])
    ap.add_argument("--logprob-features", action="store_true",
                    help="critic with the log-prob head (model.critic_logprob_features); adds a reference that sees "
                         "only the running minimum of the written tokens' log-probs")
    ap.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    ap.add_argument("--stream-prompts", type=int, default=0,
                    help="draw minibatches as the trainer does: this many prompts' samples at a time, shuffled "
                         "among themselves (0: every minibatch drawn from all training rollouts)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the curve and references here")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "critic_fit"), help="where rollouts are cached")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = "long_" if args.task == "long" else ""
    args.train_file = args.train_file or str(REPO / f"vapo_pl/demo/data/{split}train.jsonl")
    args.heldout_file = args.heldout_file or str(REPO / f"vapo_pl/demo/data/{split}heldout.jsonl")
    args.max_tokens = args.max_tokens or (140 if args.task == "long" else 96)

    from vapo_pl.algorithms.aggregation import aggregate
    from vapo_pl.algorithms.value import value_loss
    from vapo_pl.demo.prepare import policy_dir
    from vapo_pl.module import VAPOModule

    policy = policy_dir(args.policy, task="long" if args.task == "long" else "demo")
    data = rollouts(policy, {"train": args.train_file, "heldout": args.heldout_file},
                    {"train": args.train_prompts, "heldout": args.heldout_prompts}, args.samples, args.max_tokens,
                    seed=1234, cache=Path(args.cache), grade=grade)
    train, held = data["train"], data["heldout"]
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(policy).pad_token_id

    rule = None
    if args.task in ("demo", "long"):
        from vapo_pl.demo.value_rule import RuleValue

        rule = RuleValue.fit(train["prompts"], train["texts"], train["scores"].tolist())
        print(f"rule: P(success | on track, k forks ahead) = {[round(x, 3) for x in rule.table]}", flush=True)

    def rule_values(split: dict, rows: list[int], width: int) -> torch.Tensor:
        return torch.tensor([rule.values(split["prompts"][i], split["texts"][i], width) for i in rows])

    hb = to_batch(held, torch.arange(len(held["scores"])), pad_id)
    mask = hb.response_mask
    returns = hb.scores.unsqueeze(1).expand_as(mask).float()
    print(f"held-out: {len(hb)} samples, accuracy {hb.scores.mean():.3f}, train accuracy "
          f"{train['scores'].mean():.3f}", flush=True)
    refs = {}
    print("references (held-out explained variance):", flush=True)
    refs["batch mean"] = report("batch mean", torch.full_like(returns, float(train["scores"].mean())), returns, mask)
    g, s = held["group"], held["scores"]
    sums = torch.zeros(int(g.max()) + 1).index_add_(0, g, s)
    cnt = torch.zeros(int(g.max()) + 1).index_add_(0, g, torch.ones_like(s))
    loo = ((sums[g] - s) / (cnt[g] - 1).clamp(min=1)).unsqueeze(1).expand_as(mask)
    refs["prompt only"] = report("prompt only (LOO)", loo, returns, mask)
    if rule is not None:
        refs["rule"] = report("rule", rule_values(held, list(range(len(hb))), mask.shape[1]), returns, mask)

    torch.manual_seed(args.seed)
    module = VAPOModule(model_path=str(policy), critic_head_init=args.head_init,
                        critic_logprob_features=args.logprob_features)
    if args.logprob_features:
        from vapo_pl.critic import logprob_state_features

        add_logprobs(module, train, pad_id)
        add_logprobs(module, held, pad_id)
        hb = to_batch(held, torch.arange(len(held["scores"])), pad_id)
        tb = to_batch(train, torch.arange(len(train["scores"])), pad_id)
        run_min = logprob_state_features(tb.rollout_logprobs, tb.response_mask)[..., 0]
        held_min = logprob_state_features(hb.rollout_logprobs, mask)[..., 0]
        train_returns = tb.scores.unsqueeze(1).expand_as(tb.response_mask).float()
        refs["logprob min"] = report("log-prob running min", binned_reference(
            run_min, tb.response_mask, train_returns, held_min), returns, mask)
    critic = module.build_critic()
    module.critic = critic
    head = list(critic.value_head.parameters())
    if critic.logprob_head is not None:
        head += list(critic.logprob_head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in critic.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr},
                             {"params": head, "lr": args.head_lr or args.lr}], weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) if args.warmup else 1.0)
    clip = args.value_clip or None
    scale = args.return_scale

    @torch.no_grad()
    def held_values() -> torch.Tensor:
        critic.eval()
        parts = [module.critic_values(hb.select(torch.arange(i, min(i + 256, len(hb))))) for i in range(0, len(hb), 256)]
        critic.train()
        return torch.cat(parts) / scale

    g = torch.Generator().manual_seed(args.seed)
    n = len(train["scores"])

    def permutation() -> torch.Tensor:
        if not args.stream_prompts:
            return torch.randperm(n, generator=g)
        groups = train["group"]
        prompts = torch.randperm(int(groups.max()) + 1, generator=g).split(args.stream_prompts)
        parts = []
        for chunk in prompts:
            rows = torch.nonzero(torch.isin(groups, chunk)).squeeze(1)
            parts.append(rows[torch.randperm(len(rows), generator=g)])
        return torch.cat(parts)

    order = permutation()
    pos = 0
    curve = []
    t_train = 0.0
    print(f"critic: {sum(p.numel() for p in critic.parameters()) / 1e3:.0f} k parameters; lr {args.lr}, head lr "
          f"{args.head_lr or args.lr}, head init {args.head_init}, value clip {clip}, grad clip "
          f"{args.grad_clip or None}, epochs {args.epochs}, return scale {scale}, targets {args.targets}, log-prob "
          f"features {args.logprob_features}", flush=True)
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            order, pos = permutation(), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        t0 = time.perf_counter()
        batch = to_batch(train, idx, pad_id)
        m = batch.response_mask
        if args.targets == "rule":
            target = rule_values(train, idx.tolist(), m.shape[1])
        else:
            target = batch.scores.unsqueeze(1).expand_as(m).float()
        target = target * scale
        with torch.no_grad():
            old = module.critic_values(batch)
        for _ in range(args.epochs):
            vl, _ = value_loss(module.critic_values(batch), old, target, m, clip)
            loss = aggregate(vl, m, "token-mean", num_tokens=m.sum().float())
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        t_train += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} ({step * args.batch_size} samples, {step * args.epochs} optimizer steps, "
                  f"{t_train:.0f} s of training):", flush=True)
            row = report("critic", held_values(), returns, mask)
            curve.append({"step": step, "seconds": t_train, **row})
    result = {"args": vars(args), "references": refs, "curve": curve}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
