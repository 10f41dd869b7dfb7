"""Configuration checks of a ``vapo-pl`` run, all before anything loads or is written.

- ``validate_run_config``: cross-field checks on the parsed namespace, the config dataclasses, paths;
- ``check_run_inputs``: output directories writable, tokenizer files present and producing tokens, every data file
  readable row by row, some training prompt short enough, a ``ckpt_path`` that reads.

Each raises ``ConfigError`` with one line naming the field, file or row; ``vapo_pl.cli`` prints it as ``error: ...``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException


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
    sizes = {"minibatch_size": algo.minibatch_size}
    if algo.critic_minibatch_size is not None:
        sizes["critic_minibatch_size"] = algo.critic_minibatch_size
    for name, size in sizes.items():
        if batch % size:
            raise ConfigError(
                f"model.algorithm.{name}={size} does not divide the rollout batch "
                f"data.prompts_per_step x data.samples_per_prompt = {prompts} x {samples} = {batch}"
            )
    if world:
        if prompts % world:
            raise ConfigError(f"data.prompts_per_step={prompts} is not divisible by the {world} ranks")
        for name, size in sizes.items():
            if size % world:
                raise ConfigError(f"model.algorithm.{name}={size} is not divisible by {world} ranks")
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


def validate_run_config(cfg, training: bool = True) -> None:
    """Check what spans several objects, on a parsed config, without instantiating or loading anything.

    ``cfg`` is the namespace of one subcommand (``config.fit``), or the equivalent mapping (a loaded
    ``--print_config`` dump). The config dataclasses (algorithm, optim, engine) and reward terms are built
    here too, so their own checks report the full field path. Raises ``ConfigError`` (one line) on the first
    mistake. ``training=False`` (``validate``/``test``) skips what only a training run needs (batch divisibility)
    and requires held-out files instead.
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
    lora = _get(model, "lora")
    if lora is not None:
        from vapo_pl.lora import LoRAConfig

        lora = _build(LoRAConfig, lora, "")  # its errors name model.lora.<field>
        strategy = str(_get(cfg, "trainer.strategy.class_path", _get(cfg, "trainer.strategy", "")) or "")
        # a DeepSpeed config's own stage wins over the strategy's argument (as DeepSpeed reads them)
        stage = _get(cfg, "trainer.strategy.init_args.config.zero_optimization.stage",
                     _get(cfg, "trainer.strategy.init_args.stage"))
        if "DeepSpeed" in strategy and stage == 3:
            raise ConfigError("model.lora with DeepSpeed ZeRO-3 is not supported (adapters are synced from whole "
                              "parameters); use ZeRO-2, FSDP2 or DDP")
    _check_paths(model, data)
    if not training:
        if not _get(data, "val_files"):
            raise ConfigError("data.val_files is not set: an evaluation run evaluates the held-out prompts")
        _check_callbacks(cfg, algo, data)
        return
    if not _get(data, "train_files"):
        raise ConfigError("data.train_files is not set: training needs prompts")
    if algo.ptx_coef > 0 and not _get(data, "ptx_files"):
        raise ConfigError(f"model.algorithm.ptx_coef={algo.ptx_coef} needs PPO-ptx data: set data.ptx_files")
    prompts = int(_get(data, "prompts_per_step", 8))
    samples = int(_get(data, "samples_per_prompt", 4))
    world = _world_size(_get(cfg, "trainer"))
    staleness = _get(data, "max_staleness", 0)
    if staleness:
        try:
            check_overlap(algo, world, lora is not None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_batch(algo, prompts, samples, world)
    _check_parallel(cfg, data, world)
    _check_callbacks(cfg, algo, data)


def check_overlap(algo, world: int, lora: bool) -> None:
    """What overlapped rollouts (``data.max_staleness`` 1) need besides the DataModule's own fields; raises
    ``ValueError`` (one line). The module checks the same at fit start for runs built in Python."""
    if algo.rollout_correction == "none":
        raise ValueError("data.max_staleness=1 trains on samples drawn by the previous weights: set "
                         "model.algorithm.rollout_correction (token_tis is the decoupled PPO form)")
    if world > 1:
        raise ValueError("data.max_staleness=1 runs on one device for now (the rollout generated ahead would run its "
                         "collectives alongside the update's); use max_staleness 0 with several devices")
    if lora:
        raise ValueError("data.max_staleness=1 with model.lora is not supported yet (the engine in its own process "
                         "takes full weights only)")


def _check_parallel(cfg, data, world: int) -> None:
    """Precision and tensor-parallel settings that would fail only once models and engines are up."""
    precision = str(_get(cfg, "trainer.precision", "") or "")
    if precision in ("16", "16-mixed"):
        raise ConfigError(f"trainer.precision={precision}: fp16 loss scaling is not supported (the module clips each "
                          "model's gradients before the optimizer step, where a GradScaler would still have them "
                          "scaled); use bf16-mixed or 32")
    tp = int(_get(data, "engine.tensor_parallel_size", 1) or 1)
    kind = _get(data, "engine.kind", "vllm")
    if tp > 1 and kind == "vllm" and world:
        if world == 1:
            raise ConfigError(f"data.engine.tensor_parallel_size={tp} needs {tp} trainer processes (one per GPU: "
                              f"--trainer.devices {tp}); in one process vLLM would start its own workers, which "
                              "cannot receive the trainer's weights")
        if world % tp:
            raise ConfigError(f"data.engine.tensor_parallel_size={tp} does not divide the {world} ranks "
                              "(trainer.devices x trainer.num_nodes)")


def _probe_writable(field: str, path: str | os.PathLike) -> None:
    """``path`` can be created and written: its nearest existing ancestor is a directory that takes a file (tried
    with a temporary file, removed at once; permission bits alone say nothing for root or read-only mounts)."""
    p = Path(path).expanduser().absolute()
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{field}: {path} cannot be created: {anc} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        raise ConfigError(f"{field}: {path} is not writable ({anc}: {e.strerror})") from None


def _output_dirs(cfg) -> list[tuple[str, str]]:
    """(field, directory) of everything a fit run writes: loggers' save_dir, ModelCheckpoint dirpath, root dir."""
    trainer = _get(cfg, "trainer")
    out = [("trainer.default_root_dir", str(_get(trainer, "default_root_dir") or os.getcwd()))]
    for i, lg in enumerate(_as_list(_get(trainer, "logger"))):
        save_dir = _get(lg, "init_args.save_dir")
        if save_dir:
            out.append((f"trainer.logger[{i}].save_dir" if isinstance(_get(trainer, "logger"), list)
                        else "trainer.logger.init_args.save_dir", str(save_dir)))
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in _as_list(_get(trainer, "callbacks")):
        cls = _class_of(str(_get(cb, "class_path", "")))
        if isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and _get(cb, "init_args.dirpath"):
            out.append(("ModelCheckpoint.dirpath", str(_get(cb, "init_args.dirpath"))))
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_run_inputs(cfg) -> None:
    """The checks of a ``fit`` that read files (in seconds, before any model loads; nothing is written):

    - every output directory can be created and written;
    - the policy directory has tokenizer files, and the tokenizer turns the first training prompt (templated)
      into a non-empty token list;
    - every training and held-out file is read and validated row by row (one line naming file, line and field,
      non-UTF-8 bytes included);
    - at least ``data.prompts_per_step`` training prompts fit ``data.max_prompt_length`` (templated with
      ``data.template``; a module's own ``build_prompt`` is checked again when the DataModule sets up);
    - a ``ckpt_path`` file exists and its trainer state reads.

    Raises ``ConfigError``.
    """
    from vapo_pl.prompts import DataError, load_prompts, render_prompt

    for field, path in _output_dirs(cfg):
        _probe_writable(field, path)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt and str(ckpt) not in ("last", "best", "hpc") and not str(ckpt).startswith("registry"):
        from vapo_pl.checkpointing import checkpoint_meta

        if not Path(ckpt).exists():
            raise ConfigError(f"ckpt_path: {ckpt} does not exist")
        try:
            checkpoint_meta(ckpt)
        except Exception as e:  # noqa: BLE001  (torch.load raises many types for a damaged file)
            raise ConfigError(f"ckpt_path: {ckpt} is not a readable checkpoint ({one_line(e)})") from None
    model = _get(cfg, "model.init_args", _get(cfg, "model"))
    data = _get(cfg, "data.init_args", _get(cfg, "data"))
    field = "data.model_path" if _get(data, "model_path") else "model.model_path"
    model_dir = Path(str(_get(data, "model_path") or _get(model, "model_path")))
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(f"{field}: {model_dir} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
                          "tokenizer next to the model (tokenizer.save_pretrained)")
    records = {}
    for files_field, key, answer, after in (
        ("train_files", "prompt_key", "answer_key", "answer_after"),
        ("val_files", "val_prompt_key", "val_answer_key", "val_answer_after"),
    ):
        files = _as_list(_get(data, files_field))
        if not files:
            continue
        train = _get(data, "prompt_key", "prompt"), _get(data, "answer_key", "answer"), _get(data, "answer_after")
        own = _get(data, key), _get(data, answer), _get(data, after)
        keys = train if files_field == "train_files" else tuple(o or t for o, t in zip(own, train))
        try:
            records[files_field] = load_prompts([str(f) for f in files], *keys)
        except DataError as e:
            raise ConfigError(f"data.{files_field}: {e}") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a broken tokenizer directory)
        raise ConfigError(f"{field}: the tokenizer in {model_dir} does not load ({one_line(e)})") from None
    template = _get(data, "template", "chat")
    train = records.get("train_files", [])
    limit = int(_get(data, "max_prompt_length", 512))
    usable, shortest = 0, None
    for start in range(0, len(train), 1024):
        chunk = train[start : start + 1024]
        try:
            texts = [render_prompt(tok, r.prompt, template) for r in chunk]
        except Exception as e:  # noqa: BLE001  (e.g. a tokenizer without a chat template under template: chat)
            raise ConfigError(f"data.template={template!r}: cannot render {chunk[0].source} ({one_line(e)})") from None
        lengths = [len(i) for i in tok(texts, add_special_tokens=template != "chat")["input_ids"]]
        if start == 0 and not lengths[0]:
            raise ConfigError(f"{field}: the tokenizer in {model_dir} turns {chunk[0].source} into no tokens "
                              "(an empty or broken tokenizer)")
        usable += sum(n <= limit for n in lengths)
        shortest = min(lengths + ([shortest] if shortest is not None else []))
    if train and not usable:
        raise ConfigError(f"data.max_prompt_length={limit}: every training prompt is longer (the shortest has "
                          f"{shortest} tokens)")
    need = int(_get(data, "prompts_per_step", 8))
    if train and usable < need:
        raise ConfigError(f"data.prompts_per_step={need} exceeds the {usable} training prompts that fit "
                          f"data.max_prompt_length={limit}")


def one_line(exc: BaseException) -> str:
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
