"""Checkpoint hygiene: atomic writes, "last" = the newest complete checkpoint, resume into the same TensorBoard run.

- ``AtomicCheckpointIO`` writes ``<dir>/.<name>.<pid>.partial`` next to the target, fsyncs it and renames it over
  the target, so a checkpoint path names a complete file or nothing. (Lightning's own writer stages the file in
  the system temp directory, which is a copy, not a rename, when that is another file system.)
- ``remove_partial_files`` deletes what a killed write left behind; the CLI calls it before a run.
- ``newest_checkpoint`` is what ``--ckpt_path last`` resolves to: the most recently completed checkpoint in the
  directory, whatever ``last.ckpt`` (a copy written after the step checkpoint, or a link) says.
- ``resume_tensorboard`` points a ``TensorBoardLogger`` at the version directory the checkpoint was written
  from and sets ``purge_step`` to the first step the resumed run will write again, so TensorBoard shows every
  step once: events a killed run wrote after its last checkpoint are dropped when the resumed run writes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_STEP = re.compile(r"step=(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are a same-directory rename of a fully written, fsynced file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)


def install_atomic_checkpoint_io(trainer: pl.Trainer) -> bool:
    """Use ``AtomicCheckpointIO`` where the strategy writes single files with Lightning's default writer (single
    device, DDP). FSDP2 and DeepSpeed write checkpoint directories with their own writers and are left alone."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


def remove_partial_files(dirpath: str | Path) -> list[Path]:
    """Delete the staging files of checkpoint writes that never finished (the process was killed)."""
    d = Path(dirpath)
    if not d.is_dir():
        return []
    removed = [p for p in d.glob(f".*{PARTIAL_SUFFIX}") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        log.info("removed %d unfinished checkpoint write(s) from %s", len(removed), d)
    return removed


def drop_stale_last_links(dirs: Iterable[str | Path], resume_from: str | Path) -> list[Path]:
    """Before resuming from ``resume_from``: delete the ``last*.ckpt`` links in ``dirs`` that point anywhere else (the
    killed run may have left one at an older checkpoint, or at one made after the resumed one) and return the links
    kept, those to the resumed checkpoint. ``AdoptLastLinks`` hands the kept ones to their ``ModelCheckpoint``, so
    its next save moves ``last.ckpt`` instead of writing ``last-v1.ckpt``; a resume with nothing left to train saves
    nothing and keeps them as they are."""
    target = Path(resume_from).resolve()
    kept = []
    for d in dirs:
        for link in sorted(Path(d).glob("last*.ckpt")):
            if not link.is_symlink():
                continue
            if link.resolve() == target:
                kept.append(link)
            else:
                link.unlink()
    return kept


class AdoptLastLinks(pl.Callback):
    """Once the resumed checkpoint's callback states are restored: make each kept ``last`` link (``links``, from
    ``drop_stale_last_links``) the ``last_model_path`` of the ``ModelCheckpoint`` writing into its directory. The
    restored value can name another file (a checkpoint holds the state from before its own ``last`` save), and
    Lightning adds a version suffix when ``last.ckpt`` exists and is not its ``last_model_path``."""

    def __init__(self, links: Iterable[Path]) -> None:
        self.links = list(links)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in trainer.checkpoint_callbacks:
            if not getattr(cb, "save_last", None) or not getattr(cb, "dirpath", None):
                continue
            mine = [link for link in self.links if link.parent.resolve() == Path(cb.dirpath).resolve()]
            if len(mine) == 1:
                cb.last_model_path = str(mine[0])


def newest_checkpoint(dirpath: str | Path) -> Path | None:
    """The most recently completed checkpoint (``*.ckpt`` file or directory) in ``dirpath``; None if there is none.

    Completion time is the modification time (an atomic rename keeps the finished file's); on a tie a named step
    checkpoint wins over ``last.ckpt``, which is a copy of or a link to one of them.
    """
    d = Path(dirpath)
    if not d.is_dir():
        return None
    found = [p for p in d.glob("*.ckpt") if not p.name.startswith(".") and p.exists()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name != "last.ckpt", _step_of(p)))


def _step_of(path: Path) -> int:
    m = _STEP.search(path.name)
    return int(m.group(1)) if m else -1


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """What resuming needs from a checkpoint without loading its tensors: ``global_step``, the loggers' versions
    and the value-pretraining steps done. Reads a single file lazily (``mmap``); for a checkpoint directory
    (FSDP2 ``meta.pt``, DeepSpeed ``*model_states.pt``) the file with the trainer state."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "meta.pt", *sorted(p.glob("**/mp_rank_00_model_states.pt"))]
        p = next((c for c in candidates if c.is_file()), None)
        if p is None:
            return {}
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001  (not a zip-format file: read it whole)
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    vapo = ckpt.get("vapo", {}) if isinstance(ckpt, dict) else {}
    pretrain = next((v for k, v in ckpt.get("callbacks", {}).items() if "ValuePretraining" in str(k)), {}) \
        if isinstance(ckpt, dict) else {}
    return {
        "global_step": int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0,
        "log_versions": list(vapo.get("log_versions", [])),
        "pretrain_next_log_step": int(pretrain.get("next_log_step", 1)) if isinstance(pretrain, dict) else 1,
    }


def first_rewritten_step(meta: dict[str, Any]) -> int:
    """The first logged step a run resumed from this checkpoint writes again. Every per-step metric of RL step k
    is written at step k and the evaluation after step s belongs to checkpoint s, so that is ``global_step + 1``.
    Value pretraining writes at steps <= 0; a checkpoint taken during it (SIGTERM) redoes from its next one."""
    step = meta.get("global_step", 0)
    return step + 1 if step > 0 else min(meta.get("pretrain_next_log_step", 1), 1)


def resume_tensorboard(trainer: pl.Trainer, meta: dict[str, Any]) -> list[str]:
    """Point each ``TensorBoardLogger`` (whose version was not chosen explicitly) at the version the checkpoint
    was written from, with ``purge_step``; call before the logger writes anything. Returns the log dirs."""
    from lightning.pytorch.loggers import TensorBoardLogger

    versions = meta.get("log_versions", [])
    dirs = []
    for i, logger in enumerate(trainer.loggers):
        if not isinstance(logger, TensorBoardLogger) or i >= len(versions) or versions[i] is None:
            continue
        if getattr(logger, "_experiment", None) is not None:
            log.warning("TensorBoard: the logger already writes to %s; not resuming into version %s",
                        logger.log_dir, versions[i])
            continue
        logger._version = versions[i]  # Lightning keeps the chosen version here; the writer is created lazily
        logger._kwargs["purge_step"] = first_rewritten_step(meta)  # passed on to SummaryWriter
        logger._default_hp_metric = False  # the first run wrote hp_metric at step 0, below the purge
        dirs.append(logger.log_dir)
    return dirs


class SaveOnSigterm(pl.Callback):
    """On SIGTERM (Lightning stops at the next step boundary, value pretraining at its next step), save a
    checkpoint there into the ``ModelCheckpoint``'s directory (or ``dirpath``), so ``--ckpt_path last`` resumes
    from it. The CLI adds it to every run that checkpoints."""

    def __init__(self, dirpath: str | Path | None = None) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        dirpath = self.dirpath or (Path(trainer.checkpoint_callback.dirpath)
                                   if getattr(trainer.checkpoint_callback, "dirpath", None) else None)
        if dirpath is None:
            return
        path = dirpath / f"sigterm-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last", flush=True)
