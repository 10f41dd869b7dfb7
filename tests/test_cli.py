"""The ``vapo-pl`` command line: overrides, ``--print_config``, several ``--config`` files, and configuration
mistakes that end in one ``error:`` line naming the field, before any model is loaded.

Runs go through ``vapo_pl.cli.main`` in this process (one jsonargparse + Lightning import for the whole file);
only the console-script check starts a subprocess. Loading a model, a tokenizer or a rollout engine is
replaced by a function that records the call and raises, so a check that slipped past parsing could not go
unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

import vapo_pl.cli as cli
from vapo_pl.cli import ConfigError, build_parser, main, validate_run_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "vapo_qwen2.5_32b.yaml"
WO_CLIP_HIGHER = REPO / "configs" / "ablations" / "wo_clip_higher.yaml"
PROMPTS = REPO / "vapo_pl" / "data" / "gsm8k_test.jsonl"  # stands in for the paper's training prompts
ALGO = "--model.init_args.algorithm."


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name bundled files relative to the repository root


@pytest.fixture
def model_loads(monkeypatch):
    """Calls that would load weights, a tokenizer or a vLLM engine; each raises if it happens."""
    import transformers

    import vapo_pl.critic
    import vapo_pl.rollout.factory

    calls: list[str] = []

    def refuse(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while parsing the configuration")

        return load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("AutoModelForCausalLM"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("AutoTokenizer"))
    monkeypatch.setattr(vapo_pl.critic.ValueModel, "from_pretrained", refuse("ValueModel"))
    monkeypatch.setattr(vapo_pl.rollout.factory, "build_engine", refuse("build_engine"))
    monkeypatch.setattr(sys, "argv", ["vapo-pl"])  # main(args) warns when sys.argv holds pytest's arguments
    return calls


@pytest.fixture
def base_args(tiny_model_dir):
    """The paper config with this machine's paths and one CPU device: valid, so each test adds one mistake."""
    return ["fit", "--config", str(PAPER), f"--model.init_args.model_path={tiny_model_dir}",
            f"--data.init_args.train_files={PROMPTS}", "--trainer.accelerator=cpu", "--trainer.devices=1"]


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
    assert (algo["eps_low"], algo["lambda_critic"], algo["length_adaptive_alpha"]) == (0.2, 1.0, 0.05)  # paper
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


# (extra arguments, substrings of the error line). The first group fails in the cross-field checks before
# instantiation; the last two in a constructor during instantiation (which loads nothing either).
MISTAKES = {
    "unknown estimator": ([ALGO + "estimator=gea"], ["model.algorithm.estimator", "'gea'", "gae, grpo"]),
    "unknown policy loss": ([ALGO + "policy_loss=ppo2"], ["model.algorithm.policy_loss", "'ppo2'", "gspo"]),
    "lambda out of range": ([ALGO + "lambda_critic=1.5"], ["model.algorithm.lambda_critic", "[0, 1]", "1.5"]),
    "eps out of range": ([ALGO + "eps_high=-0.1"], ["model.algorithm.eps_high", ">= 0", "-0.1"]),
    "minibatch does not divide the batch": ([ALGO + "minibatch_size=1000"],
                                            ["model.algorithm.minibatch_size=1000", "512 x 16 = 8192"]),
    "missing model path": (["--model.init_args.model_path=/nonexistent/Qwen"],
                           ["model.model_path", "/nonexistent/Qwen", "does not exist"]),
    "critic callback without a critic": ([ALGO + "estimator=grpo"],
                                         ["trainer.callbacks", "ValuePretraining", "critic", "'grpo'"]),
    "optimizer setting": (["--model.init_args.optim.actor_lr=0"], ["model.optim.actor_lr", "> 0"]),
    "data module argument": (["--data.init_args.top_p=0.7"], ["data.top_p"]),
    "callback argument": (["--trainer.callbacks+=callbacks.LengthScaling", "--trainer.callbacks.window=1"],
                          ["LengthScaling.window", ">= 2"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_fails_in_one_line_naming_the_field(base_args, model_loads, capsys, mistake):
    extra, expected = MISTAKES[mistake]
    code, out, err = run_cli([*base_args, *extra], capsys)
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
    with contextlib.chdir(REPO):
        return build_parser().parse_args(["fit", "--config", str(PAPER), f"--model.init_args.model_path={tiny_model_dir}",
                                          f"--data.init_args.train_files={PROMPTS}"]).fit


def changed(ns, **dotted):
    ns = ns.clone()
    for key, value in dotted.items():
        ns[key.replace("__", ".")] = value
    return ns


@pytest.mark.parametrize(("change", "message"), [
    # 8 devices: per-rank minibatch 512 / 8 = 64, which micro-batches of 3 do not divide.
    ({"model__init_args__algorithm__micro_batch_size": 3}, "micro_batch_size=3 does not divide the per-rank minibatch of 64"),
    # 2 nodes x 8 devices = 16 ranks: 512 / 16 = 32 per rank; 3 does not divide it either.
    ({"trainer__num_nodes": 2, "model__init_args__algorithm__micro_batch_size": 3}, "minibatch of 32"),
    ({"data__init_args__prompts_per_step": 12, "model__init_args__algorithm__minibatch_size": 64},
     "data.prompts_per_step=12 is not divisible by the 8 ranks"),
    ({"model__init_args__algorithm__minibatch_size": 4, "trainer__devices": 8},
     "minibatch_size=4 is not divisible by 8 ranks"),
    ({"model__init_args__algorithm__estimator": "rloo", "data__init_args__samples_per_prompt": 1,
      "data__init_args__prompts_per_step": 512}, "data.samples_per_prompt=1: estimator 'rloo' needs >= 2"),
    ({"data__init_args__val_files": None}, "Evaluation evaluates held-out problems, but data.val_files is not set"),
    ({"data__init_args__train_files": "/nonexistent/train.jsonl"}, "data.train_files: /nonexistent/train.jsonl does not exist"),
    ({"model__init_args__critic_path": "/nonexistent/rm"}, "model.critic_path: model directory /nonexistent/rm"),
    ({"data__init_args__model_path": "/nonexistent/policy"}, "data.model_path: model directory /nonexistent/policy"),
    ({"data__init_args__engine__gpu_memory_utilization": 1.5}, "data.engine.gpu_memory_utilization must be in (0, 1]"),
    ({"model__init_args__optim__warmup_steps": -1}, "model.optim.warmup_steps must be >= 0"),
    ({"model__init_args__algorithm__policy_loss": "aspo"}, "model.algorithm.dual_clip_c must be set"),
    ({"data__init_args__reward": [{"name": "math_verfy"}]}, "data.reward: unknown reward function 'math_verfy'"),
    ({"data__init_args__reward": [{"name": "overlong", "kwargs": {"max_len": 10}}]}, "data.reward: reward term 'overlong': bad kwargs"),
])
def test_cross_field_checks(paper_namespace, change, message):
    validate_run_config(paper_namespace)  # the unchanged namespace is valid: each case fails for its change
    with pytest.raises(ConfigError) as info:
        validate_run_config(changed(paper_namespace, **change))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_world_size_unknown_until_run_time_skips_the_rank_checks(paper_namespace):
    """devices "auto" or -1: the ranks are counted at run time, so only the global batch is checked here."""
    for devices in ("auto", -1, "-1"):
        validate_run_config(changed(paper_namespace, trainer__devices=devices,
                                    model__init_args__algorithm__micro_batch_size=3))


def test_validate_accepts_a_loaded_print_config_dump(paper_namespace):
    """``validate_run_config`` also takes a plain mapping, e.g. a saved ``--print_config`` file."""
    dump = paper_namespace.as_dict()
    validate_run_config(dump)
    dump["model"]["init_args"]["algorithm"]["eps_low"] = -1.0
    with pytest.raises(ConfigError, match=r"^model\.algorithm\.eps_low must be a number >= 0"):
        validate_run_config(dump)


# ------------------------------------------------------------------ the installed console script
def test_console_script_help():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vapo-pl"]
    assert script.value == "vapo_pl.cli:main"
    exe = Path(sys.executable).parent / "vapo-pl"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for word in ("vapo-pl: VAPO", "--config", "--print_config", "fit", "validate"):
        assert word in result.stdout
