"""CI's smoke run of the embedded default: `vapo-pl fit --config configs/demo.yaml` for 2 RL steps.

The demo's base policy takes minutes to pretrain, so the run uses the session's random tiny model instead
(same architecture family, same vLLM engine, verifier, callbacks and algorithm settings); an overlay shrinks
the evaluation so the smoke run stays short."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def smoke_callbacks(config: str) -> list[dict]:
    """The callbacks of ``configs/<config>`` as written, shrunk for a 2-step smoke run: one value-pretraining step, an
    evaluation of 4 problems x 2 samples at every step."""
    callbacks = yaml.safe_load((REPO / "configs" / config).read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("ValuePretraining"):
            cb["init_args"] = {"steps": 1}
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(every_n_steps=1, max_problems=4, samples_per_prompt=2)
    return callbacks


def test_demo_config_runs_two_steps(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from vapo_pl.cli import run

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository
    callbacks = smoke_callbacks("demo.yaml")
    overlay = tmp_path / "smoke.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "callbacks": callbacks, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "tb"), "name": "smoke"}}},
        "model": {"init_args": {"model_path": str(tiny_model_dir)}},
    }))
    cli = run(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(overlay)])
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 2 and module.policy_version == 2
    # all seven VAPO techniques are on in the demo config
    algo = module.algorithm
    assert algo.estimator == "gae" and algo.lambda_critic == 1.0 and algo.length_adaptive_alpha is not None
    assert algo.eps_high > algo.eps_low and algo.loss_agg_mode == "token-mean" and algo.nll_coef > 0
    assert cli.datamodule.samples_per_prompt > 1 and cli.datamodule.engine_config.kind == "vllm"
    assert any(type(cb).__name__ == "ValuePretraining" and cb.done for cb in cli.trainer.callbacks)
    assert "held-out evaluation 'heldout': step 0 -> step 2" in capsys.readouterr().out
    assert list((tmp_path / "tb" / "smoke").glob("version_*/events.out.tfevents.*"))


def test_tools_demo_config_runs_two_steps(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`vapo-pl fit --config configs/demo_tools.yaml` as written, on the random tiny model for 2 steps: multi-turn
    episodes through vLLM and the sandboxed calculator, the episode metrics logged, turns and tool-call rate in the
    evaluation summary."""
    from vapo_pl.cli import run

    monkeypatch.chdir(REPO)
    callbacks = smoke_callbacks("demo_tools.yaml")
    overlay = tmp_path / "smoke.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "callbacks": callbacks, "enable_progress_bar": False, "logger": False},
        "model": {"init_args": {"model_path": str(tiny_model_dir)}},
    }))
    cli = run(["fit", "--config", str(REPO / "configs" / "demo_tools.yaml"), "--config", str(overlay)])
    assert cli.trainer.global_step == 2 and cli.datamodule.environment is not None
    metrics = cli.trainer.callback_metrics
    for name in ("episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/observation_token_share"):
        assert name in metrics, name
    out = capsys.readouterr().out
    assert "eval/heldout_tool_call_rate" in out and "eval/heldout_turns_mean" in out
