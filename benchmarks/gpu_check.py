"""One-GPU check of the training path: bf16 fit through the CLI, autocast per phase, host syncs, packed vs padded
log-probs, and memory at 16k tokens with a 152k vocabulary.

    python benchmarks/gpu_check.py --out gpu_check.json     # one NVIDIA GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --cpu --out cpu.json      # the same checks on CPU with small sizes (< 2 min)

For a machine whose image has torch, lightning and transformers but not vLLM, math-verify, DeepSpeed or
TensorBoard: rollouts use the ``hf`` engine, the reward is the rule-based ``overlong`` term, no logger is
configured, and the script blocks those four packages (``sys.modules[name] = None``) before importing anything, so
a run here proves the check does not need them (``--no-block`` lifts the block). Everything it trains on is built
here: a tiny Qwen2 with a small character vocabulary (``vapo_pl.tiny``, so that random samples end at EOS often
enough for the rewards to vary) and the bundled demo prompts (``vapo_pl/demo/data/train.jsonl``).

Checks (each ``{"pass": bool, ...}`` in the JSON summary):

1. ``fit_bf16``: ``vapo_pl.cli.main(["fit", ...])`` in this process, ``trainer.precision: bf16-mixed``, 3 RL steps,
   ``ValuePretraining`` (2 steps, replay over 2 batches) and critic replay (``algorithm.critic_replay_batches: 2``,
   ``critic_epochs: 2``); passes when the CLI returns 0 after 3 RL steps and 2 pretraining steps whose metrics are
   all finite (explained variance may be NaN: by definition when the returns do not vary) and the replay ran.
2. ``autocast``: ``vapo_pl.diagnostics.FitProbe`` (a callback of that fit) records ``torch.is_autocast_enabled``
   in forward pre-hooks of the actor and the critic, per phase; passes when it was on in the critic's forwards of
   value pretraining and in the actor's and the critic's forwards of the update.
3. ``host_syncs``: the same probe counts host syncs per RL step and inside every micro-batch loop (the update's, the
   old log-probs', the critic-first pass'), with the lines that made them (``vapo_pl.diagnostics.HostSyncCounter``;
   GPU: ``torch.cuda.set_sync_debug_mode("warn")``, one per warning; CPU: the calls that would sync on a GPU, with
   host and accelerator tensors told apart as the module docstring there says); passes when the micro-batch loops
   made none.
4. ``packed_vs_padded``: ``vapo_pl.forward.policy_logprobs`` of one batch packed (``row_tokens``) and padded
   (``None``): float32 (tolerance ``FP32_TOL``) and under bf16 autocast (``BF16_TOL`` on the largest difference);
   on GPU also with only the flash SDPA kernel allowed, where a mask that flash cannot take is recorded, not raised.
5. ``memory_16k``: forward + backward of ``policy_logprobs`` (packed, padded, packed with the head recomputed per
   chunk) and ``critic_values`` (packed, padded) at 16k tokens with vocabulary 151936 on a 2-layer Qwen2 of hidden
   size 512 (GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before, under bf16 autocast with the
   output head in float32, as the module runs them); CPU: 1k tokens, vocabulary 32000, float32, measured as the
   bytes of every vocabulary-wide matmul output (the logits), forward and backward. Passes when every measure stays
   below the float32 logits of all the tokens (tokens x vocab x 4 bytes): the prompt's logits were not materialised.

Exit code 0 when every check passes, 1 otherwise; the JSON summary is the last line of stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHECKS = ("fit_bf16", "autocast", "host_syncs", "packed_vs_padded", "memory_16k")
OPTIONAL_MODULES = ("vllm", "math_verify", "deepspeed", "tensorboard", "tensorboardX")
# The demo prompts' characters and the chat template's (Q, A, :, newline): 17 tokens + <pad> + <eos>, so a random
# tiny model ends a response at EOS within 16 tokens about half the time.
CHARS = "0123456789+-=?QA:\n "
FP32_TOL = 1e-3  # largest |packed - padded| log-prob difference in float32 (rounding alone is ~1e-6)
BF16_TOL = 0.1  # ... under bf16 autocast (bf16 attention and MLP, float32 head), in nats
FORCE_FLASH = False  # the flash-only variants on CPU too (torch's CPU flash kernel takes masks): to test this script
QWEN_VOCAB = 151936  # Qwen2.5's vocabulary (the 7B+ checkpoints pad it to 152064)

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}


def overall(checks: dict[str, dict[str, Any]]) -> bool:
    """Whether the run passes: every check of ``CHECKS`` is present and its ``pass`` is ``True``."""
    return all(isinstance(checks.get(name), dict) and checks[name].get("pass") is True for name in CHECKS)


def block_optional_modules() -> list[str]:
    """Make ``import vllm`` (etc.) fail as on a machine without them; returns the names blocked."""
    blocked = []
    for name in OPTIONAL_MODULES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            blocked.append(name)
    return blocked


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


# --------------------------------------------------------------------------------------------------- the batch
def make_batch(vocab: int, prompt_lens: list[int], response_lens: list[int], device: Any, seed: int = 0):
    """A ``RolloutBatch`` of random tokens: prompts left-padded, responses right-padded (token 0 = pad)."""
    import torch

    from vapo_pl.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    b, p, t = len(prompt_lens), max(prompt_lens), max(response_lens)
    ids = torch.zeros(b, p + t, dtype=torch.long)
    attention = torch.zeros(b, p + t, dtype=torch.long)
    response_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (pl_, rl) in enumerate(zip(prompt_lens, response_lens)):
        ids[i, p - pl_ : p] = torch.randint(2, vocab, (pl_,), generator=g)
        ids[i, p : p + rl] = torch.randint(2, vocab, (rl,), generator=g)
        attention[i, p - pl_ : p + rl] = 1
        response_mask[i, :rl] = True
    lengths = response_mask.sum(1)
    batch = RolloutBatch(input_ids=ids, attention_mask=attention, response_mask=response_mask,
                         rollout_logprobs=torch.zeros(b, t), scores=torch.zeros(b), correct=torch.zeros(b, dtype=torch.bool),
                         lengths=lengths, truncated=torch.zeros(b, dtype=torch.bool), group_index=torch.arange(b),
                         weight_version=0)
    return batch.to(device)


# --------------------------------------------------------------------------------------------------- check 4
def check_packed_vs_padded(model_dir: Path, device: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from vapo_pl.forward import keep_output_head_in_fp32, policy_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    keep_output_head_in_fp32(model)
    vocab = model.config.vocab_size
    batch = make_batch(vocab, prompt_lens=[9, 20, 14, 31, 5, 26], response_lens=[16, 7, 30, 12, 24, 3], device=device)
    # packed: several sequences share a row of 64; packed_alone: rows of 8, so every sequence (all longer) runs alone
    # in a row of its own length (no mask: what SDPA's flash kernel can run); padded: the (B, P + T) batch as it is
    variants = {"packed": 64, "packed_alone": 8, "padded": None}
    mask = batch.response_mask

    def logp(row: int | None, autocast: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return policy_logprobs(model, batch, 1.0, 1024, row)[0].float()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs()[mask].max())

    out: dict[str, Any] = {"tokens": int(batch.attention_mask.sum()), "row_tokens": variants,
                           "fp32_tol": FP32_TOL, "bf16_tol": BF16_TOL}
    fp32 = {name: logp(row, False) for name, row in variants.items()}
    bf16 = {name: logp(row, True) for name, row in variants.items()}
    ok = True
    for name in ("packed", "packed_alone"):
        out[f"{name}_fp32_max_abs_diff"] = diff(fp32[name], fp32["padded"])
        out[f"{name}_bf16_max_abs_diff"] = diff(bf16[name], bf16["padded"])
        out[f"{name}_bf16_mean_abs_diff"] = float((bf16[name] - bf16["padded"]).abs()[mask].mean())
        ok = ok and out[f"{name}_fp32_max_abs_diff"] <= FP32_TOL and out[f"{name}_bf16_max_abs_diff"] <= BF16_TOL
    out["bf16_vs_fp32_max_abs_diff"] = max(diff(bf16[name], fp32[name]) for name in variants)
    if FORCE_FLASH or device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        flash: dict[str, Any] = {}
        got = {}
        for name, row in variants.items():
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    got[name] = logp(row, True)
                flash[name] = "ran"
            except RuntimeError as e:  # flash takes no attention mask: recorded, not raised
                flash[name] = f"flash cannot run: {_error(e)}"
        reference = got.get("padded", bf16["padded"])  # padded with flash, else with the default kernels
        for name, t in got.items():
            flash[f"{name}_vs_default_kernel_max_abs_diff"] = diff(t, bf16[name])
            if name != "padded":
                flash[f"{name}_vs_padded_max_abs_diff"] = diff(t, reference)
                ok = ok and flash[f"{name}_vs_padded_max_abs_diff"] <= BF16_TOL
        out["flash"] = flash
    out["pass"] = bool(ok)
    return out


# --------------------------------------------------------------------------------------------------- check 5
@contextlib.contextmanager
def vocab_outputs(vocab: int):
    """Count the outputs of ``torch.nn.functional.linear`` that are ``vocab`` wide (the logits, wherever the head is
    computed: ``nn.Linear`` and ``vapo_pl.forward``'s response-only head both call it): total bytes, the largest one,
    and rows (tokens) in total."""
    import torch

    seen = {"bytes": 0, "largest": 0, "rows": 0}
    original = torch.nn.functional.linear

    def linear(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        if out.shape[-1] == vocab:
            size = out.numel() * out.element_size()
            seen["bytes"] += size
            seen["largest"] = max(seen["largest"], size)
            seen["rows"] += out.numel() // vocab
        return out

    torch.nn.functional.linear = linear
    try:
        yield seen
    finally:
        torch.nn.functional.linear = original


def check_memory(device: Any, tokens: int, vocab: int, hidden: int, seqs: int, response: int) -> dict[str, Any]:
    """Forward + backward of ``policy_logprobs`` (packed, padded, packed with the head recomputed per chunk) and
    ``critic_values`` (packed, padded) on ``seqs`` sequences of ``tokens / seqs`` tokens, the last ``response`` of
    them the response, with the output head in float32 (as ``VAPOModule`` runs them), under bf16 autocast on GPU (on
    CPU, where bf16 is emulated and slow, in float32: the logits counted are float32 either way)."""
    import torch
    from torch import nn
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vapo_pl.critic import ValueModel
    from vapo_pl.forward import critic_values, keep_output_head_in_fp32, policy_logprobs

    per_seq = tokens // seqs
    prompt = per_seq - response
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=max(per_seq, 512), tie_word_embeddings=False)
    torch.manual_seed(0)
    actor = Qwen2ForCausalLM(config).to(device).train()
    keep_output_head_in_fp32(actor)
    critic = ValueModel(actor.model, nn.Linear(hidden, 1)).to(device).train()  # a backbone + value head
    batch = make_batch(vocab, [prompt] * seqs, [response] * seqs, device)
    full_fp32 = tokens * vocab * 4
    autocast = device.type == "cuda"
    chunk = min(1024, max(1, response // 2))  # two chunks per sequence at least: the head recomputed per chunk
    cases = {
        "policy_packed": lambda: policy_logprobs(actor, batch, 1.0, 1024, 128)[0],
        "policy_padded": lambda: policy_logprobs(actor, batch, 1.0, 1024, None)[0],
        "policy_packed_checkpoint_head": lambda: policy_logprobs(actor, batch, 1.0, chunk, 128, checkpoint_head=True)[0],
        "critic_packed": lambda: critic_values(critic, batch, 128),
        "critic_padded": lambda: critic_values(critic, batch, None),
    }
    gib = 2**30
    out: dict[str, Any] = {"tokens": tokens, "sequences": seqs, "prompt_tokens_per_seq": prompt,
                           "response_tokens_per_seq": response, "vocab": vocab, "hidden": hidden, "layers": 2,
                           "bf16_autocast": autocast,
                           "full_logits_fp32_gib": full_fp32 / gib,
                           "prompt_logits_fp32_gib": seqs * prompt * vocab * 4 / gib,
                           "measure": "peak cuda memory above the weights and batch" if device.type == "cuda"
                           else "bytes of vocabulary-wide matmul outputs (logits), forward and backward"}
    ok = True
    try:
        for name, fn in cases.items():
            actor.zero_grad(set_to_none=True)
            critic.zero_grad(set_to_none=True)
            case: dict[str, Any] = {}
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                with vocab_outputs(vocab) as logits:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        y = fn()
                    y.float().sum().backward()
                del y
                case["logits_gib"] = logits["bytes"] / gib
                case["largest_logits_gib"] = logits["largest"] / gib
                case["logits_rows"] = logits["rows"]
                measured = logits["bytes"]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    measured = torch.cuda.max_memory_allocated() - base
                    case["peak_gib"] = measured / gib
                case["pass"] = measured < full_fp32
            except torch.OutOfMemoryError as e:
                case = {"pass": False, "error": _error(e)}
            ok = ok and case["pass"]
            out[name] = case
    finally:
        cases.clear()
        actor = critic = batch = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["pass"] = bool(ok)
    return out


# --------------------------------------------------------------------------------------------------- checks 1-3
def fit_config(work: Path, model_dir: Path, gpu: bool) -> Path:
    """The fit's config. CPU (where bf16 is emulated, ~10x slower than float32): 2 prompts x 4 samples of at most 12
    tokens, minibatches of 4 in micro-batches of 2; GPU: 4 x 4 samples of at most 64 tokens, 8 and 4."""
    import yaml

    response_len, prompts, minibatch, micro = (64, 4, 8, 4) if gpu else (12, 2, 4, 2)

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed", "max_steps": 3,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(work / "fit"),
            "callbacks": [
                {"class_path": "vapo_pl.callbacks.ValuePretraining", "init_args": {"steps": 2, "replay_batches": 2}},
                {"class_path": "vapo_pl.diagnostics.FitProbe", "init_args": {"sync_mode": "auto"}},
            ],
        },
        "model": {"class_path": "vapo_pl.VAPOModule", "init_args": {
            "model_path": str(model_dir),
            "algorithm": {"minibatch_size": minibatch, "micro_batch_size": micro, "ppo_epochs": 1, "critic_epochs": 2,
                          "critic_replay_batches": 2},
            "optim": {"actor_lr": 1e-4, "critic_lr": 1e-4},
        }},
        "data": {"class_path": "vapo_pl.RolloutDataModule", "init_args": {
            "train_files": str(REPO / "vapo_pl/demo/data/train.jsonl"),
            "max_prompt_length": 48, "max_response_length": response_len, "prompts_per_step": prompts,
            "samples_per_prompt": 4,
            # rule-based, no math-verify: -length/max over the whole range, so responses ending at EOS score more
            "reward": [{"name": "overlong", "kwargs": {"cache_length": response_len}}],
            "engine": {"kind": "hf", "dtype": "float32"},
        }},
    }
    path = work / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_fit(config: Path) -> tuple[dict[str, Any], Any]:
    """``vapo-pl fit --config config`` in this process; returns (the fit's record, the probe)."""
    from vapo_pl import cli
    from vapo_pl.diagnostics import FitProbe

    FitProbe.last = None
    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    try:
        record["exit_code"] = cli.main(["fit", "--config", str(config)])
    except SystemExit as e:  # a parse error exits
        record["exit_code"] = e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        record["exit_code"] = None
        record["error"] = _error(e)
        record["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    probe = FitProbe.last
    if probe is not None:
        probe.remove()
    return record, probe


def fit_checks(record: dict[str, Any], probe: Any) -> dict[str, dict[str, Any]]:
    if probe is None or not probe.fit_started:
        failed = {"pass": False, "error": record.get("error", "the fit did not start"), "fit": record}
        return {"fit_bf16": failed, "autocast": {"pass": False, "error": "no fit"},
                "host_syncs": {"pass": False, "error": "no fit"}}
    s = probe.summary()
    last = s["step_metrics"][-1] if s["step_metrics"] else {}
    replay = [k for k in last if k.startswith("critic/replay_")]
    fit = {**record, "rl_steps": s["rl_steps"], "pretrain_steps": s["pretrain_steps"],
           "nonfinite_metrics": s["nonfinite_metrics"], "replay_metrics": sorted(replay)}
    fit["timings_mean_s"] = {k.removeprefix("perf/"): round(sum(m.get(k, 0.0) for m in s["step_metrics"])
                                                            / len(s["step_metrics"]), 3)
                             for k in sorted(last) if k.startswith("perf/") and k.endswith("_s")}
    fit["last_step"] = {k: last[k] for k in ("rollout/reward_mean", "actor/pg_loss", "critic/value_loss",
                                             "critic/replay_value_loss", "critic/explained_var") if k in last}
    fit["pass"] = (record.get("exit_code") == 0 and s["rl_steps"] == 3 and s["pretrain_steps"] == 2
                   and not s["nonfinite_metrics"] and bool(replay))
    autocast = s["autocast"]
    hs = s["host_syncs"] or {}
    regions = hs.get("regions", {})

    def region(name: str) -> dict[str, Any]:
        return regions.get(name, {"count": 0, "entries": 0, "per_entry": [], "sources": {}})

    mb = region("micro_batch")
    loops = {name.split("/", 1)[1]: {"count": r["count"], "iterations": r["entries"]}
             for name, r in regions.items() if name.startswith("micro_batch/")}
    syncs = {
        "mode": hs.get("mode"),
        "per_step": region("rl_step")["per_entry"],
        "value_pretraining": region("value_pretraining")["count"],
        "micro_batch": mb["count"],
        "micro_batch_iterations": mb["entries"],
        "per_micro_batch": mb["count"] / mb["entries"] if mb["entries"] else None,
        "micro_batch_by_loop": loops,
        "micro_batch_sources": mb["sources"],
        "step_sources": region("rl_step")["sources"],
        "pass": mb["entries"] > 0 and mb["count"] == 0,
    }
    return {"fit_bf16": fit, "autocast": autocast, "host_syncs": syncs}


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU with small sizes (CI)")
    ap.add_argument("--out", help="also write the JSON summary here")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed)")
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset (the others are reported "
                    "as skipped, and the run fails)")
    ap.add_argument("--no-block", action="store_true", help="do not block vllm/math_verify/deepspeed/tensorboard")
    args = ap.parse_args(argv)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    blocked = [] if args.no_block else block_optional_modules()
    t0 = time.perf_counter()

    import torch

    gpu = not args.cpu
    summary: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "blocked_modules": blocked}
    checks: dict[str, dict[str, Any]] = {}
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        ap.error(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")
    if gpu and not torch.cuda.is_available():
        summary["error"] = "no CUDA device (use --cpu for the CPU variant)"
        checks = {name: {"pass": False, "error": summary["error"]} for name in CHECKS}
    else:
        device = torch.device("cuda" if gpu else "cpu")
        summary["device"] = torch.cuda.get_device_name(0) if gpu else "cpu"
        summary["versions"] = {"torch": torch.__version__}
        for name in ("lightning", "transformers"):
            summary["versions"][name] = __import__(name).__version__
        tmp = tempfile.TemporaryDirectory(prefix="gpu_check_") if not args.work else None
        work = Path(args.work or tmp.name)
        work.mkdir(parents=True, exist_ok=True)
        try:
            from vapo_pl.tiny import build_tiny_model

            # hidden 64 on CPU (bf16 is emulated there), the tests' 128 on GPU
            model_dir = build_tiny_model(work / "model", chars=CHARS, hidden_size=128 if gpu else 64, seed=0)
            steps = [("packed_vs_padded", lambda: check_packed_vs_padded(model_dir, device))]
            if gpu:
                steps.append(("memory_16k", lambda: check_memory(device, 16384, QWEN_VOCAB, 512, 4, 1024)))
            else:
                steps.append(("memory_16k", lambda: check_memory(device, 1024, 32000, 64, 4, 32)))
            for name, fn in steps:
                if name not in wanted:
                    continue
                t = time.perf_counter()
                try:
                    checks[name] = fn()
                except Exception as e:  # noqa: BLE001 - a check that crashes fails, the others still run
                    checks[name] = {"pass": False, "error": _error(e)}
                checks[name]["wall_s"] = round(time.perf_counter() - t, 1)
            if {"fit_bf16", "autocast", "host_syncs"} & set(wanted):
                record, probe = run_fit(fit_config(work, model_dir, gpu))
                for name, result in fit_checks(record, probe).items():
                    if name in wanted:
                        checks[name] = result
        finally:
            if tmp is not None:
                tmp.cleanup()
    for name in CHECKS:
        checks.setdefault(name, {"pass": False, "skipped": True})
    summary["checks"] = {name: checks[name] for name in CHECKS}
    summary["ok"] = overall(summary["checks"])
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(summary, default=str)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    sys.stdout.flush()
    print(line, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
