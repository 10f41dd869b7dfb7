"""``vapo-pl``: LightningCLI in subclass mode, with cross-field checks before anything is loaded."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in the trainer process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from vapo_pl.datamodule import RolloutDataModule  # noqa: E402
from vapo_pl.module import VAPOModule  # noqa: E402

CRITIC_CALLBACKS = ("ValuePretraining",)


class ConfigError(ValueError):
    """A configuration mistake, reported in one line naming the field."""


def _get(ns, dotted: str, default=None):
    cur = ns
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


def _world_size(trainer_cfg) -> int:
    devices = _get(trainer_cfg, "devices", "auto")
    nodes = int(_get(trainer_cfg, "num_nodes", 1))
    if isinstance(devices, int):
        n = devices
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        n = int(devices)
        if n == -1:
            return 0  # all devices: unknown here, checked at run time
    else:
        return 0
    return n * nodes


def validate_run_config(cfg) -> None:
    """Checks that span several objects (each object validates its own fields when instantiated)."""
    from vapo_pl.checks import require_model_dir
    from vapo_pl.config import AlgorithmConfig

    model = _get(cfg, "model.init_args") or _get(cfg, "model")
    data = _get(cfg, "data.init_args") or _get(cfg, "data")
    algo_ns = _get(model, "algorithm")
    algo_kwargs = dict(vars(algo_ns)) if algo_ns is not None and hasattr(algo_ns, "__dict__") else dict(algo_ns or {})
    try:
        algo = AlgorithmConfig(**{k: v for k, v in algo_kwargs.items() if v is not None or k in (
            "length_adaptive_alpha", "dual_clip_c", "value_clip", "kl_target", "norm_length")})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.{e}") from None
    try:
        require_model_dir(_get(model, "model_path"), "model.model_path")
        if _get(model, "critic_path"):
            require_model_dir(_get(model, "critic_path"), "model.critic_path")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    prompts = int(_get(data, "prompts_per_step", 8))
    samples = int(_get(data, "samples_per_prompt", 4))
    batch = prompts * samples
    if batch % algo.minibatch_size:
        raise ConfigError(
            f"model.algorithm.minibatch_size={algo.minibatch_size} does not divide the rollout batch "
            f"data.prompts_per_step x data.samples_per_prompt = {prompts} x {samples} = {batch}"
        )
    world = _world_size(_get(cfg, "trainer"))
    if world:
        if prompts % world:
            raise ConfigError(f"data.prompts_per_step={prompts} is not divisible by the {world} ranks")
        if algo.minibatch_size % world:
            raise ConfigError(f"model.algorithm.minibatch_size={algo.minibatch_size} is not divisible by {world} ranks")
        if (algo.minibatch_size // world) % algo.micro_batch_size:
            raise ConfigError(
                f"model.algorithm.micro_batch_size={algo.micro_batch_size} does not divide the per-rank minibatch "
                f"of {algo.minibatch_size // world}"
            )
    if algo.estimator in ("grpo", "dr_grpo", "rloo") and samples < 2:
        raise ConfigError(f"data.samples_per_prompt must be >= 2 for estimator {algo.estimator!r} (it needs groups)")
    for cb in _get(cfg, "trainer.callbacks", []) or []:
        class_path = str(_get(cb, "class_path", type(cb).__name__))
        if class_path.rsplit(".", 1)[-1] in CRITIC_CALLBACKS and not algo.uses_critic:
            raise ConfigError(
                f"trainer.callbacks: {class_path.rsplit('.', 1)[-1]} needs a critic, but model.algorithm.estimator="
                f"{algo.estimator!r} is critic-free (use 'gae')"
            )


class VAPOCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        try:
            validate_run_config(cfg)
        except ConfigError as e:
            self.parser.error(str(e))


def main(args: list[str] | None = None) -> VAPOCLI:
    return VAPOCLI(
        VAPOModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
