"""A rollout engine in its own process, so that generation and the trainer's update run at the same time.

``ProcessEngine`` starts a child process (``spawn``) that builds the real engine (``VLLMEngine``, in that process as
always) and serves it over a pipe: ``generate`` sends the prompts and waits for the completions, which leaves this
process's interpreter free while the child generates (a thread waiting on the pipe holds no lock the trainer needs).
The DataModule uses it when ``data.max_staleness`` > 0 (overlapped rollouts).

Weights stream to the child bucket by bucket (``weight_sync_bucket_bytes``), as they stream to an in-process engine:
each bucket is copied into shared memory (CPU) or passed as CUDA IPC handles (torch's multiprocessing reductions),
the child feeds it to vLLM's layer-wise reload and acknowledges it before the next is sent, so at most one bucket is
in flight and the trainer never holds a second copy of the model. The child's replies carry its errors, raised here
as ``RuntimeError`` with the child's message; a child that died is reported with its exit code.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from vapo_pl.rollout.base import Completion, RolloutEngine, Sampling
from vapo_pl.rollout.config import EngineConfig

log = logging.getLogger(__name__)

_END = "end"


def _serve(conn, model_path: str, config: EngineConfig, seed: int, env: dict[str, str]) -> None:
    """The child: build the engine, then answer requests until ``close`` or the pipe closes."""
    os.environ.update(env)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this (the child) process
    try:
        from vapo_pl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_path, config, seed=seed, rank=0)
        conn.send(("ok", str(engine.weight_dtype).removeprefix("torch.")))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return

    state = {"ended": False, "unacked": False}  # the stream of the reload in progress

    def buckets():
        while True:
            msg = conn.recv()
            if msg == _END:
                state["ended"] = True
                return
            state["unacked"] = True
            yield from msg
            conn.send(("ok", None))  # the bucket is in the engine's parameters: the parent may send the next
            state["unacked"] = False

    def drain():  # after a reload (failed or not): take and acknowledge the rest of the stream, so the pipe stays in step
        if state["unacked"]:
            conn.send(("ok", None))
            state["unacked"] = False
        while not state["ended"]:
            if conn.recv() == _END:
                state["ended"] = True
            else:
                conn.send(("ok", None))

    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            return
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            if op == "generate":
                out = engine.generate(*args)
            elif op == "update_weights":
                state.update(ended=False, unacked=False)
                try:
                    engine.update_weights(buckets())
                finally:
                    drain()
                out = engine.version
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", out))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


def cpu_split(env: dict[str, str]) -> dict[str, str]:
    """On CPU, the engine's process and the trainer's would otherwise both spread OpenMP threads over every core (vLLM
    pins its own to all of them), and each one's busy-waiting threads stall the other: measured 2.4x slower steps than
    on-policy on 2 cores. So the engine gets the last core (``VLLM_CPU_OMP_THREADS_BIND``, unless set) and the trainer
    keeps the others (``torch.set_num_threads``, here, in the trainer's process). Returns the engine's variables; a
    no-op on GPU machines or when the user bound the engine's threads."""
    if torch.cuda.is_available() or "VLLM_CPU_OMP_THREADS_BIND" in env:
        return {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < 2:
        return {}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), len(cores) - 1)))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[-1]), "OMP_NUM_THREADS": "1"}


def _chain(first, rest):
    yield first
    yield from rest


class ProcessEngine(RolloutEngine):
    """``VLLMEngine`` in a child process (see the module docstring). One request at a time: a second thread calling in
    while one waits is refused rather than interleaved."""

    def __init__(self, model_path: str, config: EngineConfig, *, seed: int = 0,
                 bucket_bytes: int | None = None) -> None:
        if config.kind != "vllm":
            raise ValueError(f"engine.kind={config.kind!r}: only the vllm engine runs in its own process")
        if config.tensor_parallel_size != 1:
            raise ValueError("engine.tensor_parallel_size must be 1 for an engine in its own process "
                             "(data.max_staleness > 0)")
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_", "HF_", "TOKENIZERS_"))}
        env.update(cpu_split(env))
        self._proc = ctx.Process(target=_serve, args=(child, str(model_path), config, seed, env), daemon=True,
                                 name="vapo-engine")
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.bucket_bytes = bucket_bytes or config.weight_sync_bucket_bytes
        self.config = config
        self.weight_dtype = getattr(torch, self._reply("starting the engine"))
        self.version = 0

    # ------------------------------------------------------------------ the pipe
    def _died(self, what: str) -> RuntimeError:
        self._proc.join(timeout=5)
        return RuntimeError(f"the engine process died while {what} (exit code {self._proc.exitcode})")

    def _send(self, obj: Any, what: str) -> None:
        try:
            self._conn.send(obj)
        except OSError:  # a broken pipe: the child is gone
            raise self._died(what) from None

    def _reply(self, what: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._died(what) from None
        if status == "error":
            raise RuntimeError(f"the engine process failed while {what}: {value}")
        return value

    def _request(self, op: str, *args: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"ProcessEngine.{op}: another request is in flight")
        try:
            self._send((op, args), op)
            return self._reply(op)
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        return self._request("generate", [list(p) for p in prompt_token_ids], sampling)

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        it = iter(weights)
        first = next(it, None)
        if first is None:
            raise ValueError("weights: got no (name, tensor) pairs")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("ProcessEngine.update_weights: another request is in flight")
        try:
            self._send(("update_weights", ()), "loading weights")
            bucket: list[tuple[str, Tensor]] = []
            size = 0
            try:
                for name, t in _chain(first, it):
                    # a copy the child may read after this returns; the reduction moves it to shared memory
                    t = t.detach().to(self.weight_dtype if t.is_floating_point() else t.dtype, copy=True)
                    bucket.append((name, t))
                    size += t.numel() * t.element_size()
                    if size >= self.bucket_bytes:
                        self._send_bucket(bucket)
                        bucket, size = [], 0
                if bucket:
                    self._send_bucket(bucket)
            finally:  # the child's reload ends here whatever happened on this side (a failed bucket replied already)
                if self._proc.is_alive():
                    self._send(_END, "loading weights")
            self.version = self._reply("loading weights")
        finally:
            self._lock.release()

    def _send_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        self._send(bucket, "loading a weight bucket")
        self._reply("loading a weight bucket")

    def close(self) -> None:
        """Stop the child (it frees its engine); idempotent."""
        if self._proc.is_alive():
            try:
                self._request("close")
            except (RuntimeError, OSError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.is_alive():
            proc.kill()
