"""Seconds per RL step: vapo-pl against TRL's ``GRPOTrainer`` on one workload, run alternately in one invocation.

The workload: a randomly initialised Qwen2 of about 2.3 M parameters (4 layers, hidden 192, the project's character
tokenizer), ``a+b=`` prompts, 32 prompts x 8 samples per step, up to 96 new tokens, temperature 1, GRPO without a
KL term, one optimizer step per batch in micro-batches of 64, AdamW, fp32, one process. The reward (1 when the
completion's first number is the sum) is the same function for both. TRL generates with transformers; vapo-pl
with vLLM (its rollout engine). Each run is its own process; runs alternate (TRL, vapo-pl, TRL, vapo-pl, ...) so
load hits both alike; the first ``--warmup`` steps of a run are not counted.

Also: VAPO (GAE with a critic) on the same workload, for VAPO step / GRPO step; the training pass against the
machine's FLOP bound (6 x parameters x real tokens at the fp32 matmul rate measured here); and the packed and
reused-forward paths against the padded two-forward path (``--runs grpo grpo-padded``), and bf16-mixed
training against fp32 (``--runs grpo grpo-bf16``), and overlapped rollouts (``data.max_staleness: 1``, the engine in its
own process generating the next batch during the update, token TIS) against on-policy (``--runs grpo grpo-overlap``).

TRL is not a dependency of vapo-pl. Install it into a separate environment layered on the project's venv:

    python3 -m venv .venv-bench
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-bench/lib/python3.11/site-packages/vapo_main.pth
    .venv-bench/bin/pip install trl==1.16.0          # adds trl and accelerate only
    .venv/bin/python benchmarks/vs_trl.py             # finds .venv-bench/bin/python for the TRL runs

(or ``pip install -e '.[bench]'`` into one venv; accelerate then changes some transformers defaults there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench_vs_trl"
PROMPTS, SAMPLES, MAX_NEW, MICRO = 32, 8, 96, 64
TEMPLATE = "Q: {prompt}\nA:"
_NUMBER = re.compile(r"-?\d+")


def sum_score(completion: str, answer: str) -> float:
    m = _NUMBER.search(completion)
    return float(m is not None and m.group(0) == answer)


def vapo_reward(inputs):
    """vapo-pl's side of the shared reward (``RewardInput`` -> ``RewardOutput``)."""
    import torch

    from vapo_pl.rewards import RewardOutput

    s = torch.tensor([sum_score(r, a) for r, a in zip(inputs.responses, inputs.answers)])
    return RewardOutput(scores=s, correct=s > 0)


def build_workload() -> tuple[Path, Path]:
    """The model directory and the prompt file, built once into ``.cache/bench_vs_trl``."""
    import random

    from vapo_pl.tiny import build_tiny_model

    model = CACHE / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, seed=0, hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2)
    data = CACHE / "prompts.jsonl"
    if not data.exists():
        rng = random.Random(0)
        rows = []
        for _ in range(2048):
            a, b = rng.randrange(100), rng.randrange(100)
            rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


# ---------------------------------------------------------------------------------------------- the runs
def run_vapo(steps: int, estimator: str, packing: bool, reuse: bool, precision: str = "32-true",
             overlap: bool = False) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import lightning.pytorch as pl
    import torch

    from vapo_pl import RolloutDataModule, VAPOModule
    from vapo_pl.config import AlgorithmConfig, OptimConfig
    from vapo_pl.rewards.base import RewardTerm
    from vapo_pl.rollout.config import EngineConfig

    model, data = build_workload()
    gae = estimator == "gae"
    algo = AlgorithmConfig(estimator=estimator, kl_loss_coef=0.0, kl_reward_coef=0.0, ppo_epochs=1,
                           minibatch_size=PROMPTS * SAMPLES, micro_batch_size=MICRO, nll_coef=0.1 if gae else 0.0,
                           length_adaptive_alpha=0.05 if gae else None,
                           rollout_correction="token_tis" if overlap else "none")
    module = VAPOModule(model_path=str(model), algorithm=algo, optim=OptimConfig(actor_lr=1e-5, critic_lr=1e-5),
                        packing=packing, reuse_update_forward=reuse)
    dm = RolloutDataModule(train_files=str(data), template=TEMPLATE, max_prompt_length=16,
                           max_response_length=MAX_NEW, prompts_per_step=PROMPTS, samples_per_prompt=SAMPLES,
                           engine=EngineConfig(kind="vllm", dtype="float32"),
                           reward=[RewardTerm(name="benchmarks.vs_trl:vapo_reward")], max_staleness=int(overlap))
    records: list[dict] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = dict(outputs["metrics"])
            m["step_s"] = time.perf_counter() - self.t
            m["real_tokens"] = float(outputs["rollout"].attention_mask.sum())
            records.append(m)

    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
                         precision=precision)
    trainer.fit(module, datamodule=dm)
    params = sum(p.numel() for p in module.actor.parameters())
    return {"records": records, "params": params}


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir, data = build_workload()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "answer": r["answer"]} for r in rows])

    def reward(prompts, completions, answer, **kwargs):
        return [sum_score(c, a) for c, a in zip(completions, answer)]

    records: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            records.append({"step_s": time.perf_counter() - self.t})

        def on_log(self, args, state, control, logs=None, **kw):
            if records and logs:
                records[-1].update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=MICRO,
                         gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO, num_generations=SAMPLES,
                         max_completion_length=MAX_NEW, temperature=1.0, beta=0.0, num_iterations=1,
                         learning_rate=1e-5, max_steps=steps, logging_steps=1, report_to="none",
                         save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
        trainer.train()
    return {"records": records, "params": sum(p.numel() for p in model.parameters())}


def matmul_gflops(seconds: float = 3.0) -> float:
    """The fp32 matmul rate of this machine at the shapes of the training pass (tokens x hidden x 4 hidden)."""
    import torch

    a, b = torch.randn(4096, 192), torch.randn(192, 768)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 4096 * 192 * 768 * n / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------------------------------------- the driver
def _child(kind: str, steps: int, python: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--steps", str(steps), "--out", out]
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def _summary(records: list[dict], warmup: int) -> dict:
    kept = records[warmup:]
    mean = lambda k: statistics.mean(r[k] for r in kept) if kept and k in kept[0] else float("nan")  # noqa: E731
    return {"step_s": mean("step_s"), "spread": (min(r["step_s"] for r in kept), max(r["step_s"] for r in kept)),
            "generate_s": mean("perf/generate_s"), "forward_s": mean("perf/forward_s"),
            "update_s": mean("perf/update_s"), "sync_s": mean("perf/sync_s"), "rollout_s": mean("perf/rollout_s"),
            "wait_s": mean("perf/rollout_wait_s") if kept and "perf/rollout_wait_s" in kept[0] else 0.0,
            "length": mean("rollout/response_length_mean") if "rollout/response_length_mean" in kept[0]
            else mean("completions/mean_length"), "real_tokens": mean("real_tokens"), "steps": len(kept)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="RL steps per run (the first --warmup are not counted)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the runs")
    ap.add_argument("--runs", nargs="+", default=["trl", "grpo", "vapo"],
                    choices=["trl", "grpo", "vapo", "grpo-padded", "grpo-bf16", "grpo-overlap"],
                    help="which runs (the others than trl are vapo-pl)")
    ap.add_argument("--trl-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kinds = {"trl": lambda: run_trl(args.steps),
                 "grpo": lambda: run_vapo(args.steps, "grpo", packing=True, reuse=True),
                 "grpo-padded": lambda: run_vapo(args.steps, "grpo", packing=False, reuse=False),
                 "vapo": lambda: run_vapo(args.steps, "gae", packing=True, reuse=True),
                 "grpo-bf16": lambda: run_vapo(args.steps, "grpo", packing=True, reuse=True, precision="bf16-mixed"),
                 "grpo-overlap": lambda: run_vapo(args.steps, "grpo", packing=True, reuse=True, overlap=True)}
        Path(args.out).write_text(json.dumps(kinds[args.child]()))
        return
    build_workload()
    if "trl" in args.runs and not Path(args.trl_python).exists():
        sys.exit(f"--trl-python {args.trl_python} does not exist: see this script's docstring for the TRL venv")
    results: dict[str, list[dict]] = {k: [] for k in args.runs}
    rates = []  # the matmul rate drifts on shared machines (90-167 GFLOP/s seen): probed before every round
    for r in range(args.rounds):
        rates.append(matmul_gflops())
        for kind in args.runs:
            python = args.trl_python if kind == "trl" else sys.executable
            t0 = time.perf_counter()
            res = _child(kind, args.steps, python)
            s = _summary(res["records"], args.warmup)
            s["params"] = res["params"]
            results[kind].append(s)
            print(f"round {r + 1} {kind:12s} {s['step_s']:.2f} s/step (min {s['spread'][0]:.2f}, max "
                  f"{s['spread'][1]:.2f}; run {time.perf_counter() - t0:.0f} s)", flush=True)
    rates.append(matmul_gflops())
    gflops = max(rates)  # the bound at the fastest rate seen: the conservative share of it
    print(f"\nmachine: {os.cpu_count()} cores, fp32 matmul {gflops:.1f} GFLOP/s at the training pass's shapes (the "
          f"fastest of {len(rates)} probes: {', '.join(f'{x:.0f}' for x in rates)})")
    print(f"workload: {PROMPTS} prompts x {SAMPLES} samples, <= {MAX_NEW} new tokens, micro-batches of {MICRO}, "
          f"model {results[args.runs[0]][0]['params'] / 1e6:.2f} M parameters\n")
    print("| run | s/step (each round) | generate | old log-prob forward | update | wait for the batch ahead | sync "
          "| mean length |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, rs in results.items():
        steps = " / ".join(f"{x['step_s']:.2f}" for x in rs)
        avg = lambda k: statistics.mean(x[k] for x in rs)  # noqa: E731
        print(f"| {kind} | {steps} | {avg('generate_s'):.2f} | {avg('forward_s'):.2f} | {avg('update_s'):.2f} | "
              f"{avg('wait_s'):.2f} | {avg('sync_s'):.2f} | {avg('length'):.1f} |")
    step = {k: statistics.mean(x["step_s"] for x in rs) for k, rs in results.items()}
    if "trl" in step and "grpo" in step:
        print(f"\nvapo-pl GRPO step / TRL step: {step['grpo'] / step['trl']:.2f}")
    if "vapo" in step and "grpo" in step:
        print(f"VAPO step / GRPO step: {step['vapo'] / step['grpo']:.2f}")
    if "grpo-bf16" in step and "grpo" in step:
        print(f"GRPO bf16-mixed / fp32: {step['grpo-bf16'] / step['grpo']:.2f} (log-prob error: "
              "benchmarks/precision.py)")
    if "grpo-overlap" in step and "grpo" in step:
        on = results["grpo"]
        floor = statistics.mean(max(x["generate_s"], x["forward_s"] + x["update_s"]) + x["sync_s"] for x in on)
        print(f"GRPO overlapped (max_staleness 1) / on-policy: {step['grpo-overlap'] / step['grpo']:.2f}; the "
              f"on-policy phases give max(generate, forward + update) + sync = {floor:.2f} s/step as the floor of "
              f"perfect overlap ({floor / step['grpo']:.2f} of on-policy)")
    if "grpo-padded" in step and "grpo" in step:
        print(f"GRPO packed + one forward / padded + two forwards: {step['grpo'] / step['grpo-padded']:.2f}")
    if "grpo" in results:
        rs = results["grpo"]
        params = rs[0]["params"]
        tokens = statistics.mean(x["real_tokens"] for x in rs)
        bound = 6 * params * tokens / (gflops * 1e9)
        train = statistics.mean(x["update_s"] + x["forward_s"] for x in rs)
        print(f"GRPO training pass: {train:.2f} s for {tokens:.0f} real tokens; FLOP bound (6 x params x tokens at "
              f"the matmul rate) {bound:.2f} s: {bound / train:.0%} of the bound")


if __name__ == "__main__":
    main()
