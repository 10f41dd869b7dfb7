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


def test_worker_crash_during_and_between_jobs(private_pool, caplog):
    """A job whose worker dies is retried once on the replacement; dying again on it scores it unverified."""
    pool = private_pool
    pool.warm_up()
    retried = pool.retried

    def kill_twice():
        killed = None
        for _ in range(2):  # the tower takes the full 2 s, so each kill lands mid-job
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                w = pool._workers[0]
                if w.proc is not killed and w.ready and w.job is not None:
                    time.sleep(0.2)
                    killed = w.proc
                    killed.kill()
                    break
                time.sleep(0.01)

    killer = threading.Thread(target=kill_twice)
    killer.start()
    with caplog.at_level("WARNING", logger="vapo_pl.rewards.verifier"):
        result = pool.run([("grade", ["9^{9^{9^{9}}}", "1", False])], timeout_s=2.0)
    killer.join()
    assert isinstance(result[0], Failed) and result[0].reason == "crashed"
    assert pool.retried == retried + 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("died during a job" in m and "retried" in m for m in lines)
    assert any("died again on the same job" in m for m in lines)
    pool.warm_up()
    idle = pool._workers[0].proc
    idle.kill()
    idle.wait()
    # The dead idle worker is replaced and the job retried, not lost.
    assert pool.run([("grade", ["\\frac12", "0.5", False])], timeout_s=5.0) == [True]


def test_killing_busy_workers_mid_grading_loses_no_correct_answer():
    """The issue's fault: workers SIGKILLed while grading 200 correct GSM8K answers. Every answer still scores
    1 (its job ran again on the replacement worker)."""
    from tests.rewards._helpers import read_jsonl

    golds = [r["answer"].split("####")[-1].strip().replace(",", "") for r in read_jsonl("gsm8k_test.jsonl")[:200]]
    jobs = [("grade", [f"{g}.0", g, False]) for g in golds]  # "12.0" vs "12": parsed, not string-equal
    pool = VerifierPool(2)
    pool.warm_up()
    kills = []
    stop = threading.Event()

    def killer():
        # until a kill has landed mid-job (a retry happened), at most 10 kills; a kill can also land just after the
        # job finished, which must lose nothing either
        while not stop.is_set() and pool.retried < 1 and len(kills) < 10:
            busy = [w for w in pool._workers if w.ready and w.job is not None]
            if busy:
                busy[0].proc.kill()
                kills.append(busy[0].job)
                time.sleep(0.3)
            time.sleep(0.002)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        results = pool.run(jobs, timeout_s=5.0)
    finally:
        stop.set()
        thread.join()
        pool.close()
    assert kills, "no worker was killed while busy"
    assert results == [True] * 200
    assert pool.retried >= 1


def test_budget_bounds_a_whole_run(private_pool, caplog):
    """Slow-to-parse outputs cannot hold a step: past the budget the unfinished jobs fail with "budget"."""
    pool = private_pool
    pool.warm_up()
    jobs = [("grade", ["9^{9^{9^{9}}}", "1", False])] * 3 + [("grade", ["1", "1", False])]
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="vapo_pl.rewards.verifier"):
        results = pool.run(jobs, timeout_s=2.0, budget_s=0.5)
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0  # unbounded, the three towers alone would take 3 x 2 s
    assert [r.reason for r in results] == ["budget"] * 4
    assert any("budget of 0 s was spent" in r.getMessage() or "budget of 1 s" in r.getMessage()
               for r in caplog.records)
    assert pool.run([("grade", ["1", "1", False])], timeout_s=5.0, budget_s=30) == [True]
    with pytest.raises(ValueError, match="budget_s"):
        pool.run(jobs, timeout_s=1.0, budget_s=0)


def test_jobs_spread_over_workers_keep_their_order():
    pool = verifier.get_pool()  # the shared pool: one worker per core of this process
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
