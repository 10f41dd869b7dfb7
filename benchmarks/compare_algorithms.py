"""VAPO against vanilla PPO, GRPO and DAPO, and VAPO's seven ablations, on an embedded task: equal RL steps and
rollout batch per step.

Every run is ``vapo-pl fit`` on a config derived from ``configs/demo.yaml`` (same base policy, same prompts per
step x samples per prompt, same number of RL steps, same held-out evaluation); only the algorithm changes. What is
not equal is the number of samples generated: VAPO's value pretraining and DAPO's extra sampling rounds draw more,
so the table counts them and the plot shows accuracy against samples generated too.
Writes ``<out>/compare.md`` (final held-out accuracy as mean and spread over seeds, steps to reach 0.8, whether
a run collapsed, samples generated) and ``<out>/compare.png`` (held-out accuracy against RL step and against samples
generated), plus the raw curves as JSON. ``--replot <out>/compare_curves.json`` redraws both from the curves.

    python benchmarks/compare_algorithms.py                      # the full comparison (3 seeds; long)
    python benchmarks/compare_algorithms.py --task long          # on the long task (configs/demo_long.yaml)
    python benchmarks/compare_algorithms.py --runs vapo grpo --seeds 1 --steps 10
    # after changing VAPO's settings in demo.yaml: train VAPO and its ablations again, keep the baselines
    python benchmarks/compare_algorithms.py --reuse docs/results/compare_curves.json --retrain vapo wo_...
    python benchmarks/compare_algorithms.py --task long --replot docs/results/long/compare_curves.json

Value pretraining is shared: a run whose pretraining would be the same as an earlier run's of the same seed (same
config apart from algorithm fields pretraining never reads, e.g. the ablations of Decoupled-GAE, Clip-Higher or the
LM loss) loads the critic that run saved instead of pretraining again; its samples and minutes still count that
pretraining. Such a run starts RL at the first prompts, where its producer starts after the pretraining batches.
``--no-share-pretraining`` turns this off.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # task -> (config, output folder, accuracy threshold for "steps to")
    "demo": ("configs/demo.yaml", "docs/results", 0.8),
    "long": ("configs/demo_long.yaml", "docs/results/long", 0.5),
    "tools": ("configs/demo_tools.yaml", "docs/results/tools", 0.9),  # the base policy starts near 0.5
}
BASELINE_SEEDS_RUNS = ("vapo", "ppo", "grpo", "dapo")
ABLATIONS = ("wo_value_pretraining", "wo_decoupled_gae", "wo_length_adaptive_gae", "wo_clip_higher",
             "wo_token_level_loss", "wo_positive_example_lm_loss", "wo_group_sampling")
# variants of VAPO beyond the paper, run only when named (with --seeds seeds)
EXTRAS = ("vapo_critic_replay", "vapo_logprob_critic", "wo_group_sampling_logprob_critic")
ALL_RUNS = BASELINE_SEEDS_RUNS + ABLATIONS + EXTRAS


def _drop_callback(cfg: dict, name: str) -> None:
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith(name)]


def _ungroup(cfg: dict) -> None:
    """Same samples per step, one sample per prompt (the paper's 8192 x 1 against 512 x 16)."""
    data = cfg["data"]["init_args"]
    data["prompts_per_step"] *= data["samples_per_prompt"]
    data["samples_per_prompt"] = 1


def make_config(base: dict, run: str) -> dict:
    """The demo config with ``run``'s algorithm; everything that is not the algorithm stays as in the demo."""
    cfg = copy.deepcopy(base)
    algo = cfg["model"]["init_args"]["algorithm"]
    data = cfg["data"]["init_args"]
    lam = algo.get("lambda_policy", 0.95)
    if run == "vapo":
        pass
    elif run == "ppo":  # the paper's vanilla PPO: sample-level loss, eps 0.2, lambda 0.95 for both, no extras
        _drop_callback(cfg, "ValuePretraining")
        algo.update(lambda_critic=lam, length_adaptive_alpha=None, eps_high=algo["eps_low"],
                    loss_agg_mode="seq-mean-token-mean", nll_coef=0.0)
        _ungroup(cfg)
    elif run in ("grpo", "dapo"):
        _drop_callback(cfg, "ValuePretraining")
        algo.update(estimator="grpo", length_adaptive_alpha=None, nll_coef=0.0)
        if run == "grpo":  # DeepSeekMath: sample-level loss, symmetric clip, k3 KL loss to the reference
            algo.update(eps_high=algo["eps_low"], loss_agg_mode="seq-mean-token-mean", kl_loss_coef=0.001)
        else:  # DAPO: clip-higher, token-level loss, dynamic sampling, overlong shaping
            algo.update(loss_agg_mode="token-mean")
            data.update(dynamic_sampling=True, max_sampling_rounds=3)
            max_len = data["max_response_length"]
            data["reward"] = list(data["reward"]) + [
                {"name": "overlong", "kwargs": {"max_length": max_len, "cache_length": max(1, max_len // 5)}}]
    elif run == "wo_value_pretraining":
        _drop_callback(cfg, "ValuePretraining")
    elif run == "wo_decoupled_gae":
        algo["lambda_critic"] = lam
    elif run == "wo_length_adaptive_gae":
        algo["length_adaptive_alpha"] = None
    elif run == "wo_clip_higher":
        algo["eps_high"] = algo["eps_low"]
    elif run == "wo_token_level_loss":
        algo["loss_agg_mode"] = "seq-mean-token-mean"
    elif run == "wo_positive_example_lm_loss":
        algo["nll_coef"] = 0.0
    elif run == "wo_group_sampling":
        _ungroup(cfg)
    elif run == "vapo_critic_replay":  # the critic-only passes of RL steps also draw from the last 4 batches
        algo["critic_replay_batches"] = 4
        ppo = algo.get("ppo_epochs", 1)
        if (algo.get("critic_epochs") or ppo) <= ppo:  # the replay trains the critic-only passes: at least one
            algo["critic_epochs"] = ppo + 1
    elif run == "vapo_logprob_critic":  # the critic also reads the written tokens' log-probs (its own pretraining)
        cfg["model"]["init_args"]["critic_logprob_features"] = True
    elif run == "wo_group_sampling_logprob_critic":  # both: more prompts per step and the log-prob head
        cfg["model"]["init_args"]["critic_logprob_features"] = True
        _ungroup(cfg)
    else:
        raise ValueError(f"unknown run {run!r}; valid: {', '.join(ALL_RUNS)}")
    return cfg


# algorithm fields that value pretraining never reads (it trains the critic alone on Monte-Carlo returns)
_NOT_READ_BY_PRETRAINING = ("lambda_policy", "lambda_critic", "length_adaptive_alpha", "eps_low", "eps_high",
                            "loss_agg_mode", "nll_coef", "critic_replay_batches")


def pretraining_key(cfg: dict, seed: int) -> str | None:
    """Runs with equal keys pretrain the same critic: the config without what pretraining never reads. None when the
    run has no value pretraining."""
    if not any(c["class_path"].endswith("ValuePretraining") for c in cfg["trainer"]["callbacks"]):
        return None
    rest = copy.deepcopy(cfg)
    algo = rest["model"]["init_args"]["algorithm"]
    for k in _NOT_READ_BY_PRETRAINING:
        algo.pop(k, None)
    rest["seed_everything"] = seed
    return json.dumps(rest, sort_keys=True)


def read_curve(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return sorted({e.step: e.value for e in acc.Scalars(tag)}.items())


def run_one(base: dict, run: str, seed: int, steps: int | None, work: Path, eval_every: int | None = None,
            shared: dict | None = None) -> dict:
    """Train one run. ``shared`` (key -> producing result) lets runs whose value pretraining would be the same as an
    earlier run's (``pretraining_key``) load that run's pretrained critic instead of pretraining again."""
    cfg = make_config(base, run)
    key = pretraining_key(cfg, seed) if shared is not None else None
    producer = shared.get(key) if key is not None else None
    if key is not None:
        pre = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ValuePretraining"))
        pre["init_args"] = dict(pre.get("init_args") or {})
        critic_id = _next_critic_id(shared) if producer is None else producer["_critic_id"]
        critic_file = work / f"pretrained_critic_{critic_id}.pt"
        pre["init_args"]["load_path" if producer else "save_path"] = str(critic_file)
    ev = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("Evaluation"))["init_args"]
    if eval_every is not None:
        ev["every_n_steps"] = eval_every
    cfg["seed_everything"] = seed
    cfg["model"]["init_args"]["seed"] = seed
    cfg["data"]["init_args"]["seed"] = seed
    if steps is not None:
        cfg["trainer"]["max_steps"] = steps
    name = f"{run}/seed{seed}"
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(work / "tb"), "name": name, "version": 0}}
    cfg["trainer"]["enable_checkpointing"] = False
    cfg["trainer"]["enable_progress_bar"] = False
    path = work / f"{run}_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    log_file = work / f"{run}_seed{seed}.log"
    with log_file.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "vapo_pl.cli", "fit", "--config", str(path)], cwd=REPO,
                              stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy(), check=False)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log_file}")
    tag = f"eval/{ev.get('name', 'heldout')}_mean@{ev.get('samples_per_prompt', 4)}"
    log_dir = work / "tb" / name / "version_0"
    # rollout budget: samples generated for training, value pretraining and DAPO's extra sampling rounds included
    data = cfg["data"]["init_args"]
    per_round = data["prompts_per_step"] * data["samples_per_prompt"]
    rounds = sum(v for _, v in read_curve(log_dir, "rollout/sampling_rounds"))
    pretrain_steps = len(read_curve(log_dir, "pretrain/value_loss"))
    pretrain_ev = read_curve(log_dir, "pretrain/explained_var")
    pretrain_seconds = 0.0
    if producer is not None:  # the critic it loaded cost the producer's pretraining samples and time
        pretrain_steps, pretrain_ev = producer["pretrain_steps"], producer["pretrain_explained_var"]
        pretrain_seconds = producer["pretrain_seconds"]
    result = {"run": run, "seed": seed, "seconds": seconds + pretrain_seconds, "tag": tag,
              "accuracy": read_curve(log_dir, tag), "length": read_curve(log_dir, "rollout/response_length_mean"),
              "tool_call_rate": read_curve(log_dir, f"eval/{ev.get('name', 'heldout')}_tool_call_rate"),
              "explained_var": read_curve(log_dir, "critic/explained_var"),
              "explained_var_mc": read_curve(log_dir, "critic/explained_var_mc"), "pretrain_explained_var": pretrain_ev,
              "pretrain_steps": pretrain_steps, "samples": int(per_round * (rounds + pretrain_steps)),
              "per_round": per_round, "sampling_rounds": read_curve(log_dir, "rollout/sampling_rounds"),
              "max_steps": cfg["trainer"]["max_steps"], "eval_every": ev["every_n_steps"],
              "pretrained_critic_from": producer["run"] if producer else None}
    if key is not None and producer is None:
        result["_critic_id"] = critic_id
        result["pretrain_seconds"] = _pretrain_seconds(log_dir)
        shared[key] = result
    return result


def _next_critic_id(shared: dict) -> int:
    return 1 + max((r["_critic_id"] for r in shared.values()), default=-1)


def register_reused_critic(shared: dict | None, base: dict, old: dict, work: Path) -> bool:
    """Make a reused run's pretrained critic available to the runs still to train, when its file is still in ``work``
    (a comparison resumed in the same work directory). Returns whether it was registered."""
    if shared is None or old.get("_critic_id") is None:
        return False
    if not (work / f"pretrained_critic_{old['_critic_id']}.pt").is_file():
        return False
    key = pretraining_key(make_config(base, old["run"]), old["seed"])
    if key is None or key in shared:
        return False
    shared[key] = old
    return True


def _pretrain_seconds(log_dir: Path) -> float:
    """Wall time from the first to the last value-pretraining step (TensorBoard's event times)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "pretrain/value_loss" not in acc.Tags()["scalars"]:
        return 0.0
    times = [e.wall_time for e in acc.Scalars("pretrain/value_loss")]
    return max(times) - min(times)


def summarise(results: list[dict], threshold: float = 0.8) -> list[dict]:
    rows = []
    for run in dict.fromkeys(r["run"] for r in results):
        runs = [r for r in results if r["run"] == run]
        finals = [r["accuracy"][-1][1] for r in runs if r["accuracy"]]
        reach = [next((s for s, a in r["accuracy"] if a >= threshold), None) for r in runs]
        # collapsed: ended well below its own best (lost what it had learned)
        collapsed = sum(1 for r in runs if r["accuracy"] and
                        max(a for _, a in r["accuracy"]) - r["accuracy"][-1][1] > 0.2)
        reached = [s for s in reach if s is not None]
        tooled = [r for r in runs if r.get("tool_call_rate")]
        evs = [v for r in runs for _, v in r.get("explained_var", []) if not math.isnan(v)]
        early = [v for r in runs for s, v in r.get("explained_var", []) if s <= 10 and not math.isnan(v)]
        first = [r["explained_var"][0][1] for r in runs if r.get("explained_var")]
        # against Monte-Carlo returns (differs from the above only when lambda_critic < 1); runs from before the
        # metric existed have none
        with_mc = [r for r in runs if r.get("explained_var_mc")]
        mc = [v for r in with_mc for _, v in r["explained_var_mc"] if not math.isnan(v)]
        # the mean of the last 5 pretraining steps (each measured on a fresh batch before its update)
        pre = [statistics.mean(v for _, v in r["pretrain_explained_var"][-5:]) for r in runs
               if r.get("pretrain_explained_var")]
        rows.append({
            "threshold": threshold,
            "critic_ev": statistics.mean(evs) if evs else None,
            "critic_ev_early": statistics.mean(early) if early else None,
            "first_rl_ev": statistics.mean(first) if first else None,
            "pretrain_ev": statistics.mean(pre) if pre else None,
            "critic_ev_mc": f"{statistics.mean(mc):.2f} ({len(with_mc)}/{len(runs)})" if mc else "—",
            "run": run, "seeds": len(runs), "base": statistics.mean(r["accuracy"][0][1] for r in runs),
            "final_mean": statistics.mean(finals), "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "steps_to": (f"{statistics.mean(reached):.0f} ({len(reached)}/{len(runs)})" if reached else "never"),
            "collapsed": f"{collapsed}/{len(runs)}", "samples": statistics.mean(r.get("samples", 0) for r in runs),
            "minutes": statistics.mean(r["seconds"] for r in runs) / 60,
            "tool_rate": (f"{statistics.mean(r['tool_call_rate'][0][1] for r in tooled):.2f} -> "
                          f"{statistics.mean(r['tool_call_rate'][-1][1] for r in tooled):.2f}") if tooled else "—",
        })
    return rows


def samples_at(result: dict, per_round: int) -> list[tuple[int, float]]:
    """Samples generated by each evaluation step of ``result`` (value pretraining first, then each RL step's sampling
    rounds). Results written before the per-step rounds were kept spread their RL samples evenly over the steps."""
    per_round = result.get("per_round", per_round)
    pretrain = per_round * result.get("pretrain_steps", 0)
    rounds = dict(result.get("sampling_rounds") or [])
    rl_total = result.get("samples", 0) - pretrain
    out = []
    for step, _ in result["accuracy"]:
        if rounds:
            drawn = per_round * sum(v for s, v in rounds.items() if s <= step)
        else:
            drawn = rl_total * step / max(1, result.get("max_steps") or 1)
        out.append((step, pretrain + drawn))
    return out


def write_outputs(results: list[dict], rows: list[dict], out: Path, per_round: int = 128) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_curves.json").write_text(json.dumps(results, indent=1))
    threshold = rows[0]["threshold"] if rows else 0.8
    header = (f"| run | seeds | base acc | final acc (mean ± sd) | steps to {threshold} (runs reaching) | collapsed "
              "| critic EV, last 5 pretraining steps | critic EV at RL step 1 | critic EV, RL steps 1-10 "
              "| critic EV, all RL steps | critic EV vs Monte-Carlo returns, all RL steps (runs) | samples generated "
              "| held-out tool-call rate, first -> last | min/run |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(x):
        return "—" if x is None else f"{x:.2f}"

    for r in rows:
        lines.append(f"| {r['run']} | {r['seeds']} | {r['base']:.3f} | {r['final_mean']:.3f} ± {r['final_std']:.3f} | "
                     f"{r['steps_to']} | {r['collapsed']} | {num(r.get('pretrain_ev'))} | {num(r.get('first_rl_ev'))} | "
                     f"{num(r.get('critic_ev_early'))} | {num(r.get('critic_ev'))} | {r.get('critic_ev_mc', '—')} | "
                     f"{r['samples']:.0f} | {r.get('tool_rate', '—')} | {r['minutes']:.1f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]  # 20 distinct colours, the strong ones first
    panels = ((axes[0], BASELINE_SEEDS_RUNS, False), (axes[1], BASELINE_SEEDS_RUNS, True),
              (axes[2], ("vapo",) + ABLATIONS + EXTRAS, False))
    for ax, runs, by_samples in panels:
        for k, run in enumerate(runs):
            mine = [r for r in results if r["run"] == run and r["accuracy"]]
            if not mine:
                continue
            curves = [r["accuracy"] for r in mine]
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
            xs = steps
            if by_samples:
                drawn = [samples_at(r, per_round) for r in mine]
                xs = [statistics.mean(d[i][1] for d in drawn if i < len(d)) for i in range(len(steps))]
            color = colors[k % len(colors)]
            ax.plot(xs, mean, marker="o", ms=3, color=color, ls="--" if run in EXTRAS else "-",
                    label=f"{run} (n={len(curves)})")
            if len(curves) > 1:
                lo = [min(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
                hi = [max(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("samples generated (value pretraining and extra sampling rounds included)" if by_samples
                      else "RL step")
        ax.set_ylabel("held-out accuracy (mean@k)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"VAPO vs baselines: equal RL steps, {per_round} samples per step", fontsize=10)
    axes[1].set_title("the same runs by samples generated (not equal)", fontsize=10)
    axes[2].set_title(f"VAPO ablations: equal RL steps, {per_round} samples per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="demo", help="sets --config, --out and the threshold")
    ap.add_argument("--config", default=None, help="base config (default: the task's)")
    ap.add_argument("--runs", nargs="*", default=list(BASELINE_SEEDS_RUNS + ABLATIONS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for VAPO and the baselines")
    ap.add_argument("--ablation-seeds", type=int, default=1, help="seeds for each ablation")
    ap.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    ap.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every this many RL steps")
    ap.add_argument("--out", default=None, help="where the table, plot and curves go (default: the task's)")
    ap.add_argument("--work", default=None, help="where configs, logs and TensorBoard runs go (default: a temp dir)")
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="compare_curves.json or partial_results.json of an earlier comparison: its (run, seed) "
                         "results are taken as they are instead of trained again, except for --retrain's runs")
    ap.add_argument("--retrain", nargs="*", default=[], help="runs trained again even when --reuse holds them")
    ap.add_argument("--no-share-pretraining", action="store_true",
                    help="every run pretrains its own critic (default: runs whose value pretraining would be the "
                         "same as an earlier run's of the same seed load that run's pretrained critic)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="redraw the table and plot from a comparison's compare_curves.json; trains nothing")
    args = ap.parse_args()
    unknown = sorted(set(args.runs + args.retrain) - set(ALL_RUNS))
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}; valid: {', '.join(ALL_RUNS)}")
    reused = {}
    if args.reuse:
        try:
            earlier = json.loads(Path(args.reuse).read_text())
            reused = {(r["run"], r["seed"]): r for r in earlier if r["run"] not in args.retrain}
        except (OSError, ValueError, TypeError, KeyError) as err:
            ap.error(f"--reuse {args.reuse}: not a comparison's results JSON ({type(err).__name__}: {err})")

    config, out, threshold = TASKS[args.task]
    base = yaml.safe_load(Path(args.config or REPO / config).read_text())
    per_round = base["data"]["init_args"]["prompts_per_step"] * base["data"]["init_args"]["samples_per_prompt"]
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        write_outputs(results, summarise(results, threshold), Path(args.out or REPO / out), per_round)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="vapo_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps if args.steps is not None else base["trainer"]["max_steps"]
    results = []
    shared = None if args.no_share_pretraining else {}
    for run in args.runs:
        for seed in range(args.ablation_seeds if run in ABLATIONS else args.seeds):
            if (run, seed) in reused:
                old = reused[(run, seed)]
                if (old.get("max_steps"), old.get("eval_every")) != (steps, args.eval_every):
                    sys.exit(f"--reuse {args.reuse}: {run} seed {seed} ran {old.get('max_steps')} steps evaluated "
                             f"every {old.get('eval_every')}, this comparison {steps} every {args.eval_every}")
                results.append(old)
                shares = register_reused_critic(shared, base, old, work)
                print(f"{run:28s} seed {seed}: reused from {args.reuse}"
                      + (" (its pretrained critic is shared)" if shares else ""), flush=True)
                continue
            r = run_one(base, run, seed, args.steps, work, args.eval_every, shared)
            acc = r["accuracy"]
            print(f"{run:28s} seed {seed}: {acc[0][1] if acc else float('nan'):.3f} -> "
                  f"{acc[-1][1] if acc else float('nan'):.3f} in {r['seconds'] / 60:.1f} min", flush=True)
            results.append(r)
            (work / "partial_results.json").write_text(json.dumps(results))
    write_outputs(results, summarise(results, threshold), Path(args.out or REPO / out), per_round)


if __name__ == "__main__":
    main()
