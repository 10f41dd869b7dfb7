"""``vapo-pl plan``: the CLI through the front door, its verdicts on the paper config, and its terms against
measurement on CPU (``benchmarks/memory_plan_check.py`` on a small model)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vapo_pl import memory_plan
from vapo_pl.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
PAPER = REPO / "configs" / "vapo_qwen2.5_32b.yaml"
GiB = 2**30


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name bundled files relative to the repository root


def plan(capsys, *args: str) -> tuple[int, str, str]:
    """``vapo-pl plan <args>`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(["plan", *args])
    except SystemExit as e:  # a parse error: one line, exit 2
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_plan_through_the_console_script(tiny_model_dir):
    """The installed ``vapo-pl`` prints every term for the demo config (on its tiny model) and exits 0."""
    exe = Path(sys.executable).with_name("vapo-pl")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([str(exe), "plan", "--config", str(DEMO), "--model.init_args.model_path", str(tiny_model_dir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    for term in ("actor weights", "critic weights", "gradients (actor + critic)", "optimizer state",
                 "activations (actor + critic)", "without checkpointing", "with checkpointing", "<- configured",
                 "logits (response tokens)", "rollout batch tensors", "KV cache", "per token per layer", "PEAK",
                 "verdict: fits"):
        assert term in r.stdout, term
    assert "no reference model" in r.stdout  # demo: no KL term


def test_bad_inputs_are_one_line(capsys, tmp_path):
    code, out, err = plan(capsys, "--config", str(DEMO), "--model.init_args.model_path", str(tmp_path / "nowhere"))
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("error: model.model_path: ") and "no config.json" in err
    code, out, err = plan(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.count("\n") == 1 and "missing.yaml does not exist" in err
    code, out, err = plan(capsys, "--config", str(DEMO), "--gpu-memory-gb", "lots")
    assert code == 2 and err == "error: --gpu-memory-gb must be a number, got 'lots'\n"
    code, out, err = plan(capsys, "--config", str(DEMO), "--model.init_args.algorithm.eps_lo", "0.1")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("gb", [80, 141])
def test_paper_config_fits_one_node(capsys, gb):
    """The 32B config as shipped fits 8 GPUs of 80 GB and of 141 GB (the model from the built-in table)."""
    code, out, err = plan(capsys, "--config", str(PAPER), "--gpu-memory-gb", str(gb))
    assert code == 0, out + err
    assert "Qwen2.5-32B (built-in table" in out and "8 rank(s) on 1 node(s)" in out
    assert f"verdict: fits {gb} GiB GPUs" in out
    assert "DOES NOT FIT" not in out


def test_paper_config_without_offload_or_checkpointing_does_not_fit(capsys):
    code, out, _ = plan(capsys, "--config", str(PAPER), "--gpu-memory-gb", "80",
                        "--model.init_args.gradient_checkpointing", "false",
                        "--trainer.strategy.init_args.cpu_offload", "false",
                        "--data.init_args.engine.tensor_parallel_size", "1")
    assert code == 1
    assert "verdict: DOES NOT FIT 80 GiB GPUs" in out
    lines = out[out.index("suggestions, in order"):].splitlines()[1:]
    steps = [ln.split(":", 1)[0].strip() for ln in lines if ln.strip()[:2].rstrip(".").isdigit()]
    assert steps[0] == "1. turn on gradient checkpointing"
    assert any("cpu_offload" in ln for ln in lines) and any("tensor_parallel_size" in ln for ln in lines)
    assert "-> fits" in out


def test_formulas_by_hand():
    """One Qwen2.5-32B layer, one token, bf16 (FSDP2): norms 2*(4h + 4 + 2h) + 2*2h, attention (2h + 2kv)*2 + 4*40,
    MLP 4*i*2; and the KV cache of 64 layers x 8 KV heads x 128 x bf16 x (k, v), split by TP 8."""
    arch = memory_plan.BUILTIN_ARCHS["Qwen2.5-32B"]
    assert arch.causal_lm_params == 32_763_876_352  # the safetensors' parameter count
    h, kv, i = 5120, 1024, 27648
    per = memory_plan.activation_bytes_per_token_layer(arch, memory_plan.REGIMES["bf16"])
    assert per == 2 * (4 * h + 4 + 2 * h) + 2 * 2 * h + (2 * h + 2 * kv) * 2 + 4 * 40 + 4 * i * 2
    fp32 = memory_plan.activation_bytes_per_token_layer(arch, memory_plan.REGIMES["fp32"])
    assert fp32 == 4 * (8 * h + 2 * kv + 4 * i + 40 + 2)
    assert memory_plan.load_arch("/models/qwen2.5-7b-instruct").layers == 28


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_plan_check", REPO / "benchmarks" / "memory_plan_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_calibration_on_a_small_model(tmp_path):
    """Every term of the plan within 25% of what the real code allocates on CPU: weights, gradients and AdamW state
    exactly; activations with and without gradient checkpointing (a dense mask: 4 sequences, one padded row);
    logits, chunked and not."""
    bench = _benchmark()
    model = bench.build_model(tmp_path / "m", hidden=128, layers=3, heads=4, kv_heads=2, intermediate=512, vocab=2048)
    rows = bench.calibrate("small", ["--config", str(DEMO), f"--model.init_args.model_path={model}",
                                     "--data.init_args.max_response_length=64",
                                     "--model.init_args.algorithm.micro_batch_size=4",
                                     "--model.init_args.logprob_chunk_size=64"], model)
    print(bench.table(rows))
    assert len(rows) == 12
    assert all(r.ok for r in rows), bench.table([r for r in rows if not r.ok])
    exact = [r for r in rows if "weights" in r.term or r.term == "gradients"]
    assert all(r.plan == r.measured for r in exact)


def test_fit_stops_on_a_gpu_the_run_cannot_fit(capsys, monkeypatch, tiny_model_dir, refuse_model_loads):
    """On GPUs ``fit`` runs the plan against the device's memory before anything loads: a device too small ends the
    run in one line naming ``vapo-pl plan``; ``VAPO_PL_SKIP_MEMORY_PLAN`` and CPU runs skip the check."""
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])
    monkeypatch.setattr(memory_plan, "device_memory_bytes", lambda: 1.0 * GiB)  # a 1 GiB "GPU"
    args = ["fit", "--config", str(PAPER), f"--model.init_args.model_path={tiny_model_dir}",
            "--data.init_args.train_files=vapo_pl/demo/data/train.jsonl", "--trainer.logger=false",
            f"--trainer.default_root_dir={tiny_model_dir.parent / 'runs'}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and refuse_model_loads == []
    assert err.count("\n") == 1 and err.startswith("error: the run does not fit 1 GiB per GPU (")
    assert "vapo-pl plan --config" in err and "for details" in err
    cfg = memory_plan_namespace(args)
    assert memory_plan.check_fits_device(cfg, args) is not None
    monkeypatch.setenv("VAPO_PL_SKIP_MEMORY_PLAN", "1")
    assert memory_plan.check_fits_device(cfg, args) is None
    monkeypatch.delenv("VAPO_PL_SKIP_MEMORY_PLAN")
    cfg.trainer.accelerator = "cpu"
    assert memory_plan.check_fits_device(cfg, args) is None


def memory_plan_namespace(args: list[str]):
    from vapo_pl.cli import build_parser

    return build_parser().parse_args(args).fit
