"""Every YAML in ``configs/`` through the real ``vapo-pl`` parser.

Full configs are parsed alone, overlays (``configs/ablations``, ``configs/strategies``) on top of the paper
config, as their headers tell users to. Each is checked twice:

- ``--print_config`` (exits 0 after parsing, loads nothing): every value the YAML sets survives into the
  printed config, an overlay changes exactly the keys it names, and each config encodes its algorithm's
  defining settings (ALGORITHMS.md).
- ``validate_run_config`` on the parsed namespace, the cross-field checks ``vapo-pl fit`` runs before
  instantiating anything. The configs point at cluster paths (``/models/...``, ``/data/...``) that do not
  exist here, so those are overridden with the tiny local model and a bundled prompt file.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from vapo_pl.cli import ConfigError, build_parser, validate_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
PAPER = CONFIG_DIR / "vapo_qwen2.5_32b.yaml"
RM_CONFIGS = sorted(CONFIG_DIR.glob("rm_*.yaml"))  # reward-model training: vapo-pl-rm's parser
FULL = sorted(set(CONFIG_DIR.glob("*.yaml")) - set(RM_CONFIGS))
OVERLAYS = sorted([*CONFIG_DIR.glob("ablations/*.yaml"), *CONFIG_DIR.glob("strategies/*.yaml")])
DEMO = CONFIG_DIR / "demo.yaml"
# overlays of the demo config (their headers say so): {file stem: {dotted path: value it sets}}
DEMO_OVERLAYS = {
    "bf16_engine_token_tis": {"data.init_args.engine.dtype": "bfloat16",
                              "model.init_args.algorithm.rollout_correction": "token_tis",
                              "model.init_args.algorithm.tis_cap": 2.0},
    "one_step_off_policy": {"data.init_args.max_staleness": 1,
                            "model.init_args.algorithm.rollout_correction": "token_tis"},
}
DEMO_OVERLAY_FILES = sorted([*CONFIG_DIR.glob("mismatch/*.yaml"), *CONFIG_DIR.glob("overlap/*.yaml")])
STAND_IN_PROMPTS = "vapo_pl/data/gsm8k_test.jsonl"  # an existing prompt file (validation checks existence)


def _ids(paths):
    return [str(p.relative_to(CONFIG_DIR)) for p in paths]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name bundled files relative to the repository root


def printed_config(parser, *configs: Path) -> dict:
    """``vapo-pl fit --config ... --print_config``: must exit 0; returns the printed YAML."""
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    # Resolving a DeepSpeed strategy imports deepspeed, which logs to stdout: start at the dump's header.
    text = out.getvalue()
    return yaml.safe_load(text[text.index("# lightning.pytorch=="):])


def parsed_run_config(parser, tiny_model_dir, *configs: Path):
    """The namespace ``vapo-pl fit`` would validate, with this machine's paths for models and prompts."""
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    args += [f"--model.init_args.model_path={tiny_model_dir}",
             f"--data.init_args.train_files={STAND_IN_PROMPTS}"]
    if any("model.init_args.critic_path" in leaves(yaml.safe_load(c.read_text())) for c in configs):
        args.append(f"--model.init_args.critic_path={tiny_model_dir}")  # ppo_vanilla: a reward-model critic
    return parser.parse_args(args).fit


def assert_contains(printed, given, where: str = "") -> None:
    """Every value of ``given`` (a YAML as written) is in ``printed`` (the parsed, fully expanded config)."""
    if isinstance(given, dict):
        if isinstance(printed, str):  # a `str | Path | dict` value (DeepSpeed's config) is dumped as a string
            printed = yaml.safe_load(printed)
        assert isinstance(printed, dict), f"{where}: expected a mapping, got {printed!r}"
        for key, value in given.items():
            assert key in printed, f"{where}.{key} was dropped by the parser"
            assert_contains(printed[key], value, f"{where}.{key}")
    elif isinstance(given, list):
        assert isinstance(printed, list) and len(printed) == len(given), f"{where}: {printed!r} != {given!r}"
        for i, (p, g) in enumerate(zip(printed, given)):
            assert_contains(p, g, f"{where}[{i}]")
    else:
        assert printed == given, f"{where}: printed {printed!r}, the YAML says {given!r}"


def leaves(tree, prefix: str = "") -> dict:
    """Dotted path -> value; lists are leaves (an overlay replaces a list as a whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def callback_classes(cfg: dict) -> list[str]:
    return [cb["class_path"].rsplit(".", 1)[-1] for cb in cfg["trainer"]["callbacks"]]


@pytest.fixture(scope="module")
def paper_printed(parser):
    return printed_config(parser, PAPER)


def test_every_yaml_is_covered():
    """A YAML in a new folder would otherwise never be parsed by these tests."""
    everything = set(CONFIG_DIR.rglob("*.yaml")) | set(CONFIG_DIR.rglob("*.yml"))
    assert everything == set(FULL) | set(OVERLAYS) | set(RM_CONFIGS) | set(DEMO_OVERLAY_FILES)
    assert len(FULL) >= 12 and len(OVERLAYS) >= 11
    for overlay in OVERLAYS + DEMO_OVERLAY_FILES:  # an overlay states only what it changes: no class, no model path
        text = yaml.safe_load(overlay.read_text())
        assert "model_path" not in leaves(text) and "model.class_path" not in leaves(text), overlay


def algo(**values) -> dict:
    return {f"model.init_args.algorithm.{k}": v for k, v in values.items()}


def data(**values) -> dict:
    return {f"data.init_args.{k}": v for k, v in values.items()}


# What makes each full config the algorithm its header names (ALGORITHMS.md sections 1-3, the papers).
MATH_VERIFY = {"name": "math_verify", "weight": 1.0, "kwargs": {}}
OVERLONG = {"name": "overlong", "weight": 1.0, "kwargs": {"max_length": 20480, "cache_length": 4096}}
DEFINING = {
    "demo.yaml": {  # all seven VAPO techniques, on CPU with vLLM; alpha scaled to 18-74-token responses
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=1.0, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1),
        **data(prompts_per_step=16, samples_per_prompt=8, temperature=1.0),
        "trainer.accelerator": "cpu",
    },
    "demo_long.yaml": {  # the same seven techniques on the long task, with the critic settings it needs
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=1.0, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1, critic_epochs=4, critic_minibatch_size=16),
        **data(prompts_per_step=16, samples_per_prompt=8, temperature=1.0, max_response_length=144),
        "model.init_args.optim.critic_grad_clip": None,
        "trainer.callbacks.0.init_args.replay_batches": 8,
        "trainer.callbacks.0.init_args.explained_variance_threshold": 0.5,
        "trainer.accelerator": "cpu",
    },
    "demo_lora.yaml": {  # the demo's VAPO settings, training rank-8 adapters of actor and critic
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=1.0, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1),
        **data(prompts_per_step=16, samples_per_prompt=8, temperature=1.0),
        "model.init_args.lora.rank": 8, "model.init_args.lora.critic": True, "model.init_args.lora.sync": "adapter",
        "trainer.accelerator": "cpu",
    },
    "demo_tools.yaml": {  # the seven techniques on multi-turn episodes with the sandboxed calculator
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=1.0, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1),
        **data(prompts_per_step=16, samples_per_prompt=8, temperature=1.0, max_response_length=128),
        "data.init_args.environment.name": "tools", "data.init_args.environment.kwargs.tag": "calc",
        "data.init_args.episode.max_turns": 3,
        "trainer.accelerator": "cpu",
    },
    "eval_aime24.yaml": {  # evaluation only: AIME24 mean@32 at temperature 1.0, top_p 0.7 (the paper's)
        **data(val_files="vapo_pl/data/aime24.jsonl", val_prompt_key="problem"),
        "trainer.callbacks.0.init_args.samples_per_prompt": 32, "trainer.callbacks.0.init_args.top_p": 0.7,
    },
    "eval_gsm8k.yaml": {  # evaluation only: GSM8K greedy accuracy, the number after "####"
        **data(val_files="vapo_pl/data/gsm8k_test.jsonl", val_prompt_key="question", val_answer_after="####"),
        "trainer.callbacks.0.init_args.temperature": 0.0,
    },
    "quickstart_gsm8k.yaml": {  # one GPU, Qwen2.5-1.5B-Instruct, GSM8K as the hub has it, VAPO's techniques
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=0.05, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1),
        **data(train_files="data/gsm8k/train.jsonl", val_files="vapo_pl/data/gsm8k_test.jsonl", prompt_key="question",
               answer_after="####"),
        "trainer.devices": 1, "trainer.precision": "bf16-mixed", "trainer.accelerator": "gpu",
        "model.init_args.model_path": "models/Qwen2.5-1.5B-Instruct",
    },
    "ppo_rm_demo.yaml": {  # RLHF-PPO: the reward model as reward and critic, KL penalty, sample-level loss
        **algo(estimator="gae", lambda_policy=0.95, lambda_critic=0.95, eps_low=0.2, eps_high=0.2,
               loss_agg_mode="seq-mean-token-mean", nll_coef=0.0, kl_reward_coef=0.05),
        "model.init_args.critic_init": "reward_model",
        "data.init_args.reward.1.weight": 0.0,
    },
    "vapo_qwen2.5_32b.yaml": {
        **algo(estimator="gae", lambda_critic=1.0, length_adaptive_alpha=0.05, eps_low=0.2, eps_high=0.28,
               loss_agg_mode="token-mean", nll_coef=0.1, kl_reward_coef=0.0, kl_loss_coef=0.0,
               minibatch_size=512),
        **data(prompts_per_step=512, samples_per_prompt=16, temperature=1.0),
        "model.init_args.optim.actor_lr": 1e-6, "model.init_args.optim.critic_lr": 2e-6,
        "trainer.max_steps": 5000,
    },
    "ppo_vanilla.yaml": {
        **algo(estimator="gae", lambda_policy=0.95, lambda_critic=0.95, length_adaptive_alpha=None,
               eps_low=0.2, eps_high=0.2, loss_agg_mode="seq-mean-token-mean", nll_coef=0.0,
               minibatch_size=512),
        **data(prompts_per_step=8192, samples_per_prompt=1),
        "model.init_args.critic_init": "reward_model",
    },
    "grpo.yaml": algo(estimator="grpo", norm_by_std=True, kl_loss_coef=0.001, kl_loss_estimator="k3",
                      loss_agg_mode="seq-mean-token-mean"),
    "dr_grpo.yaml": {**algo(estimator="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm", norm_length=8192),
                     **data(max_response_length=8192)},
    "dapo.yaml": {**algo(estimator="grpo", eps_low=0.2, eps_high=0.28, loss_agg_mode="token-mean",
                         kl_loss_coef=0.0, kl_reward_coef=0.0),
                  **data(dynamic_sampling=True, max_response_length=20480, reward=[MATH_VERIFY, OVERLONG])},
    "rloo.yaml": algo(estimator="rloo"),
    "remax.yaml": {**algo(estimator="remax"), **data(samples_per_prompt=1)},
    "reinforce_pp.yaml": {**algo(estimator="reinforce_pp", kl_reward_coef=0.01, kl_reward_estimator="k1"),
                          **data(samples_per_prompt=1)},
    "gspo.yaml": algo(policy_loss="gspo", eps_low=3e-4, eps_high=4e-4),
    "cispo.yaml": algo(policy_loss="cispo"),
    "aspo.yaml": algo(policy_loss="aspo", dual_clip_c=3.0),
    "ttrl.yaml": {**algo(estimator="grpo"),  # the majority-vote reward only, no gold-label term
                  **data(samples_per_prompt=64, reward=[{"name": "ttrl", "weight": 1.0, "kwargs": {}}])},
}


def test_every_full_config_has_its_defining_settings():
    assert set(DEFINING) == {p.name for p in FULL}


@pytest.mark.parametrize("config", FULL, ids=_ids(FULL))
def test_full_config_parses_and_validates(parser, tiny_model_dir, config):
    given = yaml.safe_load(config.read_text())
    printed = printed_config(parser, config)
    assert_contains(printed, given)
    assert printed["model"]["class_path"] == "vapo_pl.VAPOModule"
    assert printed["data"]["class_path"] == "vapo_pl.RolloutDataModule"
    for path, value in DEFINING[config.name].items():
        assert at(printed, path) == value, path
    validate_run_config(parsed_run_config(parser, tiny_model_dir, config), training=not config.name.startswith("eval_"))


def test_paper_config_callbacks(paper_printed):
    """Value-Pretraining (50 steps) comes first; evaluation is AIME24 mean@32, top_p 0.7, temperature 1.0."""
    callbacks = paper_printed["trainer"]["callbacks"]
    assert callback_classes(paper_printed)[0] == "ValuePretraining"
    assert callbacks[0]["init_args"]["steps"] == 50
    evaluation = callbacks[callback_classes(paper_printed).index("Evaluation")]["init_args"]
    assert {k: evaluation[k] for k in ("name", "samples_per_prompt", "temperature", "top_p")} == {
        "name": "aime24", "samples_per_prompt": 32, "temperature": 1.0, "top_p": 0.7}


# What each ablation changes on the paper config, as the paper's ablation table describes the row:
# {dotted path: (paper value, ablated value)}. Everything else must stay as in the paper config.
ABLATIONS = {
    "wo_clip_higher": algo(eps_high=(0.28, 0.2)),
    "wo_decoupled_gae": algo(lambda_critic=(1.0, 0.95)),
    "wo_group_sampling": data(prompts_per_step=(512, 8192), samples_per_prompt=(16, 1)),
    "wo_length_adaptive_gae": algo(length_adaptive_alpha=(0.05, None)),
    "wo_positive_example_lm_loss": algo(nll_coef=(0.1, 0.0)),
    "wo_token_level_loss": algo(loss_agg_mode=("token-mean", "seq-mean-token-mean")),
    "wo_value_pretraining": {},  # the callback list, checked in the test
}
STRATEGIES = {"ddp": "lightning.pytorch.strategies.DDPStrategy",
              "fsdp2": "vapo_pl.parallel.FSDP2Strategy",
              "deepspeed_zero2": "vapo_pl.parallel.HFDeepSpeedStrategy",
              "deepspeed_zero3": "vapo_pl.parallel.HFDeepSpeedStrategy"}


def test_every_overlay_is_described():
    assert {p.stem for p in OVERLAYS} == set(ABLATIONS) | set(STRATEGIES)


def _touches(key: str, named: set[str]) -> bool:
    return any(key == n or key.startswith(n + ".") or n.startswith(key + ".") for n in named)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_ids(OVERLAYS))
def test_overlay_on_paper_config(parser, tiny_model_dir, paper_printed, overlay):
    given = yaml.safe_load(overlay.read_text())
    printed = printed_config(parser, PAPER, overlay)
    assert_contains(printed, given)

    # The overlay changes what it names and nothing else.
    base, merged, named = leaves(paper_printed), leaves(printed), set(leaves(given))
    # A class_path replaces the whole subtree (a strategy's init_args come with it).
    named |= {k.removesuffix(".class_path") for k in named if k.endswith(".class_path")}
    kept = {k for k in base if not _touches(k, named)}
    assert kept == {k for k in merged if not _touches(k, named)}
    for key in kept:
        assert merged[key] == base[key], f"{overlay.name} changed {key} though it does not name it"
    # The paper config runs FSDP2 itself (with cpu_offload, sized by `vapo-pl plan`): the fsdp2 overlay keeps that.
    if overlay.stem != "fsdp2":
        assert any(merged.get(k) != base.get(k) for k in named), f"{overlay.name} changes nothing"

    if overlay.stem in STRATEGIES:
        assert paper_printed["trainer"]["strategy"]["class_path"] == STRATEGIES["fsdp2"]
        assert paper_printed["trainer"]["strategy"]["init_args"]["cpu_offload"] is True
        strategy = printed["trainer"]["strategy"]["class_path"]
        assert strategy == STRATEGIES[overlay.stem]
    else:
        for path, (paper, ablated) in ABLATIONS[overlay.stem].items():
            assert (at(paper_printed, path), at(printed, path)) == (paper, ablated), path
    if overlay.stem == "wo_value_pretraining":
        paper_callbacks = callback_classes(paper_printed)
        assert callback_classes(printed) == [c for c in paper_callbacks if c != "ValuePretraining"]
    if overlay.stem == "wo_group_sampling":  # the same rollout budget per step
        d, d0 = printed["data"]["init_args"], paper_printed["data"]["init_args"]
        budget, paper_budget = (x["prompts_per_step"] * x["samples_per_prompt"] for x in (d, d0))
        assert budget == paper_budget

    validate_run_config(parsed_run_config(parser, tiny_model_dir, PAPER, overlay))


@pytest.mark.parametrize("overlay", DEMO_OVERLAY_FILES, ids=_ids(DEMO_OVERLAY_FILES))
def test_overlay_on_demo_config(parser, tiny_model_dir, overlay):
    """The mismatch and overlap overlays on the demo config: they set what they say (every header names the demo
    config), change nothing else, and the result validates as ``vapo-pl fit`` would check it."""
    assert {p.stem for p in DEMO_OVERLAY_FILES} == set(DEMO_OVERLAYS)
    assert "configs/demo.yaml" in overlay.read_text()
    base, printed = printed_config(parser, DEMO), printed_config(parser, DEMO, overlay)
    expected = DEMO_OVERLAYS[overlay.stem]
    for path, value in expected.items():
        assert at(printed, path) == value, path
    changed = {k for k, v in leaves(printed).items() if leaves(base).get(k) != v}
    assert changed == {k for k in expected if at(base, k) != expected[k]}
    validate_run_config(parsed_run_config(parser, tiny_model_dir, DEMO, overlay))


def test_configs_do_not_validate_with_their_cluster_paths(parser):
    """The overrides above are needed here: the paper config's /models path fails validation, naming it."""
    args = ["fit", "--config", str(PAPER), f"--data.init_args.train_files={STAND_IN_PROMPTS}"]
    cfg = parser.parse_args(args)
    with pytest.raises(ConfigError, match=r"^model\.model_path: .*/models/Qwen2\.5-32B"):
        validate_run_config(cfg.fit)


def test_printed_config_is_a_reusable_config(parser, tmp_path):
    """``--print_config > run.yaml`` then ``--config run.yaml`` restores the run, also for the DeepSpeed
    overlay, whose ``config`` mapping jsonargparse prints as a quoted string (LightningCLI saves the same
    dump as the run's config.yaml)."""
    overlay = CONFIG_DIR / "strategies" / "deepspeed_zero3.yaml"
    printed = printed_config(parser, PAPER, overlay)
    saved = tmp_path / "run.yaml"
    saved.write_text(yaml.safe_dump(printed))
    cfg = parser.parse_args(["fit", "--config", str(saved)]).fit
    assert cfg.trainer.strategy.init_args.config == at(yaml.safe_load(overlay.read_text()),
                                                       "trainer.strategy.init_args.config")
    assert cfg.model.init_args.algorithm.eps_high == 0.28 and cfg.data.init_args.samples_per_prompt == 16


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_held_out_files_load_with_the_configured_keys(path):
    """Every config's val_files must load with its val keys (AIME24 rows say problem, not prompt)."""
    import yaml

    from vapo_pl.prompts import load_prompts

    data = yaml.safe_load(path.read_text())["data"]["init_args"]
    if not data.get("val_files"):
        return
    records = load_prompts(str(REPO / data["val_files"]),
                           data.get("val_prompt_key") or data.get("prompt_key", "prompt"),
                           data.get("val_answer_key") or data.get("answer_key", "answer"))
    assert records and all(r.answer for r in records)


@pytest.mark.parametrize("config", RM_CONFIGS, ids=_ids(RM_CONFIGS))
def test_reward_model_config_parses(config):
    """``vapo-pl-rm fit --config ... --print_config`` keeps every value the YAML sets."""
    from vapo_pl.reward_modeling import main as rm_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        rm_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    text = out.getvalue()
    printed = yaml.safe_load(text[text.index("# lightning.pytorch=="):])
    assert_contains(printed, yaml.safe_load(config.read_text()))

