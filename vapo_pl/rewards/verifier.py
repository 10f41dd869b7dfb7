"""math-verify behind a hard time bound that holds in any thread: a small pool of worker processes.

Why processes: math-verify bounds its own time with ``signal.alarm``, which only works in the main
thread, and a signal cannot interrupt a long C-level operation (sympy asked for ``9^{9^{9^9}}``
computes a big integer in C). So each job runs in a child process (``_verify_worker.py``) under an
in-child ``setitimer`` alarm of ``timeout_s``; if the child has not answered ``KILL_GRACE_S``
after that, the parent kills it, counts the job as failed and starts a replacement. A job thus
never holds the caller longer than ``timeout_s + KILL_GRACE_S``, from any thread, and a crash or a
memory blow-up (the child has a 2 GiB address-space limit) stays in the child. A job whose worker died
(killed from outside, out of memory) is retried once on the replacement worker; a job that timed out is not
(it would time out again). ``budget_s`` bounds a whole ``run``: when it is spent, the jobs not finished yet
fail with reason "budget", so slow-to-parse outputs cannot stall a training step for minutes.

Only short strings cross the pipe: the answer extracted by ``extraction.py`` (at most a thousand
characters) and the gold answer. Workers are plain ``python -P`` subprocesses speaking JSON
lines, so they neither re-run the caller's ``__main__`` (as ``multiprocessing`` spawn would) nor
import torch. Start-up (~1-2 s, sympy and math-verify imports) is not counted against any job.
POSIX only (``setitimer``, ``select`` on pipes).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")
KILL_GRACE_S = 0.5  # after the in-child alarm, how long before the parent kills the child
START_TIMEOUT_S = 120.0  # a worker that is not ready by then is broken, not slow

log = logging.getLogger(__name__)


class Failed:
    """A job that did not produce a result: ``reason`` is "timeout", "crashed" (its worker died twice),
    "budget" (the run's time budget was spent first) or an exception name."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Failed({self.reason!r})"


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # Ctrl-C in the trainer's terminal is the trainer's business
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index of the job it is running
        self.deadline = 0.0

    def send(self, job: int, op: str, args: list, timeout_s: float) -> None:
        line = json.dumps({"op": op, "args": args, "timeout": timeout_s}, ensure_ascii=True) + "\n"
        self.proc.stdin.write(line.encode("ascii"))
        self.job = job
        self.deadline = time.monotonic() + timeout_s + KILL_GRACE_S

    def read_lines(self) -> list[bytes] | None:
        """Complete lines available now; None at end of file (the child died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.wait()


class VerifierPool:
    """``num_workers`` math-verify processes; ``run`` executes jobs with a per-job time bound.

    Thread-safe (one ``run`` at a time); usable from any thread. Workers start lazily and are
    restarted after a timeout or crash; ``close`` (also at interpreter exit) stops them.
    """

    def __init__(self, num_workers: int = 1) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        self.num_workers = num_workers
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.restarts = 0  # workers replaced after a timeout or crash, for diagnostics
        self.retried = 0  # jobs run again because their worker died
        atexit.register(self.close)

    def run(self, jobs: list[tuple[str, list[Any]]], timeout_s: float, budget_s: float | None = None) -> list[Any]:
        """Run ``(op, args)`` jobs (ops of ``_verify_worker``); one result or ``Failed`` per job.

        Each job is bounded by ``timeout_s`` in the child and ``timeout_s + KILL_GRACE_S`` here; the whole call
        by ``budget_s`` (plus ``KILL_GRACE_S``) when given.
        """
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
        if budget_s is not None and not (isinstance(budget_s, (int, float)) and 0 < budget_s < float("inf")):
            raise ValueError(f"budget_s must be None or a positive finite number, got {budget_s!r}")
        if not jobs:
            return []
        with self._lock:
            if os.getpid() != self._pid:  # forked: the pipes belong to the parent's pool
                self._workers, self._pid = [], os.getpid()
            while len(self._workers) < min(self.num_workers, len(jobs)):
                self._workers.append(_Worker())
            return self._run(jobs, float(timeout_s), math.inf if budget_s is None else float(budget_s))

    def _run(self, jobs: list[tuple[str, list[Any]]], timeout_s: float, budget_s: float) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        remaining = len(jobs)
        self._retry: deque[int] = deque()  # jobs whose worker died, to run once more
        self._retried_jobs: set[int] = set()
        end = time.monotonic() + budget_s
        timeouts = 0
        while remaining:
            while self._retry:
                pending.appendleft(self._retry.pop())
            if time.monotonic() > end:
                unfinished = [w.job for w in self._workers if w.job is not None] + list(pending)
                for w in self._workers:
                    if w.job is not None:
                        self._replace(w)
                for j in unfinished:
                    results[j] = Failed("budget")
                log.warning("math-verify: the grading budget of %.0f s was spent; %d of %d jobs not graded "
                            "(scored as unverified)", budget_s, len(unfinished), len(jobs))
                break
            for w in self._workers:
                if w.ready and w.job is None and pending:
                    j = pending.popleft()
                    try:
                        w.send(j, jobs[j][0], jobs[j][1], timeout_s)
                    except OSError:  # died while idle: replace it, retry the job
                        pending.appendleft(j)
                        self._replace(w)
            watched = [w for w in self._workers if not w.ready or w.job is not None]
            if not watched:
                continue
            wait = (
                min(min(w.deadline if w.ready else w.started + START_TIMEOUT_S for w in watched), end)
                - time.monotonic()
            )
            readable, _, _ = select.select([w.fd for w in watched], [], [], max(0.0, wait))
            for w in watched:
                if w.fd in readable:
                    remaining -= self._receive(w, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.job is not None and now > w.deadline:
                    results[w.job] = Failed("timeout")
                    remaining -= 1
                    timeouts += 1
                    self._replace(w)
                elif not w.ready and now > w.started + START_TIMEOUT_S:
                    self._discard(w)
                    raise RuntimeError(f"math-verify worker not ready after {START_TIMEOUT_S:.0f} s")
        if timeouts:
            log.warning("math-verify: %d of %d jobs ran past %.1f s and were stopped; their workers were replaced",
                        timeouts, len(jobs), timeout_s)
        return results

    def _receive(self, w: _Worker, results: list[Any]) -> int:
        """Read what ``w`` sent; store finished jobs in ``results``; return how many finished."""
        lines = w.read_lines()
        if lines is None:  # end of file: the child died
            if not w.ready:
                code = w.proc.wait()
                self._discard(w)
                raise RuntimeError(
                    f"math-verify worker exited during start-up (exit code {code}); "
                    f"check that math-verify imports under {sys.executable}"
                )
            job, code = w.job, w.proc.poll()
            self._replace(w)
            if job is None:  # died between jobs: nothing lost
                log.warning("math-verify worker died while idle (exit code %s); replaced", code)
                return 0
            if job not in self._retried_jobs:
                self._retried_jobs.add(job)
                self._retry.append(job)
                self.retried += 1
                log.warning("math-verify worker died during a job (exit code %s); replaced, the job is retried",
                            code)
                return 0
            log.warning("math-verify worker died again on the same job (exit code %s); it is scored unverified",
                        code)
            results[job] = Failed("crashed")
            return 1
        finished = 0
        for line in lines:
            msg = json.loads(line)
            if msg.get("ready"):
                w.ready = True
            elif w.job is not None:
                results[w.job] = msg["result"] if msg["ok"] else Failed(msg["error"])
                w.job = None
                finished += 1
        return finished

    def _discard(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)

    def _replace(self, w: _Worker) -> None:
        w.job = None
        w.kill()
        self.restarts += 1
        self._workers[self._workers.index(w)] = _Worker()

    def warm_up(self) -> None:
        """Start every worker and wait until it answers (start-up then stays out of timings)."""
        self.run([("ping", [])] * self.num_workers, timeout_s=START_TIMEOUT_S)

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for w in self._workers:
                    w.kill()
            self._workers = []


_POOLS: dict[int, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def default_num_workers() -> int:
    """The cores this process may use, shared among the node's ranks (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local_ranks)


def get_pool(num_workers: int | None = None) -> VerifierPool:
    """The process-wide pool with ``num_workers`` workers (default: ``default_num_workers()``)."""
    n = default_num_workers() if num_workers is None else num_workers
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = VerifierPool(n)
        return _POOLS[n]
