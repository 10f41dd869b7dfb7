"""``vapo-pl``: LightningCLI in subclass mode, with cross-field checks before anything is loaded.

A configuration mistake ends the run with one line naming the field (``error: model.algorithm.eps_high ...``)
and exit code 2, before any model is loaded: ``validate_run_config`` runs on the parsed namespace before
instantiation, and a ``ValueError`` raised by a constructor (each class checks its own arguments) during
instantiation, which loads nothing either, is reported the same way. Type errors found by jsonargparse while
parsing keep jsonargparse's own (multi-line) report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in the trainer process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vapo_pl.datamodule import RolloutDataModule
from vapo_pl.module import VAPOModule

CLI_KWARGS: dict[str, Any] = {
    "model_class": VAPOModule,
    "datamodule_class": RolloutDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
    "parser_kwargs": {
        "description": "vapo-pl: VAPO and its sibling RL algorithms for reasoning language models, on "
        "PyTorch Lightning. Example: vapo-pl fit --config configs/vapo_qwen2.5_32b.yaml --config "
        "configs/strategies/fsdp2.yaml --model.init_args.algorithm.eps_high=0.28",
    },
}


class ConfigError(ValueError):
    """A configuration mistake, reported in one line naming the field."""


def _get(ns, dotted: str, default=None):
    cur = ns
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


def _as_dict(ns) -> dict[str, Any]:
    """A parsed dataclass group (jsonargparse ``Namespace``), or a plain mapping, as keyword arguments."""
    if ns is None:
        return {}
    if isinstance(ns, Mapping):
        return dict(ns)
    return dict(vars(ns))


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _world_size(trainer_cfg) -> int:
    """Ranks from ``trainer.devices`` x ``trainer.num_nodes``; 0 if known only at run time ("auto", -1)."""
    devices = _get(trainer_cfg, "devices", "auto")
    nodes = int(_get(trainer_cfg, "num_nodes", 1))
    if isinstance(devices, int):
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        n = int(devices)
    else:
        return 0
    return n * nodes if n > 0 else 0


def _build(cls, ns, prefix: str):
    """``cls(**ns)``; its one-line ``ValueError`` re-raised with the field's full path (``prefix`` + own)."""
    try:
        return cls(**_as_dict(ns))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}{e}") from None


def _class_of(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # jsonargparse has already resolved every class_path it accepted


def _check_paths(model, data) -> None:
    from vapo_pl.common import require_model_dir

    try:
        require_model_dir(_get(model, "model_path"), "model.model_path")
        if _get(model, "critic_path"):
            require_model_dir(_get(model, "critic_path"), "model.critic_path")
        if _get(data, "model_path"):
            require_model_dir(_get(data, "model_path"), "data.model_path")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    for field in ("train_files", "val_files"):
        for p in _as_list(_get(data, field)):
            if not Path(p).exists():
                raise ConfigError(f"data.{field}: {p} does not exist (relative paths start at {Path.cwd()})")


def _check_batch(algo, prompts: int, samples: int, world: int) -> None:
    batch = prompts * samples
    if batch % algo.minibatch_size:
        raise ConfigError(
            f"model.algorithm.minibatch_size={algo.minibatch_size} does not divide the rollout batch "
            f"data.prompts_per_step x data.samples_per_prompt = {prompts} x {samples} = {batch}"
        )
    if world:
        if prompts % world:
            raise ConfigError(f"data.prompts_per_step={prompts} is not divisible by the {world} ranks")
        if algo.minibatch_size % world:
            raise ConfigError(
                f"model.algorithm.minibatch_size={algo.minibatch_size} is not divisible by {world} ranks"
            )
        if (algo.minibatch_size // world) % algo.micro_batch_size:
            raise ConfigError(
                f"model.algorithm.micro_batch_size={algo.micro_batch_size} does not divide the per-rank "
                f"minibatch of {algo.minibatch_size // world}"
            )
    if "group_index" in algo.estimator_needs and samples < 2:  # baselines within a prompt's samples
        raise ConfigError(
            f"data.samples_per_prompt={samples}: estimator {algo.estimator!r} needs >= 2 samples per prompt "
            "(groups)"
        )


def _check_callbacks(cfg, algo, data) -> None:
    from vapo_pl.callbacks import Evaluation, ValuePretraining

    for cb in _as_list(_get(cfg, "trainer.callbacks")):
        class_path = str(_get(cb, "class_path", ""))
        cls = _class_of(class_path) if class_path else type(cb)
        if not isinstance(cls, type):
            continue
        name = cls.__name__
        if issubclass(cls, ValuePretraining) and not algo.uses_critic:
            raise ConfigError(
                f"trainer.callbacks: {name} needs a critic, but model.algorithm.estimator={algo.estimator!r} "
                "is critic-free (use 'gae')"
            )
        if issubclass(cls, Evaluation) and not _get(data, "val_files"):
            raise ConfigError(
                f"trainer.callbacks: {name} evaluates held-out problems, but data.val_files is not set"
            )


def validate_run_config(cfg) -> None:
    """Check what spans several objects, on a parsed config, without instantiating or loading anything.

    ``cfg`` is the namespace of one subcommand (``config.fit``), or the equivalent mapping (a loaded
    ``--print_config`` dump). The config dataclasses (algorithm, optim, engine) and reward terms are built
    here too, so their own checks report the full field path. Raises ``ConfigError`` (one line) on the first
    mistake.
    """
    from vapo_pl.config import AlgorithmConfig, OptimConfig
    from vapo_pl.rewards.base import CompositeReward, RewardTerm
    from vapo_pl.rollout.config import EngineConfig

    model = _get(cfg, "model.init_args", _get(cfg, "model"))  # subclass mode nests arguments in init_args
    data = _get(cfg, "data.init_args", _get(cfg, "data"))
    algo = _build(AlgorithmConfig, _get(model, "algorithm"), "model.")
    _build(OptimConfig, _get(model, "optim"), "model.")
    _build(EngineConfig, _get(data, "engine"), "data.")
    terms = [_build(RewardTerm, t, "data.reward: ") for t in _as_list(_get(data, "reward"))]
    if terms:  # None: the DataModule's default reward
        try:
            CompositeReward(terms)  # resolves each function and binds its kwargs; calls nothing
        except ValueError as e:
            raise ConfigError(f"data.reward: {e}") from None
    for field, choices in (("critic_init", ("base", "reward_model")), ("critic_head_init", ("zero", "random"))):
        value = _get(model, field, choices[0])
        if value not in choices:
            raise ConfigError(f"model.{field} must be " + " or ".join(map(repr, choices)) + f", got {value!r}")
    _check_paths(model, data)
    prompts = int(_get(data, "prompts_per_step", 8))
    samples = int(_get(data, "samples_per_prompt", 4))
    _check_batch(algo, prompts, samples, _world_size(_get(cfg, "trainer")))
    _check_callbacks(cfg, algo, data)


def _one_line(exc: BaseException) -> str:
    """The innermost message of a chain of errors, on one line (jsonargparse wraps a constructor's
    ``ValueError`` in several "Does not validate against any of the Union subtypes" layers)."""
    while True:
        nxt = exc.__cause__ if exc.__cause__ is not None else exc.__context__
        if exc.__cause__ is None and exc.__suppress_context__:
            nxt = None
        if not isinstance(nxt, (ValueError, MisconfigurationException)):
            break
        exc = nxt
    return " ".join(str(exc).split())


class VAPOCLI(LightningCLI):
    """LightningCLI whose configuration mistakes end in one ``error:`` line before any model is loaded."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        try:
            validate_run_config(cfg)
        except ConfigError as e:
            self.parser.error(str(e))

    def instantiate_classes(self) -> None:
        # Constructors only check and store their arguments (models load in ``configure_model``), so a
        # ValueError here is a configuration mistake, not a crash: report it like the checks above.
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as e:
            self.parser.error(_one_line(e))


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
    """The ``vapo-pl`` console script. Returns the process exit code (0): the console-script wrapper
    passes it to ``sys.exit``, which would print any other object and exit with status 1."""
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
