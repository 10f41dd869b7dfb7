"""Run-time diagnostics of a training run: host syncs counted per region, and the autocast state of each model's
forward per training phase. ``benchmarks/gpu_check.py`` uses both; neither changes what a run computes.

``HostSyncCounter`` counts the calls that make the host wait for the accelerator, by region
(``counter.region("rl_step")`` around one RL step, ``"micro_batch/update"`` around each pass of the update's
micro-batch loop; nested regions all count a call made inside them):

- ``mode="cuda"`` (GPU): ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising CUDA operation warns, the
  warning is counted (and not shown). The ground truth, including syncs made inside C++.
- ``mode="cpu"`` (the CPU check, where nothing waits): the run's CPU tensors stand for both sides of a GPU run, and a
  ``TorchFunctionMode`` follows which side each tensor would live on: a tensor made by ``.cpu()``, ``.to("cpu")``
  (the *string*), ``pin_memory()``, or by a factory without a ``device=`` (``torch.tensor(list)``, ``torch.arange(n)``,
  ``torch.tensor(0.0)``...) is on the host, and so is every result computed from host tensors only; every other
  tensor is on the accelerator: the model's parameters and gradients, tensors made with ``device=`` a
  ``torch.device`` (``device=x.device``, ``self.device``), results that read any accelerator tensor, and copies
  ``.to(device)`` with a ``torch.device`` (on CPU such a copy returns the tensor itself; here it returns a copy, so
  that the host original stays a host tensor). It counts what would synchronise on a GPU: reading an accelerator
  tensor's value on the host (``item``, ``tolist``, ``numpy``, ``bool()``, ``float()``, ``int()``, ``__index__``,
  formatting a 0-dim tensor), copying one to the host (``.cpu()``, ``.to("cpu")``, ``copy_``), ops whose output size
  depends on its values (``nonzero``, ``argwhere``, one-argument ``where``, ``masked_select``, ``unique``,
  ``bincount``, ``repeat_interleave`` with tensor repeats and no ``output_size``, indexing or assigning with a
  boolean mask), and blocking copies from the host (``.to(device)`` / ``copy_`` without ``non_blocking``,
  ``torch.tensor(..., device=...)``). Each count names the line that made it (``sources``).

``FitProbe`` is a Lightning callback (put it in ``trainer.callbacks`` of a ``vapo-pl fit`` config) that, for a
``VAPOModule``, records the autocast state of the actor's and the critic's forwards per phase (value pretraining, the
update's actor and critic losses, replayed critic passes, old log-probs, rollout), counts host syncs per RL step and
per micro-batch with a ``HostSyncCounter``, and keeps each RL step's metrics; ``FitProbe.summary()`` returns them all
as plain JSON-able values (and ``out=`` writes them to a file at the end of the fit).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import torch
from torch.overrides import TorchFunctionMode

_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_SKIP_FILES = {_HERE, *(os.path.abspath(m.__file__) for m in (warnings, functools, contextlib))}
_REPO = os.path.dirname(os.path.dirname(_HERE)) + os.sep
_PACKAGE = os.path.dirname(_HERE) + os.sep

SYNC_WARNING = "called a synchronizing CUDA operation"
MODES = ("cpu", "cuda")


def source_of_call(skip: int = 2) -> str:
    """``path:line (function)`` of the innermost frame outside torch, this file and the stdlib's ``warnings``,
    ``functools`` and ``contextlib``: the code that made the call being counted (paths relative to the repository when
    inside it). When that frame is not in ``vapo_pl`` (e.g. in transformers), `` <- `` and the innermost ``vapo_pl``
    frame follow."""
    frame = sys._getframe(skip)
    first = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in _SKIP_FILES and not path.startswith(_TORCH_DIR):
            shown = path.removeprefix(_REPO)
            where = f"{shown}:{frame.f_lineno} ({frame.f_code.co_name})"
            if path.startswith(_PACKAGE):
                return where if first is None else f"{first} <- {where}"
            first = first or where
        frame = frame.f_back
    return first or "?"


# ---------------------------------------------------------------------------------------------- host / accelerator
_ON_HOST = "_vapo_on_host"
_READS = {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
_BOOL_INDEXED = {"__getitem__", "__setitem__", "index_put", "index_put_"}


def on_host(t: Any) -> bool:
    """Whether the CPU-mode counter holds ``t`` to be a host tensor (see the module docstring)."""
    return bool(getattr(t, _ON_HOST, False))


def _mark(t: torch.Tensor, host: bool) -> None:
    if host != on_host(t):
        try:
            setattr(t, _ON_HOST, host)
        except (AttributeError, RuntimeError):  # a tensor type without a __dict__: left unmarked (accelerator)
            pass


def _names_host(device: Any) -> bool | None:
    """``True``: ``device`` names the host (a string ``"cpu..."``); ``False``: the accelerator (a ``torch.device``,
    an index, another string); ``None``: no device given."""
    if device is None:
        return None
    return isinstance(device, str) and device.startswith("cpu")


def _tensors(items: Any) -> Iterator[torch.Tensor]:
    for x in items:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from (y for y in x if isinstance(y, torch.Tensor))


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_target(args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """(target, non_blocking) of ``Tensor.to(*args, **kwargs)`` (``args`` without self): the target is a device
    (string or object), a tensor, or ``None`` (a dtype only)."""
    target = kwargs.get("device", kwargs.get("other"))
    for a in args:
        if target is None and isinstance(a, (str, torch.device, int, torch.Tensor)) and not isinstance(a, bool):
            target = a
    non_blocking = bool(kwargs.get("non_blocking", False)) or any(isinstance(a, bool) and a for a in args)
    return target, non_blocking


class _HostTracking(TorchFunctionMode):
    """Follows host vs accelerator placement and reports the calls that would sync (``HostSyncCounter`` mode "cpu")."""

    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        target_host, copy = self._check(name, first, args, kwargs)
        out = func(*args, **kwargs)
        if copy and out is first:  # a same-device no-op on CPU stands for a copy to the other side
            out = out.clone()
        self._place(out, name, first, args, kwargs, target_host)
        return out

    def _check(self, name: str, first: torch.Tensor | None, args: tuple, kwargs: dict) -> tuple[bool | None, bool]:
        """Record a sync if the call would make one; returns (whether the result goes to the host (None: decided by
        the inputs), whether the result must be a new tensor)."""
        dev = first is not None and not on_host(first)
        if name in _READS or name in _DATA_DEPENDENT:
            if dev:
                self.record(name)
            return None, False
        if name == "__format__":
            if dev and first.dim() == 0:
                self.record("__format__")
            return None, False
        if name == "where" and len(args) + len(kwargs) == 1:
            if dev:
                self.record("where(cond)")
            return None, False
        if name in _BOOL_INDEXED:
            if dev and len(args) > 1 and _has_bool_index(args[1]):
                self.record(f"bool-mask {name.strip('_')}")
            return None, False
        if name == "repeat_interleave":
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else first)
            if (isinstance(repeats, torch.Tensor) and not on_host(repeats) and repeats.numel() > 1
                    and kwargs.get("output_size") is None):
                self.record("repeat_interleave")
            return None, False
        if name in ("cpu", "pin_memory"):
            if name == "cpu" and dev:
                self.record("to host")
            return True, first is not None and not on_host(first)
        if name == "to" and first is not None:
            target, non_blocking = _to_target(args[1:], kwargs)
            if isinstance(target, torch.Tensor):
                to_host = on_host(target)
            else:
                to_host = _names_host(target)
            if to_host is None:  # a dtype only: stays where it is
                return None, False
            if to_host and dev:
                self.record("to host")
            elif not to_host and not dev and not non_blocking:
                self.record("blocking copy to device")
            return to_host, to_host != on_host(first)
        if name == "copy_" and first is not None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            src_dev = not on_host(args[1])
            non_blocking = bool(kwargs.get("non_blocking", False)) or (len(args) > 2 and bool(args[2]))
            if on_host(first) and src_dev:
                self.record("to host")
            elif dev and not src_dev and not non_blocking:
                self.record("blocking copy to device")
            return None, False
        if name in ("tensor", "as_tensor", "asarray") and _names_host(kwargs.get("device")) is False:
            self.record(f"torch.{name}(device=...)")
        return None, False

    @staticmethod
    def _place(out: Any, name: str, first: torch.Tensor | None, args: tuple, kwargs: dict,
               target_host: bool | None) -> None:
        outs = list(_tensors((out,))) if not isinstance(out, torch.Tensor) else [out]
        if isinstance(out, tuple) and not outs:  # namedtuple results (max, sort, ...)
            outs = [x for x in out if isinstance(x, torch.Tensor)]
        if not outs:
            return
        if target_host is None:
            if first is not None and out is first:  # in place: stays where it was
                return
            device = _names_host(kwargs.get("device"))
            inputs = list(_tensors(args)) + list(_tensors(kwargs.values()))
            if device is not None:
                target_host = device
            else:  # from host tensors only, or a factory without a device: on the host
                target_host = all(on_host(t) for t in inputs)
        for t in outs:
            _mark(t, target_host)


class HostSyncCounter:
    """Counts host syncs (see the module docstring), in total and per open region.

    Use as a context manager (``with HostSyncCounter("cpu") as c:``) or with ``start()`` / ``stop()``; mark regions
    with ``with c.region(name):``. Results: ``total``, ``counts[name]`` (calls made while ``name`` was open),
    ``entries[name]`` (times it was opened), ``per_entry[name]`` (the count of each opening, in order),
    ``sources[name]`` (a ``Counter`` of ``"kind @ path:line (function)"``) and ``summary()``.

    Mode "cpu" holds tensors made before ``start()`` to be accelerator tensors (the model's weights, say); mark host
    ones with ``host(t)``.
    """

    def __init__(self, mode: str = "cpu") -> None:
        if mode not in MODES:
            raise ValueError(f"HostSyncCounter mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.total = 0
        self.counts: dict[str, int] = defaultdict(int)
        self.entries: dict[str, int] = defaultdict(int)
        self.per_entry: dict[str, list[int]] = defaultdict(list)
        self.sources: dict[str, Counter[str]] = defaultdict(Counter)
        self._open: list[tuple[str, int]] = []  # (name, token), outermost first
        self._tokens = 0
        self._restore: list[Callable[[], None]] = []
        self._active = False

    @staticmethod
    def host(t: torch.Tensor) -> torch.Tensor:
        """Mark ``t`` as a host tensor (mode "cpu"); returns it."""
        _mark(t, True)
        return t

    # ------------------------------------------------------------------ regions
    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        token = self.enter(name)
        try:
            yield
        finally:
            self.exit(token)

    def enter(self, name: str) -> int:
        """Open a region ``name``; returns the token that closes it (``exit``)."""
        self._tokens += 1
        self._open.append((name, self._tokens))
        self.entries[name] += 1
        self.per_entry[name].append(0)
        return self._tokens

    def exit(self, token: int) -> None:
        """Close the region ``token`` opened, and any opened inside it that are still open (e.g. a loop's region left
        by an exception); nothing if it is closed already."""
        for i, (_, t) in enumerate(self._open):
            if t == token:
                del self._open[i:]
                return

    def record(self, kind: str, source: str | None = None) -> None:
        """Count one sync of ``kind`` in every open region."""
        self.total += 1
        if not self._open:
            return
        where = f"{kind} @ {source or source_of_call(3)}"
        for name in dict.fromkeys(name for name, _ in self._open):  # once per name, however deeply nested
            self.counts[name] += 1
            self.per_entry[name][-1] += 1
            self.sources[name][where] += 1

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._active:
            return
        self._active = True
        if self.mode == "cpu":
            mode = _HostTracking(self.record)
            mode.__enter__()
            self._restore.append(lambda: mode.__exit__(None, None, None))
        else:
            self._watch_cuda()

    def stop(self) -> None:
        while self._restore:
            self._restore.pop()()
        self._open.clear()
        self._active = False

    def _watch_cuda(self) -> None:
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        self._restore.append(lambda: torch.cuda.set_sync_debug_mode(previous_mode))
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        self._restore.append(lambda: catcher.__exit__(None, None, None))
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        shown = warnings.showwarning
        counter = self

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                counter.record("cuda sync", source_of_call(2))
                return None
            return shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning

    # ------------------------------------------------------------------ results
    def summary(self, top: int = 20) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "total": self.total,
            "regions": {name: {"count": self.counts.get(name, 0), "entries": self.entries[name],
                               "per_entry": list(self.per_entry[name]),
                               "sources": dict(self.sources[name].most_common(top))}
                        for name in self.entries},
        }


# ---------------------------------------------------------------------------------------------- the fit probe
# Phases whose forwards the probe labels. A forward is labelled by the outermost of the "owning" phases that is open
# (value pretraining runs the update's critic loss, and must still count as value pretraining), else by the innermost.
_OWNING_PHASES = ("value_pretraining", "critic_replay")
REQUIRED_AUTOCAST = ("value_pretraining/critic", "update_actor/actor", "update_critic/critic")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


try:
    import lightning.pytorch as _pl

    _CallbackBase: type = _pl.Callback
except ImportError:  # pragma: no cover - lightning is a dependency
    _CallbackBase = object


class _RegionList(list):
    """A list whose iteration opens regions ``micro_batch`` and ``region`` of ``counter`` around each item's pass."""

    def __init__(self, items: list, counter: HostSyncCounter, region: str) -> None:
        super().__init__(items)
        self.counter, self.region = counter, region

    def __iter__(self) -> Iterator:
        counter = self.counter
        for part in list.__iter__(self):
            token = counter.enter("micro_batch")
            counter.enter(self.region)
            try:
                yield part
            finally:
                counter.exit(token)


class FitProbe(_CallbackBase):
    """Record autocast per phase, host syncs per RL step and micro-batch, and each RL step's metrics (see the module
    docstring). Installs its wrappers and hooks in ``on_fit_start`` and removes them in ``teardown``.

    Args:
        sync_mode: ``HostSyncCounter`` mode: ``"cpu"``, ``"cuda"`` or ``"auto"`` (``cuda`` on a CUDA device).
        count_syncs: ``False`` leaves host syncs uncounted (the other records are kept).
        out: write ``summary()`` as JSON here at the end of the fit.
    """

    last: FitProbe | None = None  # the most recently constructed probe (for callers of the CLI in process)

    def __init__(self, sync_mode: str = "auto", count_syncs: bool = True, out: str | None = None) -> None:
        if sync_mode not in ("auto", *MODES):
            raise ValueError(f"FitProbe.sync_mode must be 'auto', 'cpu' or 'cuda', got {sync_mode!r}")
        self.sync_mode = sync_mode
        self.count_syncs = count_syncs
        self.out = out
        self.phases: list[str] = []
        self.autocast: dict[str, set[bool]] = defaultdict(set)
        self.autocast_dtype: dict[str, str] = {}
        self.step_metrics: list[dict[str, float]] = []
        self.pretrain_metrics: list[dict[str, float]] = []
        self.counter: HostSyncCounter | None = None
        self._undo: list[Callable[[], None]] = []
        self.fit_started = False
        FitProbe.last = self

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.phases.append(name)
        try:
            yield
        finally:
            self.phases.pop()

    def current_phase(self) -> str:
        for name in self.phases:
            if name in _OWNING_PHASES:
                return name
        return self.phases[-1] if self.phases else "other"

    def _wrap(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        setattr(owner, name, functools.wraps(original)(make(original)))
        self._undo.append(lambda: owner.__dict__.pop(name, None))

    def _in_phase(self, owner: Any, name: str, phase: str, region: str | None = None) -> None:
        probe = self

        def make(fn: Callable) -> Callable:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                with probe.phase(phase), probe._region(region):
                    return fn(*args, **kwargs)

            return wrapped

        self._wrap(owner, name, make)

    @contextlib.contextmanager
    def _region(self, name: str | None) -> Iterator[None]:
        if name is None or self.counter is None:
            yield
            return
        with self.counter.region(name):
            yield

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.fit_started = True
        device = pl_module.device
        if self.count_syncs:
            mode = self.sync_mode
            if mode == "auto":
                mode = "cuda" if device.type == "cuda" else "cpu"
            self.counter = HostSyncCounter(mode)
        for label, model in (("actor", pl_module.actor), ("critic", pl_module.critic)):
            if model is not None:
                handle = model.register_forward_pre_hook(self._autocast_hook(label, device.type))
                self._undo.append(handle.remove)
        upd, ct = pl_module.updater, pl_module.critic_training
        self._in_phase(ct, "pretrain_step", "value_pretraining", region="value_pretraining")
        self._in_phase(ct, "replay_passes", "critic_replay")
        self._in_phase(ct, "first_pass", "update_critic")
        self._in_phase(upd, "actor_loss", "update_actor")
        self._in_phase(upd, "critic_loss", "update_critic")
        self._in_phase(pl_module, "prepare", "prepare")
        self._in_phase(pl_module, "training_step", "rollout", region="rl_step")  # rollout: until a phase opens
        self._wrap_micro_batches(upd)
        if self.counter is not None:
            self.counter.start()
            self._undo.append(self.counter.stop)

    def _autocast_hook(self, label: str, device_type: str) -> Callable:
        probe = self

        def hook(module: Any, args: Any) -> None:
            key = f"{probe.current_phase()}/{label}"
            probe.autocast[key].add(bool(torch.is_autocast_enabled(device_type)))
            if torch.is_autocast_enabled(device_type):
                probe.autocast_dtype[key] = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")

        return hook

    def _wrap_micro_batches(self, updater: Any) -> None:
        """Open region ``micro_batch`` and ``micro_batch/<loop>`` around each pass of every micro-batch loop (the body
        of the caller's ``for`` runs while the iterator is suspended at ``yield``); ``<loop>`` names the caller:
        ``update`` (``Updater.run``), ``prepare`` or ``critic_first_pass``. The list returned is the original one
        (``len`` and indexing work), only iterating it opens the regions."""
        probe = self
        names = {"run": "update", "prepare": "prepare", "first_pass": "critic_first_pass"}

        def make(fn: Callable) -> Callable:
            def micro_batches(*args: Any, **kwargs: Any) -> Any:
                caller = sys._getframe(1).f_code.co_name
                parts = fn(*args, **kwargs)
                if probe.counter is None:
                    return parts
                return _RegionList(parts, probe.counter, f"micro_batch/{names.get(caller, caller)}")

            return micro_batches

        self._wrap(updater, "micro_batches", make)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = getattr(outputs, "metrics", None) or (outputs or {}).get("metrics", {})
        self.step_metrics.append({k: float(v) for k, v in metrics.items()})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for cb in trainer.callbacks:
            if hasattr(cb, "history") and type(cb).__name__ == "ValuePretraining":
                self.pretrain_metrics = [{k: float(v) for k, v in m.items()} for m in cb.history]
        self.remove()
        if self.out:
            Path(self.out).write_text(json.dumps(self.summary(), indent=2))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.remove()

    def remove(self) -> None:
        """Undo every wrapper and hook (idempotent; ``on_fit_end`` and ``teardown`` call it)."""
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ results
    def autocast_summary(self) -> dict[str, Any]:
        seen = {k: sorted(v) for k, v in sorted(self.autocast.items())}
        missing = [k for k in REQUIRED_AUTOCAST if k not in seen]
        off = [k for k in REQUIRED_AUTOCAST if k in seen and seen[k] != [True]]
        return {"required": list(REQUIRED_AUTOCAST), "seen": seen, "dtype": dict(sorted(self.autocast_dtype.items())),
                "missing": missing, "off": off, "pass": not missing and not off}

    def nonfinite_metrics(self, allow: tuple[str, ...] = ("explained_var",)) -> list[str]:
        """``step<i>:<key>`` / ``pretrain<i>:<key>`` of every metric that is not a finite number, except keys
        containing one of ``allow`` (explained variance is NaN by definition when the returns do not vary)."""
        bad = []
        for tag, rows in (("pretrain", self.pretrain_metrics), ("step", self.step_metrics)):
            for i, row in enumerate(rows):
                bad += [f"{tag}{i + 1}:{k}" for k, v in row.items() if not _finite(v) and not any(a in k for a in allow)]
        return bad

    def summary(self) -> dict[str, Any]:
        return {"fit_started": self.fit_started, "rl_steps": len(self.step_metrics),
                "pretrain_steps": len(self.pretrain_metrics), "step_metrics": self.step_metrics,
                "pretrain_metrics": self.pretrain_metrics, "nonfinite_metrics": self.nonfinite_metrics(),
                "autocast": self.autocast_summary(),
                "host_syncs": self.counter.summary() if self.counter is not None else None}
