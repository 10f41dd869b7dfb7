"""``benchmarks/gpu_check.py --cpu``: the one-GPU check's CPU variant runs end to end, its JSON summary has every
check with the right types, and the summary logic fails the run when one check fails. Also the pieces it is built
from (``vapo_pl.diagnostics``) and that it needs neither vLLM, math-verify, DeepSpeed nor TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ the CPU run
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "summary.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_cpu_run_reports_every_check(cpu_run):
    proc, summary = cpu_run
    gc = _script()
    last_line = proc.stdout.strip().splitlines()[-1]
    assert json.loads(last_line) == summary  # the last line of stdout is the summary
    assert set(summary["checks"]) == set(gc.CHECKS)
    assert isinstance(summary["ok"], bool)
    assert summary["ok"] == gc.overall(summary["checks"])
    assert proc.returncode == (0 if summary["ok"] else 1), proc.stderr[-3000:]
    for name, check in summary["checks"].items():
        assert isinstance(check["pass"], bool), name
        assert "error" not in check, (name, check.get("error"))
    assert set(summary["blocked_modules"]) >= {"vllm", "math_verify", "deepspeed"}  # the run did not need them


def test_cpu_run_checks_other_than_host_syncs_pass(cpu_run):
    _, summary = cpu_run
    checks = summary["checks"]
    fit = checks["fit_bf16"]
    assert fit["exit_code"] == 0 and fit["rl_steps"] == 3 and fit["pretrain_steps"] == 2
    assert fit["nonfinite_metrics"] == [] and fit["replay_metrics"]
    assert fit["pass"] is True
    autocast = checks["autocast"]
    assert set(autocast["required"]) <= set(autocast["seen"])
    assert autocast["pass"] is True, autocast
    pvp = checks["packed_vs_padded"]
    for variant in ("packed", "packed_alone"):
        assert isinstance(pvp[f"{variant}_fp32_max_abs_diff"], float), pvp
        assert isinstance(pvp[f"{variant}_bf16_max_abs_diff"], float), pvp
    assert pvp["pass"] is True, pvp
    memory = checks["memory_16k"]
    for case in ("policy_packed", "policy_padded", "critic_packed"):
        assert isinstance(memory[case]["logits_gib"], float) and memory[case]["pass"] is True, (case, memory[case])
    assert memory["pass"] is True


def test_cpu_run_counts_host_syncs(cpu_run):
    _, summary = cpu_run
    syncs = summary["checks"]["host_syncs"]
    assert syncs["mode"] == "cpu"
    assert len(syncs["per_step"]) == 3 and all(isinstance(n, int) for n in syncs["per_step"])
    assert isinstance(syncs["micro_batch"], int) and syncs["micro_batch_iterations"] > 0
    assert {"update", "prepare"} <= set(syncs["micro_batch_by_loop"])
    for loop in syncs["micro_batch_by_loop"].values():
        assert isinstance(loop["count"], int) and isinstance(loop["iterations"], int)
    assert sum(syncs["micro_batch_sources"].values()) <= syncs["micro_batch"]
    assert syncs["pass"] == (syncs["micro_batch"] == 0)


def test_cpu_run_micro_batch_loops_make_no_host_sync(cpu_run):
    proc, summary = cpu_run
    syncs = summary["checks"]["host_syncs"]
    assert syncs["micro_batch"] == 0, syncs["micro_batch_sources"]
    assert syncs["pass"] is True
    assert summary["ok"] is True and proc.returncode == 0


# ------------------------------------------------------------------------------------------------ summary logic
def test_overall_fails_when_any_check_fails_or_is_missing():
    gc = _script()
    good = {name: {"pass": True} for name in gc.CHECKS}
    assert gc.overall(good) is True
    for name in gc.CHECKS:
        assert gc.overall({**good, name: {"pass": False}}) is False
        assert gc.overall({k: v for k, v in good.items() if k != name}) is False
        assert gc.overall({**good, name: {"pass": "yes"}}) is False  # only True passes
        assert gc.overall({**good, name: {"skipped": True}}) is False


def test_no_cuda_device_fails_every_check(tmp_path, monkeypatch, capsys):
    gc = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "s.json"
    assert gc.main(["--no-block", "--out", str(out)]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert summary["ok"] is False and all(c["pass"] is False for c in summary["checks"].values())


# ------------------------------------------------------------------------------------------------ no optional deps
def test_imports_need_no_vllm_math_verify_deepspeed_or_tensorboard():
    code = f"""
import sys
for name in ("vllm", "math_verify", "deepspeed", "tensorboard", "tensorboardX"):
    sys.modules[name] = None  # any import of them now raises ImportError
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
import vapo_pl, vapo_pl.cli, vapo_pl.callbacks, vapo_pl.diagnostics, vapo_pl.forward, vapo_pl.tiny, vapo_pl.rewards
import vapo_pl.rollout.factory, vapo_pl.rollout.hf_engine
from vapo_pl.rewards.base import CompositeReward, RewardTerm
CompositeReward([RewardTerm(name="overlong")])
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ diagnostics
def test_host_sync_counter_counts_by_region():
    from vapo_pl.diagnostics import HostSyncCounter, on_host

    x = torch.arange(6.0)  # made before the counter starts: an accelerator tensor
    with HostSyncCounter("cpu") as c:
        x.sum().item()  # outside any region: in the total only
        with c.region("outer"):
            x.tolist()
            with c.region("inner"):
                bool(x[0] > 1)
                x[x > 2]  # boolean-mask indexing
                x[1:3]  # not a sync
                torch.tensor([1, 2], device=x.device)  # a blocking host-to-device copy on an accelerator
            with c.region("inner"):
                f"{x[0]:.1f}"  # formatting a 0-dim accelerator tensor reads it
    assert c.total == 6
    assert c.counts["outer"] == 5 and c.counts["inner"] == 4
    assert c.entries["inner"] == 2 and c.per_entry["inner"] == [3, 1]
    kinds = {k.split(" @ ")[0] for k in c.sources["inner"]}
    assert kinds == {"__bool__", "bool-mask getitem", "torch.tensor(device=...)", "__format__"}
    assert all("test_gpu_check.py" in k for k in c.sources["inner"])
    x[0].item()
    assert c.total == 6  # stopped
    assert not on_host(x)


def test_host_sync_counter_follows_host_and_device_tensors():
    from vapo_pl.diagnostics import HostSyncCounter, on_host

    x = torch.arange(6.0)
    with HostSyncCounter("cpu") as c, c.region("r"):
        lengths = torch.tensor([3, 1, 2])  # built on the host from Python data: reading it is free
        assert on_host(lengths) and on_host(lengths + 1) and on_host(lengths.cumsum(0))
        lengths.tolist(), int(lengths.sum())
        assert c.total == 0
        moved = lengths.to(x.device)  # a blocking copy (counted); a new tensor, on the device
        assert moved is not lengths and not on_host(moved) and on_host(lengths)
        lengths.to(x.device, non_blocking=True)  # asynchronous: not counted
        assert c.total == 1
        back = x.cpu()  # counted; the copy is on the host
        assert on_host(back) and not on_host(x)
        back.tolist(), (back * 2).tolist()
        assert c.total == 2
        (back + x).tolist()  # reads an accelerator tensor: counted
        x.new_zeros(2).tolist()  # made like x: on the device
        torch.repeat_interleave(torch.arange(3), lengths)  # host repeats: free
        torch.repeat_interleave(torch.arange(3, device=x.device), moved)  # device repeats: output size read back
        assert c.total == 5
    assert {k.split(" @ ")[0] for k in c.sources["r"]} == {"blocking copy to device", "to host", "tolist",
                                                          "repeat_interleave"}


def test_fit_probe_autocast_summary_flips_on_a_phase_without_autocast():
    from vapo_pl.diagnostics import REQUIRED_AUTOCAST, FitProbe

    probe = FitProbe(count_syncs=False)
    for key in REQUIRED_AUTOCAST:
        probe.autocast[key].add(True)
    assert probe.autocast_summary()["pass"] is True
    probe.autocast["update_actor/actor"].add(False)
    summary = probe.autocast_summary()
    assert summary["pass"] is False and summary["off"] == ["update_actor/actor"]
    del probe.autocast["value_pretraining/critic"]
    assert probe.autocast_summary()["missing"] == ["value_pretraining/critic"]


def test_fit_probe_phase_labels_value_pretraining_forwards_as_its_own():
    from vapo_pl.diagnostics import FitProbe

    probe = FitProbe(count_syncs=False)
    with probe.phase("value_pretraining"), probe.phase("update_critic"):
        assert probe.current_phase() == "value_pretraining"
    with probe.phase("rollout"), probe.phase("update_actor"):
        assert probe.current_phase() == "update_actor"
    assert probe.current_phase() == "other"
