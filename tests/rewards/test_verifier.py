"""The verifier process pool: hard time bound, recovery from hung and crashed workers, start-up errors."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vapo_pl.rewards import verifier
from vapo_pl.rewards.verifier import KILL_GRACE_S, Failed, VerifierPool


@pytest.fixture(scope="module")
def private_pool():
    pool = VerifierPool(1)
    pool.warm_up()
    yield pool
    pool.close()


def test_unresponsive_worker_is_killed_and_replaced(private_pool):
    """A stopped worker stands in for a C-level hang that no in-process signal can interrupt."""
    pool = private_pool
    restarts = pool.restarts
    os.kill(pool._workers[0].proc.pid, signal.SIGSTOP)
    t0 = time.perf_counter()
    result = pool.run([("grade", ["1", "1", False])], timeout_s=0.3)
    elapsed = time.perf_counter() - t0
    assert isinstance(result[0], Failed) and result[0].reason == "timeout"
    assert 0.3 + KILL_GRACE_S - 0.05 < elapsed < 0.3 + KILL_GRACE_S + 1.0
    assert pool.restarts == restarts + 1
    assert pool.run([("grade", ["1", "1", False])], timeout_s=5.0) == [True]


def test_worker_crash_during_and_between_jobs(private_pool):
    pool = private_pool
    pool.warm_up()
    victim = pool._workers[0].proc
    threading.Timer(0.3, victim.kill).start()  # dies mid-job (the tower takes the full 2 s)
    result = pool.run([("grade", ["9^{9^{9^{9}}}", "1", False])], timeout_s=2.0)
    assert isinstance(result[0], Failed) and result[0].reason == "crashed"
    pool.warm_up()
    idle = pool._workers[0].proc
    idle.kill()
    idle.wait()
    # The dead idle worker is replaced and the job retried, not lost.
    assert pool.run([("grade", ["\\frac12", "0.5", False])], timeout_s=5.0) == [True]


def test_jobs_spread_over_workers_keep_their_order():
    pool = verifier.get_pool()  # the shared pool: one worker per CPU, at most 8
    assert pool is verifier.get_pool() and pool.num_workers == verifier.default_num_workers()
    jobs = [("grade", [str(i), str(i % 3), False]) for i in range(12)]
    assert pool.run(jobs, timeout_s=5.0) == [i == i % 3 for i in range(12)]
    assert pool.run([], timeout_s=1.0) == []


def test_start_up_failure_is_one_clear_error(tmp_path, monkeypatch):
    broken = tmp_path / "worker.py"
    broken.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(verifier, "WORKER_SCRIPT", broken)
    pool = VerifierPool(1)
    with pytest.raises(RuntimeError, match="exited during start-up \\(exit code 3\\)"):
        pool.run([("ping", [])], timeout_s=1.0)
    assert pool._workers == []  # nothing half-started is kept


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        VerifierPool(0)
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number"):
        VerifierPool(1).run([("ping", [])], timeout_s=float("inf"))
