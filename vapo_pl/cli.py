"""``vapo-pl``: LightningCLI in subclass mode, with every input checked before anything is loaded or written.

A bad input ends the run with one line on stderr naming the field, file or row (``error: model.algorithm.eps_high
...``) and exit code 2, with no traceback and nothing written:

- right after parsing (before seeding, instantiation, or any model load), from ``vapo_pl.config_checks``:
  ``validate_run_config`` (cross-field
  checks, the config dataclasses, paths) and ``check_run_inputs`` (output directories writable, tokenizer files
  present and producing tokens, every data file readable row by row, some training prompt short enough);
- a ``ValueError`` from a constructor during instantiation (which loads nothing);
- on GPUs, the memory plan (``vapo_pl.memory_plan``) against the device's memory: a run that cannot fit stops
  with one line naming ``vapo-pl plan`` (``vapo-pl plan --config ...`` prints the whole plan);
- jsonargparse's own parse errors, condensed to their innermost message and key path;
- a ``ValueError`` raised while the trainer sets up (data, model directories) before training starts; the log
  directory the run created is removed again. ``VAPO_PL_TRACEBACK=1`` shows the traceback instead.

Resuming (``--ckpt_path last`` or a path) goes through ``vapo_pl.checkpointing``: "last" is the newest complete
checkpoint, unfinished writes are removed, TensorBoard continues in the checkpoint's version with the redone steps
purged, and SIGTERM saves a checkpoint at the next step boundary and exits with code 143.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in the trainer process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vapo_pl import quiet
from vapo_pl.config_checks import ConfigError, check_run_inputs, one_line, validate_run_config
from vapo_pl.datamodule import RolloutDataModule
from vapo_pl.module import VAPOModule
from vapo_pl.update import RunStopped

CLI_KWARGS: dict[str, Any] = {
    "model_class": VAPOModule,
    "datamodule_class": RolloutDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
    "parser_kwargs": {
        "description": "vapo-pl: VAPO and its sibling RL algorithms for reasoning language models, on "
        "PyTorch Lightning. Example: vapo-pl fit --config configs/vapo_qwen2.5_32b.yaml --config "
        "configs/strategies/fsdp2.yaml --model.init_args.algorithm.eps_high=0.28. Memory per GPU before a run: "
        "vapo-pl plan --config ... [--gpu-memory-gb N].",
    },
}


class _OneLineParser(LightningArgumentParser):
    """Reports a parse error as one ``error:`` line on stderr (no usage block), condensing jsonargparse's nested
    "Does not validate against any of the Union subtypes" report to its key path and innermost message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        try:
            from jsonargparse._common import debug_mode_active
        except ImportError:  # a jsonargparse without it: keep its own report
            super().error(message, ex)
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        sys.stderr.write(f"error: {condense_parse_error(message)}\n")
        sys.exit(2)


_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
          "Problem with given class_path")


def condense_parse_error(message: str) -> str:
    """``model.algorithm: Option 'eps_lo' is not accepted`` from jsonargparse's multi-line report."""
    lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return " ".join(lines)
    keys: list[str] = []
    detail = ""
    for ln in lines:
        m = re.match(r'Parser key "([^"]+)":?\s*(.*)', ln)
        if m:
            keys.append(m.group(1))
            ln = m.group(2)
        if ln and not ln.startswith(_NOISE):
            detail = ln
    path = ".".join(keys)
    return f"{path}: {detail}" if path and detail else detail or " ".join(lines)


class _RunFailedEarly(ValueError):
    """A ``ValueError`` raised while the trainer set up (before training started): a bad input, reported in one
    line by ``main``."""


class VAPOCLI(LightningCLI):
    """LightningCLI whose input mistakes end in one ``error:`` line before any model is loaded, and whose runs
    resume cleanly (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", _OneLineParser)
        self._resume_meta: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        try:  # before seeding and instantiation: a mistake prints one line and nothing else
            validate_run_config(cfg, training=sub in ("fit", None))
            if sub == "fit":
                check_run_inputs(cfg)
        except ConfigError as e:
            self.parser.error(str(e))
        if sub == "fit":  # on GPUs: the memory plan against the device's memory, before any model loads
            from vapo_pl.memory_plan import check_fits_device

            too_big = check_fits_device(cfg, args)
            if too_big:
                self.parser.error(too_big)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> pl.Trainer:
        """The trainer; ``fit`` gets the RL-step progress bar unless the config names its own or turns the bar off."""
        from lightning.pytorch.callbacks import ProgressBar

        from vapo_pl.progress import RLProgressBar

        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if getattr(self, "subcommand", None) == "fit" and config.get("enable_progress_bar", True) is not False and not any(
                isinstance(cb, ProgressBar) for cb in [*given, *callbacks]):
            callbacks = [*callbacks, RLProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        # Constructors only check and store their arguments (models load in ``configure_model``), so a
        # ValueError here is a configuration mistake, not a crash: report it like the checks above.
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as e:
            self.parser.error(one_line(e))

    def before_fit(self) -> None:
        from vapo_pl.checkpointing import (
            SaveOnSigterm,
            checkpoint_meta,
            install_atomic_checkpoint_io,
            remove_partial_files,
            resume_tensorboard,
        )

        trainer = self.trainer
        install_atomic_checkpoint_io(trainer)
        dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        for d in dirs:
            remove_partial_files(d)
        if trainer.checkpoint_callbacks and not any(isinstance(cb, SaveOnSigterm) for cb in trainer.callbacks):
            trainer.callbacks.append(SaveOnSigterm())
        fit_args = self.config_init["fit"]
        ckpt = fit_args.get("ckpt_path")
        if ckpt == "last":
            ckpt = _newest_checkpoint_for(trainer, dirs)
            if ckpt is None:
                print("--ckpt_path last: no checkpoint found; starting from scratch", file=sys.stderr, flush=True)
            fit_args["ckpt_path"] = None if ckpt is None else str(ckpt)
        if ckpt:
            for d in {Path(ckpt).parent} - set(dirs):
                remove_partial_files(d)
            self._resume_meta = checkpoint_meta(ckpt)
            resume_tensorboard(trainer, self._resume_meta)
            # A "last" link written by the killed run points at a checkpoint older than the one we resume from, or
            # was made after it; drop it so Lightning writes a fresh ``last.ckpt`` (not ``last-v1.ckpt``) next save.
            for d in dirs:
                for link in d.glob("last*.ckpt"):
                    if link.is_symlink() and link.absolute() != Path(ckpt).absolute():
                        link.unlink()

    def fit(self, model: pl.LightningModule, **kwargs: Any) -> None:
        trainer = self.trainer
        started = _FitStarted()
        trainer.callbacks.append(started)
        log_dirs = {d: os.path.exists(d) for d in _log_dirs(trainer)}
        try:
            trainer.fit(model, **kwargs)
        except ValueError as e:
            if started.started:
                raise
            _remove_new_dirs(log_dirs)
            if os.environ.get("VAPO_PL_TRACEBACK"):
                raise
            raise _RunFailedEarly(one_line(e)) from e
        except BaseException:
            if not started.started:
                _remove_new_dirs(log_dirs)
            raise


class _FitStarted(pl.Callback):
    """Whether data, models and strategy were set up (``on_fit_start``): failures before that are input errors."""

    def __init__(self) -> None:
        self.started = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True
        if trainer.is_global_zero:
            from vapo_pl.progress import start_summary

            print(start_summary(trainer, pl_module), flush=True)


def _log_dirs(trainer: pl.Trainer) -> list[str]:
    out = []
    for logger in trainer.loggers:
        try:
            d = logger.log_dir
        except Exception:  # noqa: BLE001, S112  (a logger without a local directory)
            continue
        if d:
            out.append(str(d))
    return out


def _remove_new_dirs(existed: dict[str, bool]) -> None:
    """Remove the log directories this run created (a run that failed before training starts leaves none)."""
    for d, was_there in existed.items():
        if not was_there and os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)


def _newest_checkpoint_for(trainer: pl.Trainer, dirs: list[Path]) -> Path | None:
    """``--ckpt_path last``: the newest complete checkpoint in the ModelCheckpoint directories; without an explicit
    ``dirpath``, in the ``checkpoints`` folders of the TensorBoard logger's earlier versions."""
    from vapo_pl.checkpointing import newest_checkpoint

    search = list(dirs)
    if not search:
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if root and os.path.isdir(root):
                search += [p / "checkpoints" for p in Path(root).iterdir() if p.is_dir()]
    found = [c for c in (newest_checkpoint(d) for d in search) if c is not None]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


class _ParserBuilt(Exception):
    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


class _ParserOnlyCLI(VAPOCLI):
    """Leaves ``LightningCLI.__init__`` as soon as its parser exists (``__init__`` builds it, then parses)."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        raise _ParserBuilt(parser)


def build_parser() -> LightningArgumentParser:
    """The parser ``vapo-pl`` uses (subcommands, classes, callbacks), built without parsing or instantiating.

    ``build_parser().parse_args(["fit", "--config", path])`` gives the namespace ``VAPOCLI`` would
    instantiate; pass its ``.fit`` to ``validate_run_config`` for a dry run.
    """
    try:
        _ParserOnlyCLI(**CLI_KWARGS, args=[])
    except _ParserBuilt as built:
        return built.parser
    raise AssertionError("LightningCLI.__init__ returned without parsing")


def run(args: list[str] | None = None) -> VAPOCLI:
    """Run ``vapo-pl <args>`` in this process and return the CLI (its trainer, model and datamodule);
    ``args`` replaces ``sys.argv[1:]``."""
    return VAPOCLI(**CLI_KWARGS, args=args)


def main(args: list[str] | None = None) -> int:
    """The ``vapo-pl`` console script. Returns the process exit code: 0 when the run ends, 2 for a bad input found
    while the trainer set up (one line on stderr), 1 when the run stopped itself (``RunStopped``, one line),
    143 when SIGTERM stopped the run (a checkpoint was saved if the run checkpoints). The console-script wrapper
    passes it to ``sys.exit``. ``vapo-pl plan ...`` prints the memory plan instead (``vapo_pl.memory_plan.main``:
    0 fits, 1 does not, 2 bad input); ``vapo-pl data ...`` writes a dataset as jsonl (``vapo_pl.data_prep.main``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if "--verbose" in argv:  # every third-party message, as vapo_pl.quiet would filter them
        argv.remove("--verbose")
        os.environ[quiet.VERBOSE_ENV] = "1"
        if "--verbose" in sys.argv:
            sys.argv.remove("--verbose")
    quiet.install()
    # the command line itself (the console script, `python -m vapo_pl.cli`, torchrun): let LightningCLI read it
    args = None if argv == sys.argv[1:] else argv
    if argv[:1] == ["plan"]:  # vapo-pl plan --config ...: the memory plan (vapo_pl.memory_plan), nothing loads
        from vapo_pl.memory_plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["data"]:  # vapo-pl data gsm8k --out ...: a dataset as the DataModule's jsonl (vapo_pl.data_prep)
        from vapo_pl.data_prep import main as data_main

        return data_main(argv[1:])
    try:
        run(args)
    except _RunFailedEarly as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except SIGTERMException:
        print("stopped by SIGTERM", file=sys.stderr, flush=True)
        return 143
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
