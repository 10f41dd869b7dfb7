"""Sandboxed tool calls: the policy's Python code (and the calculator) run in a fresh, bounded process per call.

Every call gets a new process with a wall-time limit (the parent kills it), a CPU-time, memory (address space),
process-count, file-size and open-file limit, an empty working directory, an environment with nothing of the
trainer's in it (``python -I``: no ``PYTHON*`` variables, no user site), and its output capped. A call that crashes,
times out or runs out of memory is answered with a one-line error observation; nothing of it outlives the call.

Isolation from the machine, when the OS allows it (``isolation == "namespaces"``): run as root, the call goes through
``unshare`` (util-linux) into new network, PID, mount, IPC and UTS namespaces, with a fresh tmpfs over every
world-writable directory, and drops to an unprivileged user (``nobody``) before the tool's code runs. So it has no
network (only a loopback that is down), sees only its own processes, cannot signal the trainer or read its
environment, cannot read home directories (empty tmpfs over ``/root`` and ``/home``; the interpreter is bound back
read-only if it lives there), and can write only into its working directory (which vanishes with it). Without that
(``isolation == "process"``: not root, or ``unshare`` missing or refused), one warning line says so and the limits
above are all there is: the code then runs as the trainer's user.

Why a process per call rather than a pool of long-lived workers as the verifier has: tool code is arbitrary, and a
call could leave a worker changed (globals, threads, files) for the next one. Starting one costs tens of
milliseconds, measured by ``tests/tools/test_sandbox.py`` and reported in ``ToolResult.seconds``.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_launcher.py")
_warned = False


@dataclass(frozen=True)
class SandboxLimits:
    """Per call: wall time and CPU seconds, address space (MiB), processes of the sandbox user, bytes written to
    files and to stdout/stderr (output beyond ``max_output_chars`` is cut and the call ends)."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    nproc: int = 32
    disk_mb: int = 16
    max_output_chars: int = 4000


@dataclass
class ToolResult:
    """What a call printed (stdout then stderr, capped) and how it ended: ``error`` is None for a clean exit,
    otherwise one line ("timed out after 5 s", "exit code 1", "out of memory", ...)."""

    output: str
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def observation(self) -> str:
        """The text the policy sees."""
        if self.error is None:
            return self.output
        return f"{self.output}\nerror: {self.error}".strip()


def _namespaces_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount", "true"], capture_output=True,
                           timeout=10, check=False)
    return probe.returncode == 0


class Sandbox:
    """Runs Python code under ``limits`` (see the module docstring for what is isolated and how).

    ``isolation``: ``auto`` (namespaces when the OS allows, else processes with a warning), ``namespaces`` (an error
    when unavailable) or ``process``."""

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto") -> None:
        global _warned
        if isolation not in ("auto", "namespaces", "process"):
            raise ValueError(f"sandbox isolation must be auto, namespaces or process, got {isolation!r}")
        self.limits = limits or SandboxLimits()
        usable = _namespaces_usable() if isolation != "process" else False
        if isolation == "namespaces" and not usable:
            raise RuntimeError("sandbox isolation 'namespaces' needs root and util-linux unshare")
        self.isolation = "namespaces" if usable else "process"
        if isolation == "auto" and not usable and not _warned:
            _warned = True
            log.warning("tool sandbox: no OS-level isolation here (needs root and unshare); tool code runs as this "
                        "user with time, memory and process limits only")
        user = pwd.getpwnam("nobody") if self.isolation == "namespaces" else None
        self._uid, self._gid = (user.pw_uid, user.pw_gid) if user else (os.getuid(), os.getgid())
        self._calc: subprocess.Popen | None = None  # the calculator's long-lived worker (started on first use)
        self._calc_dir: str | None = None
        self._calc_lock = threading.Lock()
        self.restarts = 0  # calculator workers started

    def run_python(self, code: str) -> ToolResult:
        """Run ``code`` as a Python program; its stdout and stderr are the result."""
        start = time.perf_counter()
        proc, workdir = self._spawn(self.limits.cpu_s)
        try:
            return self._collect(proc, code, start)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def _spawn(self, cpu_s: int, code: str | None = None) -> tuple[subprocess.Popen, str | None]:
        """A sandboxed interpreter: it reads its program from stdin, or runs ``code`` with stdin left for requests.
        Returns the process and, without namespaces, the working directory to remove when it ends."""
        lim = self.limits
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp/work"}
        workdir = None
        if self.isolation == "namespaces":
            cfg = {"uid": self._uid, "gid": self._gid, "memory_mb": lim.memory_mb, "cpu_s": cpu_s,
                   "nproc": lim.nproc, "disk_mb": lim.disk_mb, "env": env, "code": code,
                   "python": os.path.realpath(sys._base_executable), "prefix": os.path.realpath(sys.base_prefix)}
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc",
                   "--uts", sys.executable, "-I", str(LAUNCHER), json.dumps(cfg)]
            preexec = None
        else:
            workdir = tempfile.mkdtemp(prefix="vapo_tool_")
            env["HOME"] = workdir
            cmd = [os.path.realpath(sys._base_executable), "-I", *(["-c", code] if code else ["-"])]
            preexec = _limits_in_child(replace(lim, cpu_s=cpu_s))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env if workdir else None, start_new_session=True,
                                preexec_fn=preexec)  # noqa: PLW1509 - only setrlimit calls, async-signal-safe
        return proc, workdir

    def _collect(self, proc: subprocess.Popen, code: str, start: float) -> ToolResult:
        lim = self.limits
        try:
            proc.stdin.write(code.encode("utf-8", "replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out = bytearray()
        deadline = start + lim.wall_s
        error = None
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                error = f"timed out after {lim.wall_s:g} s"
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > lim.max_output_chars * 4:
                error = f"output over {lim.max_output_chars} characters"
                break
        if error is not None:
            _kill(proc)
        code_ = proc.wait()
        proc.stdout.close()
        text = out.decode("utf-8", "replace")
        if error is None and code_ != 0:
            if "MemoryError" in text:
                error = f"out of memory (limit {lim.memory_mb} MiB)"
            elif code_ in (-signal.SIGXCPU, -signal.SIGKILL) and "Traceback" not in text:
                error = f"killed (CPU limit {lim.cpu_s} s or memory)"
            else:
                error = f"exit code {code_}"
        if len(text) > lim.max_output_chars:
            text = text[: lim.max_output_chars] + "\n[output cut]"
        return ToolResult(output=text.strip(), error=error, seconds=time.perf_counter() - start)

    def calculate(self, expression: str) -> ToolResult:
        """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses, unary minus) in the sandbox;
        anything else is an error. Exponents are bounded so a calculation stays small.

        The calculator's code is the project's own and keeps no state, so unlike ``run_python`` it runs in one
        long-lived sandboxed worker per ``Sandbox`` (the verifier's pattern): a call costs a round trip instead of a
        process start. A call that overruns ``wall_s``, or during which the worker dies, is answered with an error
        and the worker is killed; the next call starts a new one (``restarts`` counts them)."""
        if len(expression) > _MAX_EXPRESSION:
            return ToolResult("", f"expression over {_MAX_EXPRESSION} characters", 0.0)
        start = time.perf_counter()
        with self._calc_lock:
            if self._calc is None or self._calc.poll() is not None:
                self._stop_calculator()
                self._calc, self._calc_dir = self._spawn(_WORKER_CPU_S, _CALCULATOR_WORKER)
                self.restarts += 1
            proc = self._calc
            try:
                proc.stdin.write((json.dumps(expression) + "\n").encode())
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._stop_calculator()
                return ToolResult("", "the calculator worker died", time.perf_counter() - start)
            line, error = self._read_line(proc, start + self.limits.wall_s)
            if error is not None:
                self._stop_calculator()
                return ToolResult("", error, time.perf_counter() - start)
        reply = json.loads(line)
        return ToolResult(reply["output"], reply["error"], time.perf_counter() - start)

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> tuple[str, str | None]:
        fd = proc.stdout.fileno()
        buf = bytearray()
        while not buf.endswith(b"\n"):
            left = deadline - time.perf_counter()
            if left <= 0:
                return "", f"timed out after {self.limits.wall_s:g} s"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return "", "the calculator worker died"
            buf += chunk
        return buf.decode("utf-8", "replace"), None

    def _stop_calculator(self) -> None:
        if self._calc is not None:
            _kill(self._calc)
            self._calc.wait()
            for f in (self._calc.stdin, self._calc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            if self._calc_dir is not None:
                shutil.rmtree(self._calc_dir, ignore_errors=True)
        self._calc, self._calc_dir = None, None

    def close(self) -> None:
        """Stop the calculator worker (also done when the process exits)."""
        with self._calc_lock:
            self._stop_calculator()

    def __del__(self) -> None:
        try:
            self._stop_calculator()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: modules may be gone
            pass


def _limits_in_child(lim: SandboxLimits):
    from vapo_pl.tools._launcher import set_limits

    # root ignores RLIMIT_NPROC; a non-root user's count includes its other processes, hence the margin
    nproc = None if os.getuid() == 0 else lim.nproc + 256
    return lambda: set_limits(lim.memory_mb, lim.cpu_s, lim.disk_mb, nproc)


def _kill(proc: subprocess.Popen) -> None:
    """End a call. Under namespaces ``unshare``'s child is the PID namespace's first process: killing it kills every
    process of the namespace, and ``unshare`` reaps it and exits (killing ``unshare`` itself would leave its child
    unreaped). Otherwise, and if that did not end it, the call's whole process group."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=2.0 if children else 0.0)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_MAX_EXPRESSION = 1000  # characters
_WORKER_CPU_S = 3600  # the worker's lifetime CPU limit; each call is bounded by wall_s

_CALCULATOR_WORKER = r'''
import ast, operator
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
def ev(node):
    if isinstance(node, ast.Expression):
        return ev(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = ev(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 10**6):
            raise ValueError("exponent too large")
        return OPS[type(node.op)](a, b)
    raise ValueError("not arithmetic: " + type(node).__name__)
import json, sys
for line in sys.stdin:
    try:
        value = ev(ast.parse(json.loads(line).strip(), mode="eval"))
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        reply = {"output": str(value), "error": None}
    except Exception as e:
        reply = {"output": "", "error": type(e).__name__ + ": " + str(e)}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
'''
