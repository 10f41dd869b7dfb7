"""The ``vapo-pl`` command line: overrides, ``--print_config``, several ``--config`` files, and configuration
mistakes that end in one ``error:`` line naming the field, before any model is loaded.

Runs go through ``vapo_pl.cli.main`` in this process (one jsonargparse + Lightning import for the whole file);
only the console-script check starts a subprocess. Loading a model or a rollout engine is replaced by a function
that records the call and raises, so a check that slipped past parsing could not go unnoticed. (The tokenizer
does load while parsing: the input checks tokenise a prompt.)
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from vapo_pl import cli
from vapo_pl.cli import ConfigError, build_parser, main, validate_run_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "vapo_qwen2.5_32b.yaml"
WO_CLIP_HIGHER = REPO / "configs" / "ablations" / "wo_clip_higher.yaml"
PROMPTS = REPO / "vapo_pl" / "demo" / "data" / "train.jsonl"  # stands in for the paper's training prompts
HELDOUT = REPO / "vapo_pl" / "data" / "aime24.jsonl"  # the paper config's val_files, made absolute
ALGO = "--model.init_args.algorithm."


@pytest.fixture
def model_loads(refuse_model_loads, monkeypatch, tmp_path):
    """Calls that would load weights or a vLLM engine; each raises if it happens."""
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])  # main(args) warns when sys.argv holds pytest's arguments
    monkeypatch.chdir(tmp_path)  # logs or checkpoints of a run that slipped past the checks land here
    return refuse_model_loads


@pytest.fixture
def base_args(tiny_model_dir):
    """The paper config with this machine's paths and one CPU device: valid, so each test adds one mistake. The
    config's node layout (FSDP2 with host offload, rollout tensor parallelism 8) gives way to one process."""
    return ["fit", "--config", str(PAPER), f"--model.init_args.model_path={tiny_model_dir}",
            f"--data.init_args.train_files={PROMPTS}", f"--data.init_args.val_files={HELDOUT}",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--data.init_args.engine.tensor_parallel_size=1"]


def run_cli(args: list[str], capsys) -> tuple[int | None, str, str]:
    """``vapo-pl <args>``; returns (exit code, stdout, stderr). Must end in SystemExit."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def printed(stdout: str) -> dict:
    return yaml.safe_load(stdout)


class _Reached(Exception):
    pass


def test_valid_config_passes_the_checks_and_reaches_instantiation(base_args, model_loads, monkeypatch):
    """The control for the error cases below: without the mistake, ``main`` gets past every check."""

    def stop(self):
        raise _Reached

    monkeypatch.setattr(cli.VAPOCLI, "instantiate_classes", stop)
    with pytest.raises(_Reached):
        main(base_args)
    assert model_loads == []


def test_print_config_merges_configs_and_overrides(model_loads, capsys):
    code, out, err = run_cli(["fit", "--config", str(PAPER), "--config", str(WO_CLIP_HIGHER),
                              ALGO + "nll_coef=0.5", "--print_config"], capsys)
    assert code in (0, None), err
    algo = printed(out)["model"]["init_args"]["algorithm"]
    assert algo["eps_high"] == 0.2  # from the overlay (the paper config says 0.28)
    assert algo["nll_coef"] == 0.5  # from the command line (the paper config says 0.1)
    # the paper config's values where neither says otherwise
    assert (algo["eps_low"], algo["lambda_critic"], algo["length_adaptive_alpha"]) == (0.2, 1.0, 0.05)
    assert model_loads == []


@pytest.mark.parametrize(("order", "eps_high"), [
    (["--config", str(WO_CLIP_HIGHER), ALGO + "eps_high=0.3"], 0.3),
    ([ALGO + "eps_high=0.3", "--config", str(WO_CLIP_HIGHER)], 0.2),
])
def test_later_arguments_win(model_loads, capsys, order, eps_high):
    code, out, err = run_cli(["fit", "--config", str(PAPER), *order, "--print_config"], capsys)
    assert code in (0, None), err
    assert printed(out)["model"]["init_args"]["algorithm"]["eps_high"] == eps_high


def test_several_config_files_merge_key_by_key(model_loads, capsys, tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text("model:\n  init_args:\n    algorithm: {eps_high: 0.25, ppo_epochs: 2}\n"
                     "data:\n  init_args: {prompts_per_step: 256}\n")
    second = tmp_path / "second.yaml"
    second.write_text("model:\n  init_args:\n    algorithm: {eps_high: 0.3}\n")
    code, out, err = run_cli(["fit", "--config", str(PAPER), "--config", str(first), "--config", str(second),
                              "--print_config"], capsys)
    assert code in (0, None), err
    cfg = printed(out)
    algo = cfg["model"]["init_args"]["algorithm"]
    assert algo["eps_high"] == 0.3  # the last file that sets it
    assert algo["ppo_epochs"] == 2  # set only by the first overlay, kept by the second
    assert cfg["data"]["init_args"]["prompts_per_step"] == 256
    assert cfg["data"]["init_args"]["samples_per_prompt"] == 16  # the paper config's, untouched
    assert algo["nll_coef"] == 0.1


# (extra arguments, substrings of the error line). The first eight fail in the checks before instantiation,
# the last three in a constructor during instantiation (which loads nothing either).
MISTAKES = {
    "unknown estimator": ([ALGO + "estimator=gea"], ["model.algorithm.estimator", "'gea'", "gae, grpo"]),
    "unknown policy loss": ([ALGO + "policy_loss=ppo2"], ["model.algorithm.policy_loss", "'ppo2'", "gspo"]),
    "lambda out of range": ([ALGO + "lambda_critic=1.5"], ["model.algorithm.lambda_critic", "[0, 1]", "1.5"]),
    "eps out of range": ([ALGO + "eps_high=-0.1"], ["model.algorithm.eps_high", ">= 0", "-0.1"]),
    "minibatch does not divide the batch": ([ALGO + "minibatch_size=1000"],
                                            ["model.algorithm.minibatch_size=1000", "512 x 16 = 8192"]),
    "missing model path": (["--model.init_args.model_path=/nonexistent/Qwen"],
                           ["model.model_path", "/nonexistent/Qwen"]),
    "critic callback without a critic": ([ALGO + "estimator=grpo"],
                                         ["trainer.callbacks", "ValuePretraining", "critic", "'grpo'"]),
    "optimizer setting": (["--model.init_args.optim.actor_lr=0"], ["model.optim.actor_lr", "> 0"]),
    "data module argument": (["--data.init_args.top_p=0.7"], ["data.top_p"]),
    "callback argument": (["--trainer.callbacks+=callbacks.LengthScaling", "--trainer.callbacks.window=1"],
                          ["LengthScaling.window", ">= 2"]),
    "trainer argument": (["--trainer.devices=0"], ["Trainer(devices='0')"]),  # Lightning's own check
    "fp16 loss scaling": (["--trainer.precision=16-mixed"], ["trainer.precision=16-mixed", "bf16-mixed"]),
    "tensor parallel in one process": (["--data.init_args.engine.tensor_parallel_size=2"],
                                       ["data.engine.tensor_parallel_size=2", "--trainer.devices 2"]),
    "LoRA rank": (["--model.init_args.lora.rank=0"], ["model.lora.rank", ">= 1"]),
    "LoRA sync": (["--model.init_args.lora.sync=files"], ["model.lora.sync", "adapter, merged", "'files'"]),
    "LoRA under ZeRO-3": (["--model.init_args.lora.rank=8", "--config", str(REPO / "configs/strategies/deepspeed_zero3.yaml")],
                          ["model.lora", "ZeRO-3", "ZeRO-2, FSDP2 or DDP"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_fails_in_one_line_naming_the_field(base_args, model_loads, capsys, mistake):
    extra, expected = MISTAKES[mistake]
    code, _, err = run_cli([*base_args, *extra], capsys)
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert err.rstrip().endswith(error_lines[0])  # nothing follows the one line
    for s in expected:
        assert s in error_lines[0], (s, error_lines[0])
    assert model_loads == []


# ------------------------------------------------------------------ cross-field checks on a parsed namespace
@pytest.fixture(scope="module")
def paper_namespace(tiny_model_dir):
    """The parsed paper config (``config.fit``) with this machine's paths; tests change a clone of it."""
    args = ["fit", "--config", str(PAPER), f"--model.init_args.model_path={tiny_model_dir}",
            f"--data.init_args.train_files={PROMPTS}", f"--data.init_args.val_files={HELDOUT}"]
    return build_parser().parse_args(args).fit


def changed(ns, change: dict):
    ns = ns.clone()
    for dotted, value in change.items():
        ns[dotted] = value
    return ns


A = "model.init_args.algorithm."
D = "data.init_args."
CROSS_FIELD = [
    # trainer.devices 8: per-rank minibatch 512 / 8 = 64, which micro-batches of 3 do not divide.
    ({A + "micro_batch_size": 3},
     "model.algorithm.micro_batch_size=3 does not divide the per-rank minibatch of 64"),
    # 2 nodes x 8 devices = 16 ranks: 512 / 16 = 32 per rank, which 3 does not divide either.
    ({"trainer.num_nodes": 2, A + "micro_batch_size": 3}, "per-rank minibatch of 32"),
    # 12 x 16 = 192 is divisible by the minibatch 64, but 12 prompts do not split over 8 ranks.
    ({D + "prompts_per_step": 12, A + "minibatch_size": 64}, "data.prompts_per_step=12 is not divisible by"),
    ({A + "minibatch_size": 4}, "model.algorithm.minibatch_size=4 is not divisible by 8 ranks"),
    ({A + "estimator": "rloo", D + "samples_per_prompt": 1}, "data.samples_per_prompt=1: estimator 'rloo'"),
    ({D + "val_files": None}, "trainer.callbacks: Evaluation evaluates held-out problems, but data.val_"),
    ({D + "train_files": "/nonexistent/t.jsonl"}, "data.train_files: /nonexistent/t.jsonl does not exist"),
    ({"model.init_args.critic_path": "/nonexistent/rm"}, "model.critic_path: "),
    ({D + "model_path": "/nonexistent/policy"}, "data.model_path: "),
    ({D + "engine.gpu_memory_utilization": 1.5}, "data.engine.gpu_memory_utilization must be in (0, 1]"),
    ({"model.init_args.optim.warmup_steps": -1}, "model.optim.warmup_steps must be >= 0"),
    # AdamW itself would reject these two only in configure_optimizers, after the models are loaded.
    ({"model.init_args.optim.betas": (0.9, 1.0)}, "model.optim.betas must be two numbers in [0, 1)"),
    ({"model.init_args.optim.eps": 0.0}, "model.optim.eps must be > 0"),
    # An adaptive KL controller starting from beta = 0 stays at 0 (it is multiplicative).
    ({A + "kl_target": 0.1}, "model.algorithm.kl_target needs kl_reward_coef > 0"),
    ({A + "policy_loss": "aspo"}, "model.algorithm.dual_clip_c must be set for policy_loss 'aspo'"),
    ({A + "eps_low": 1.5}, "model.algorithm.eps_low must be in [0, 1], got 1.5"),
    ({A + "adv_eps": 0.0}, "model.algorithm.adv_eps must be a finite number > 0"),
    ({A + "ppo_epochs": 2, A + "critic_epochs": 1}, "model.algorithm.critic_epochs must be >= ppo_epochs (2)"),
    ({A + "critic_replay_batches": 4}, "model.algorithm.critic_replay_batches needs critic_epochs > ppo_epochs"),
    ({A + "critic_replay_batches": 4, A + "critic_epochs": 2, A + "kl_reward_coef": 0.1},
     "model.algorithm.critic_replay_batches needs kl_reward_coef 0"),
    ({A + "critic_replay_batches": -1}, "model.algorithm.critic_replay_batches must be >= 0"),
    ({"model.init_args.critic_head_init": "ones"}, "model.critic_head_init must be 'zero' or 'random'"),
    ({D + "reward": [{"name": "math_verfy"}]}, "data.reward: unknown reward function 'math_verfy'"),
    ({D + "reward": [{"name": "overlong", "kwargs": {"cap": 1}}]}, "data.reward: reward term 'overlong'"),
]


@pytest.mark.parametrize(("change", "message"), CROSS_FIELD, ids=[m.split(":")[0] for _, m in CROSS_FIELD])
def test_cross_field_checks(paper_namespace, change, message):
    validate_run_config(paper_namespace)  # the unchanged namespace is valid: each case fails for its change
    with pytest.raises(ConfigError) as info:
        validate_run_config(changed(paper_namespace, change))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_world_size_unknown_until_run_time_skips_the_rank_checks(paper_namespace):
    """devices "auto" or -1: the ranks are counted at run time, so only the global batch is checked here."""
    for devices in ("auto", -1, "-1"):
        validate_run_config(changed(paper_namespace, {"trainer.devices": devices, A + "micro_batch_size": 3}))


def test_validate_accepts_a_loaded_print_config_dump(paper_namespace):
    """``validate_run_config`` also takes a plain mapping, e.g. a saved ``--print_config`` file."""
    dump = paper_namespace.as_dict()
    validate_run_config(dump)
    dump["model"]["init_args"]["algorithm"]["eps_low"] = -1.0
    with pytest.raises(ConfigError, match=r"^model\.algorithm\.eps_low must be a number >= 0"):
        validate_run_config(dump)


# ------------------------------------------------------------------ the installed console script
def test_console_script_help():
    """pyproject's ``[project.scripts]`` is installed: the script exists and ``--help`` is ours."""
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("vapo-pl") == "vapo_pl.cli:main", "vapo-pl not installed: pip install -e ."
    exe = Path(sys.executable).parent / "vapo-pl"
    result = subprocess.run([str(exe), "--help"], check=False, capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    for word in ("vapo-pl: VAPO", "--config", "--print_config", "fit", "validate"):
        assert word in result.stdout


def test_console_script_exits_zero_after_a_run(monkeypatch):
    """The installed wrapper does ``sys.exit(main())``: after a finished run ``main`` must return 0, not the
    CLI object (``sys.exit`` would print that object and exit with status 1, failing ``make demo``)."""
    ran = []
    monkeypatch.setattr(cli, "run", lambda args=None: ran.append(args) or object())
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["fit"]))
    assert ran == [["fit"]] and exit_info.value.code == 0


def test_fsdp2_cpu_offload_on_cpu_is_one_line_before_anything_loads(tiny_model_dir, tmp_path, capsys):
    """``FSDP2Strategy(cpu_offload=True)`` offloads from an accelerator; on CPU FSDP2 would fail deep in its first
    forward ("Cannot access accelerator device"), so the strategy refuses it while the trainer sets up."""
    code = main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--config",
                 str(REPO / "configs/strategies/fsdp2.yaml"), "--trainer.strategy.init_args.cpu_offload=true",
                 f"--model.init_args.model_path={tiny_model_dir}", "--trainer.logger=false",
                 f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: trainer.strategy.init_args.cpu_offload: FSDP2 offloads from GPUs"), err[-3:]
