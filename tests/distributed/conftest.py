"""One ``torchrun --nproc_per_node 2`` run of ``worker.py`` per test session, shared by every test here.

Each test module names the worker scenarios it reads (``SCENARIOS``); the fixture runs the union of the
scenarios of the collected modules, in ``worker.SCENARIOS`` order, in one invocation, so the two vLLM
engines (one per rank, ~20-30 s to start on this machine) and the imports are paid once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
ORDER = ("rollout", "ddp", "ddp_noclip", "fsdp2", "ddp_onebatch", "ddp_onebatch_separate", "fsdp2_onebatch",
         "deepspeed_stock", "deepspeed2", "deepspeed2_noclip", "deepspeed3")
TIMEOUT_S = 600
WORLD = 2


@dataclass
class DistributedRun:
    """Where the worker wrote its results, and how the run went."""

    out: Path
    log: Path
    returncode: int | None
    seconds: float

    def _fail(self, msg: str) -> None:
        tail = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"
        pytest.fail(f"{msg}\n--- worker log (tail) ---\n{tail}", pytrace=False)

    def ranks(self, scenario: str) -> list[dict]:
        """The scenario's result on every rank, in rank order; fails the test if it did not succeed."""
        results = []
        for rank in range(WORLD):
            path = self.out / f"{scenario}.rank{rank}.json"
            if not path.exists():
                self._fail(f"scenario {scenario!r}: no result from rank {rank} (exit code {self.returncode})")
            result = json.loads(path.read_text())
            if not result["ok"]:
                self._fail(f"scenario {scenario!r} failed on rank {rank}:\n{result['traceback']}")
            results.append(result)
        return results

    def actor_weights(self, scenario: str):
        """(steps + 1, n) float32: rank 0's full actor weights at the start and after every step."""
        import torch

        self.ranks(scenario)
        return torch.load(self.out / f"{scenario}.actor_weights.pt")

    def critic_weights(self, scenario: str):
        """(steps + 1, n) float32: rank 0's full critic weights at the start and after every step."""
        import torch

        self.ranks(scenario)
        return torch.load(self.out / f"{scenario}.critic_weights.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_prompts(path: Path, n: int, fmt) -> str:
    path.write_text("".join(json.dumps(fmt(i)) + "\n" for i in range(n)))
    return str(path)


@pytest.fixture(scope="session")
def distributed_run(request, tiny_model_dir, tmp_path_factory) -> DistributedRun:
    wanted = {s for item in request.session.items for s in getattr(item.module, "SCENARIOS", ())}
    scenarios = [s for s in ORDER if s in wanted]
    out = tmp_path_factory.mktemp("distributed")
    # 17 prompts: 16 usable by 2 ranks (equal shards), 4 steps of 2 prompts per rank per epoch
    small = _write_prompts(out / "small.jsonl", 17,
                           lambda i: {"prompt": f"{i}*{i % 5}=?", "answer": str(i * (i % 5))})
    big = _write_prompts(out / "big.jsonl", 64,
                         lambda i: {"prompt": f"{i}+{i % 7}=?", "answer": str(i + i % 7)})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
           "--out", str(out), "--model", str(tiny_model_dir), "--small-prompts", small, "--big-prompts", big,
           "--scenarios", ",".join(scenarios)]
    log = out / "worker.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        # own session: on timeout the whole tree (torchrun and its two workers) is killed by its group id
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return DistributedRun(out=out, log=log, returncode=code, seconds=time.perf_counter() - t0)
