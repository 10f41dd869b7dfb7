"""``benchmarks/compare_algorithms.py`` without its 19 training runs: the configs it derives and its report.

Every derived config goes through the real ``vapo-pl`` parser and the cross-field checks ``vapo-pl fit`` runs,
so a run of the comparison cannot die on a config mistake an hour in. The report functions get curves built
here; the full comparison itself is a benchmark (its output is committed under ``docs/results``).
"""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
import yaml

from tests.conftest import REPO
from vapo_pl.cli import build_parser, validate_run_config

_spec = importlib.util.spec_from_file_location("compare_algorithms", REPO / "benchmarks" / "compare_algorithms.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

DEMO = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
LONG = yaml.safe_load((REPO / "configs" / "demo_long.yaml").read_text())
ALL_RUNS = compare.ALL_RUNS


def _algo(cfg: dict) -> dict:
    return cfg["model"]["init_args"]["algorithm"]


def _callbacks(cfg: dict) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]


def _budget(cfg: dict) -> tuple[int, int]:
    data = cfg["data"]["init_args"]
    return data["prompts_per_step"] * data["samples_per_prompt"], cfg["trainer"]["max_steps"]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("task", sorted(compare.TASKS))
@pytest.mark.parametrize("run", ALL_RUNS)
def test_every_run_parses_and_passes_the_fit_checks(run, task, parser, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo configs name their data relative to the repository
    base = yaml.safe_load((REPO / compare.TASKS[task][0]).read_text())
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(compare.make_config(base, run)))
    cfg = parser.parse_args(["fit", "--config", str(path), f"--model.init_args.model_path={tiny_model_dir}"]).fit
    validate_run_config(cfg)


@pytest.mark.parametrize("run", ALL_RUNS)
def test_every_run_has_the_demo_rollout_budget(run):
    assert _budget(compare.make_config(DEMO, run)) == _budget(DEMO)


def test_vapo_is_the_demo_config_unchanged():
    assert compare.make_config(DEMO, "vapo") == DEMO


@pytest.mark.parametrize(("run", "key", "value"), [
    ("wo_decoupled_gae", "lambda_critic", 0.95),
    ("wo_length_adaptive_gae", "length_adaptive_alpha", None),
    ("wo_clip_higher", "eps_high", 0.2),
    ("wo_token_level_loss", "loss_agg_mode", "seq-mean-token-mean"),
    ("wo_positive_example_lm_loss", "nll_coef", 0.0),
])
def test_each_algorithm_ablation_changes_exactly_its_technique(run, key, value):
    cfg = compare.make_config(DEMO, run)
    changed = {k for k in _algo(cfg) if _algo(cfg)[k] != _algo(DEMO)[k]}
    assert changed == {key} and _algo(cfg)[key] == value
    assert cfg["data"] == DEMO["data"] and _callbacks(cfg) == _callbacks(DEMO)


def test_the_other_two_ablations():
    wo_pretrain = compare.make_config(DEMO, "wo_value_pretraining")
    assert "ValuePretraining" in _callbacks(DEMO) and "ValuePretraining" not in _callbacks(wo_pretrain)
    assert _algo(wo_pretrain) == _algo(DEMO)
    wo_group = compare.make_config(DEMO, "wo_group_sampling")["data"]["init_args"]
    assert wo_group["samples_per_prompt"] == 1 and _algo(compare.make_config(DEMO, "wo_group_sampling")) == _algo(DEMO)


def test_baselines_encode_their_algorithms():
    ppo, grpo, dapo = (compare.make_config(DEMO, r) for r in ("ppo", "grpo", "dapo"))
    assert _algo(ppo)["estimator"] == "gae" and _algo(ppo)["lambda_critic"] == _algo(ppo)["lambda_policy"]
    assert _algo(ppo)["eps_high"] == _algo(ppo)["eps_low"] and _algo(ppo)["nll_coef"] == 0.0
    assert "ValuePretraining" not in _callbacks(ppo)
    assert _algo(grpo)["estimator"] == "grpo" and _algo(grpo)["kl_loss_coef"] > 0
    assert _algo(grpo)["loss_agg_mode"] == "seq-mean-token-mean"
    assert _algo(dapo)["estimator"] == "grpo" and _algo(dapo)["eps_high"] > _algo(dapo)["eps_low"]
    assert _algo(dapo)["loss_agg_mode"] == "token-mean" and dapo["data"]["init_args"]["dynamic_sampling"]
    assert [t["name"] for t in dapo["data"]["init_args"]["reward"]] == ["math_verify", "overlong"]


def test_unknown_run_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown run 'vapoo'; valid: vapo, ppo"):
        compare.make_config(DEMO, "vapoo")


def _result(run, seed, accuracy, samples=1000, seconds=60.0):
    return {"run": run, "seed": seed, "seconds": seconds, "accuracy": list(enumerate(accuracy)), "samples": samples}


def test_summary_statistics():
    results = [
        _result("a", 0, [0.3, 0.7, 0.85, 0.9]),
        _result("a", 1, [0.4, 0.82, 0.8, 0.5]),  # reaches 0.8 at step 1, then loses 0.32: collapsed
        _result("b", 0, [0.3, 0.5, 0.6, 0.7], samples=3000, seconds=120.0),
    ]
    a, b = compare.summarise(results)
    assert a["run"] == "a" and a["seeds"] == 2
    assert a["base"] == pytest.approx(0.35)
    assert a["final_mean"] == pytest.approx(0.7) and a["final_std"] == pytest.approx(statistics.pstdev([0.9, 0.5]))
    assert a["steps_to"] == "2 (2/2)"  # steps 2 and 1
    assert a["collapsed"] == "1/2"
    assert b["steps_to"] == "never" and b["collapsed"] == "0/1" and b["final_std"] == 0.0
    assert b["samples"] == 3000 and b["minutes"] == pytest.approx(2.0)
    assert a["critic_ev"] is None  # no critic curve recorded
    # another threshold, and the critic's explained variance averaged over the runs' RL steps (NaN skipped)
    results[0]["explained_var"] = [(1, 0.2), (2, float("nan")), (3, 0.6), (11, 1.0)]
    results[0]["pretrain_explained_var"] = [(s, 0.1 * s) for s in range(1, 8)]  # the last 5: 0.3 .. 0.7
    a, b = compare.summarise(results, threshold=0.9)
    assert a["steps_to"] == "3 (1/2)" and b["steps_to"] == "never"
    assert a["critic_ev"] == pytest.approx(0.6) and a["critic_ev_early"] == pytest.approx(0.4)
    assert a["first_rl_ev"] == pytest.approx(0.2) and a["pretrain_ev"] == pytest.approx(0.5)


def test_report_files(tmp_path):
    results = [_result(r, s, [0.3, 0.6 + 0.1 * s, 0.85]) for r in ("vapo", "grpo") for s in range(2)]
    compare.write_outputs(results, compare.summarise(results), tmp_path)
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | seeds |") and "steps to 0.8" in table[0] and len(table) == 2 + 2
    assert table[2].startswith("| vapo | 2 | 0.300 | 0.850 ± 0.000 | 2 (2/2) | 0/2 | — | — | — | — | — | 1000 |")
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_explained_variance_against_monte_carlo_returns_counts_the_runs_that_logged_it(tmp_path):
    """The Monte-Carlo EV column averages the runs that logged ``critic/explained_var_mc`` and says how many did."""
    results = [dict(_result("vapo", s, [0.3, 0.8]), explained_var=[(1, 0.9), (2, 0.9)]) for s in range(3)]
    results[0]["explained_var_mc"] = [(1, 0.1), (2, 0.3)]
    results[1]["explained_var_mc"] = [(1, 0.5), (2, float("nan"))]
    row = compare.summarise(results)[0]
    assert row["critic_ev_mc"] == "0.30 (2/3)"
    compare.write_outputs(results, [row], tmp_path)
    assert "| 0.90 | 0.30 (2/3) | 1000 |" in (tmp_path / "compare.md").read_text()


def test_reuse_takes_earlier_results_except_retrained_runs(tmp_path, monkeypatch, capsys):
    """``--reuse``: runs held by the earlier JSON are not trained again (``run_one`` is replaced by a recorder,
    so nothing trains here), ``--retrain`` runs are, and a JSON from a different step budget is refused."""
    steps = DEMO["trainer"]["max_steps"]
    earlier = [dict(_result(r, 0, [0.3, 0.9]), max_steps=steps, eval_every=5) for r in ("vapo", "ppo")]
    reuse = tmp_path / "earlier.json"
    reuse.write_text(json.dumps(earlier))
    trained = []

    def fake_run_one(base, run, seed, steps, work, eval_every=None, shared=None):
        assert shared == {}  # pretraining is shared unless --no-share-pretraining (nothing pretrains here)
        trained.append(run)
        return dict(_result(run, seed, [0.3, 0.5]), max_steps=steps, eval_every=eval_every)

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    argv = ["compare", "--runs", "vapo", "ppo", "grpo", "--seeds", "1", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), "--reuse", str(reuse), "--retrain", "vapo"]
    monkeypatch.setattr("sys.argv", argv)
    compare.main()
    assert trained == ["vapo", "grpo"]  # ppo came from the earlier comparison
    curves = json.loads((tmp_path / "out" / "compare_curves.json").read_text())
    assert [(r["run"], r["accuracy"][-1][1]) for r in curves] == [("vapo", 0.5), ("ppo", 0.9), ("grpo", 0.5)]

    monkeypatch.setattr("sys.argv", [*argv, "--steps", str(steps + 1)])
    with pytest.raises(SystemExit, match=r"ppo seed 0 ran \d+ steps evaluated every 5, this comparison \d+ every 5"):
        compare.main()


@pytest.mark.parametrize("content", [None, "not json", '[{"x": 1}]'])
def test_reuse_of_a_bad_file_is_one_line(content, tmp_path, monkeypatch, capsys):
    path = tmp_path / "earlier.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr("sys.argv", ["compare", "--reuse", str(path), "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        compare.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(f"compare: error: --reuse {path}: not a comparison's")


def test_runs_that_would_pretrain_the_same_critic_share_one_pretraining():
    """VAPO and the ablations that change only what value pretraining never reads get one key per seed; group
    sampling changes the batches (its own key), the baselines and wo_value_pretraining do not pretrain."""
    keys = {run: compare.pretraining_key(compare.make_config(LONG, run), 0) for run in compare.ALL_RUNS}
    shared = {"vapo", "vapo_critic_replay", "wo_decoupled_gae", "wo_length_adaptive_gae", "wo_clip_higher",
              "wo_token_level_loss", "wo_positive_example_lm_loss"}
    assert {run for run, k in keys.items() if k == keys["vapo"]} == shared
    assert keys["wo_group_sampling"] not in (None, keys["vapo"])
    assert keys["vapo_logprob_critic"] not in (None, keys["vapo"])  # a different critic: its own pretraining
    assert compare.make_config(LONG, "vapo_logprob_critic")["model"]["init_args"]["critic_logprob_features"] is True
    assert "critic_logprob_features" not in compare.make_config(LONG, "vapo")["model"]["init_args"]
    both = compare.make_config(LONG, "wo_group_sampling_logprob_critic")
    assert both["model"]["init_args"]["critic_logprob_features"] is True
    assert both["data"]["init_args"] == compare.make_config(LONG, "wo_group_sampling")["data"]["init_args"]
    assert keys["wo_group_sampling_logprob_critic"] not in (None, keys["vapo"], keys["wo_group_sampling"],
                                                            keys["vapo_logprob_critic"])
    assert all(keys[run] is None for run in ("ppo", "grpo", "dapo", "wo_value_pretraining"))
    assert compare.pretraining_key(compare.make_config(LONG, "vapo"), 1) != keys["vapo"]


def test_a_resumed_comparison_shares_the_reused_runs_pretrained_critics(tmp_path, monkeypatch, capsys):
    """Resumed in the same work directory, a reused VAPO run's pretrained critic is handed to the ablations that would
    pretrain the same critic; when the critic file is gone, or the run is not reused, the ablation pretrains its own.
    ``run_one`` is replaced by a recorder, so nothing trains here."""
    work = tmp_path / "work"
    work.mkdir()
    steps = LONG["trainer"]["max_steps"]
    earlier = [dict(_result("vapo", s, [0.3, 0.9]), max_steps=steps, eval_every=5, _critic_id=s) for s in (0, 1)]
    reuse = tmp_path / "earlier.json"
    reuse.write_text(json.dumps(earlier))
    (work / "pretrained_critic_0.pt").write_bytes(b"")  # seed 1's file is missing
    producers = {}

    def fake_run_one(base, run, seed, steps, work, eval_every=None, shared=None):
        key = compare.pretraining_key(compare.make_config(base, run), seed)
        producer = shared.get(key)
        producers[(run, seed)] = (producer["run"], producer["_critic_id"]) if producer else None
        result = dict(_result(run, seed, [0.3, 0.5]), max_steps=steps, eval_every=eval_every)
        if producer is None:
            result["_critic_id"] = compare._next_critic_id(shared)
            shared[key] = result
        return result

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    monkeypatch.setattr("sys.argv", ["compare", "--task", "long", "--runs", "vapo", "wo_clip_higher", "--seeds", "2",
                                     "--ablation-seeds", "2", "--out", str(tmp_path / "out"), "--work", str(work),
                                     "--reuse", str(reuse)])
    compare.main()
    assert producers == {("wo_clip_higher", 0): ("vapo", 0), ("wo_clip_higher", 1): None}
    out = capsys.readouterr().out
    assert "vapo                         seed 0: reused from" in out and "(its pretrained critic is shared)" in out
    assert out.count("(its pretrained critic is shared)") == 1


def test_the_critic_replay_variant_changes_only_the_replay_on_the_long_task():
    """On the long task (critic_epochs 4) the variant sets critic_replay_batches and nothing else; on the demo
    (no critic-only pass) it adds the one pass the replay trains."""
    cfg = compare.make_config(LONG, "vapo_critic_replay")
    assert _algo(cfg).pop("critic_replay_batches") == 4 and cfg == LONG
    demo = _algo(compare.make_config(DEMO, "vapo_critic_replay"))
    assert demo["critic_replay_batches"] == 4 and demo["critic_epochs"] == demo.get("ppo_epochs", 1) + 1


def test_tool_call_rate_column_reports_first_and_last_means(tmp_path):
    results = [dict(_result("vapo", s, [0.3, 0.8]), tool_call_rate=[(0, 0.2), (5, 0.6 + 0.2 * s)]) for s in range(2)]
    results.append(_result("grpo", 0, [0.3, 0.8]))
    vapo, grpo = compare.summarise(results)
    assert vapo["tool_rate"] == "0.20 -> 0.70" and grpo["tool_rate"] == "—"
    compare.write_outputs(results, [vapo, grpo], tmp_path)
    assert "| 1000 | 0.20 -> 0.70 |" in (tmp_path / "compare.md").read_text()


def test_samples_generated_by_each_evaluation_step():
    """The plot's second panel: value pretraining first, then each RL step's sampling rounds (DAPO draws more than
    one round a step); results from before the rounds were kept spread their RL samples evenly."""
    r = {"accuracy": [(0, 0.3), (2, 0.5), (4, 0.8)], "pretrain_steps": 3, "per_round": 10, "max_steps": 4,
         "sampling_rounds": [(1, 1), (2, 3), (3, 1), (4, 2)], "samples": 10 * (3 + 7)}
    assert compare.samples_at(r, 999) == [(0, 30), (2, 30 + 40), (4, 30 + 70)]
    old = {"accuracy": [(0, 0.3), (2, 0.5), (4, 0.8)], "pretrain_steps": 3, "max_steps": 4, "samples": 10 * 3 + 80}
    assert compare.samples_at(old, 10) == [(0, 30), (2, 70.0), (4, 110.0)]
