"""Child process of ``vapo_pl.rewards.verifier``: runs math-verify on short answer strings.

Started as ``python -P <this file>`` so it imports neither the caller's ``__main__`` nor the
``vapo_pl`` package (no torch): only the standard library, sympy and math-verify.

Protocol, one JSON object per line (``ensure_ascii`` keeps NUL bytes, lone surrogates and any
other character on one ASCII line):
    stdin:  {"op": "grade" | "cluster" | "ping", "args": [...], "timeout": seconds}
    stdout: {"ready": true} once after start-up, then per request
            {"ok": true, "result": ...} or {"ok": false, "error": "timeout" | "<ExceptionName>"}

Each request runs under a ``setitimer`` alarm of ``timeout`` seconds (the worker is its own main
thread, so signals work here whatever thread the trainer calls from). The alarm raises a
``BaseException`` so the broad ``except Exception`` inside sympy/math-verify cannot swallow it.
The parent kills the worker if even that does not come back (e.g. a long C-level big-integer
operation, which signals cannot interrupt). math-verify's own signal timeouts are switched off:
they use ``signal.alarm`` too and would cancel this timer.

A ``cluster`` job makes many parse/verify calls; each gets its own alarm of ``op_timeout`` seconds
(within the job's). An answer whose parse runs out stays alone; a comparison that runs out leaves
both of its answers alone from then on. So a hostile answer costs at most two ``op_timeout`` and
spoils at most one other cluster, and the rest are still merged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from functools import lru_cache

MEMORY_LIMIT_BYTES = 2 << 30  # a runaway sympy object raises MemoryError instead of swapping the host


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


_job_deadline = 0.0  # time.monotonic() at which the current job runs out


def _arm(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-4))


def _bounded(fn, *args, op_timeout: float):
    """``fn(*args)`` within ``op_timeout`` seconds (and the job's deadline); None if it runs out."""
    _arm(min(op_timeout, _job_deadline - time.monotonic()))
    try:
        return fn(*args)
    except _Timeout:
        if time.monotonic() >= _job_deadline - 1e-3:
            raise  # the whole job is out of time
        return None
    finally:
        _arm(_job_deadline - time.monotonic())  # back to the job's own alarm


def _harden() -> None:
    try:  # die with the parent even if stuck in C code (Linux only)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, OSError, ValueError):
        pass


def main() -> None:
    global _job_deadline
    # Reply on a private copy of stdout; anything a library prints goes to stderr instead.
    reply = os.fdopen(os.dup(1), "w", encoding="ascii", buffering=1)
    os.dup2(2, 1)
    _harden()
    # math-verify logs the full input on failures and warns that its timeouts are off: both noise here.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from sympy import Basic, Rational, UnevaluatedExpr

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pct = UnevaluatedExpr(Rational(1, 100))

    @lru_cache(maxsize=4096)
    def parsed(text: str, percent_equivalence: bool) -> tuple:
        # The text is wrapped in $...$ so the whole string is one LaTeX answer. Not in \boxed{}: for a boxed
        # answer math-verify keeps the last number it finds as a candidate, so "\frac{4}{3} E_{1}+\frac{2}{3} E_{2}"
        # and "\frac{1}{3} E_{1}+\frac{2}{3} E_{2}" both became 2/3 and verified equal.
        wrapped = text if re.search(r"(?<!\\)\$", text) else "$" + text + "$"
        out = parse(wrapped, configs, parsing_timeout=None)
        if not percent_equivalence:
            # math-verify reads "50\%" as 50 * (1/100) and accepts both 50 and 0.5 for it; strictly
            # a percent is a number divided by 100, so evaluate it: then 50\% == 0.5 != 50.
            out = [o.xreplace({pct: Rational(1, 100)}) if isinstance(o, Basic) else o for o in out]
        return tuple(out)

    def grade(pred: str, gold: str, percent_equivalence: bool) -> bool:
        g, p = parsed(gold, percent_equivalence), parsed(pred, percent_equivalence)
        return bool(g and p and verify(list(g), list(p), timeout_seconds=None))

    def equivalent(a: tuple, b: tuple) -> bool:
        return bool(verify(list(a), list(b), timeout_seconds=None))

    def cluster(answers: list[str], percent_equivalence: bool, op_timeout: float) -> list[int]:
        """Greedy clustering: each answer joins the first earlier cluster it verifies against."""
        reps: list[tuple | None] = []  # parsed representative per cluster; None: never compare again
        ids: list[int] = []
        for a in answers:
            pa = _bounded(parsed, a, percent_equivalence, op_timeout=op_timeout)
            cid = None
            for k, rep in enumerate(reps):
                if not pa:
                    break
                if rep is None:
                    continue
                same = _bounded(equivalent, rep, pa, op_timeout=op_timeout)
                if same is None:  # out of time: either side may be the culprit, retire both
                    reps[k] = pa = None
                    break
                if same:
                    cid = k
                    break
            if cid is None:
                cid = len(reps)
                reps.append(pa or None)
            ids.append(cid)
        return ids

    ops = {"grade": grade, "cluster": cluster, "ping": lambda: "pong"}
    signal.signal(signal.SIGALRM, _on_alarm)
    reply.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
            _job_deadline = time.monotonic() + float(req["timeout"])
            _arm(float(req["timeout"]))
            try:
                resp = {"ok": True, "result": ops[req["op"]](*req["args"])}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            resp = {"ok": False, "error": "timeout"}
        except BaseException as e:  # any failure is a "not verified"; the worker lives on
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            resp = {"ok": False, "error": type(e).__name__}
        reply.write(json.dumps(resp, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
