"""Tests for callbacks/evaluation.py.

The metric functions: hand-worked cases, pass@k against brute-force enumeration of subsets and against exact
integer binomials, maj@k ties and abstentions. The callback: its aggregation on hand-built correct/extracted
arrays (a random tiny model almost never answers correctly, so the real engine cannot exercise the
arithmetic), its schedule and state, and the real path: a RolloutDataModule with the ``hf`` engine over a
tiny model, driven by a real Trainer.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from vapo_pl.callbacks.evaluation import Evaluation, maj_at_k, pass_at_k

from tests.callbacks._helpers import read_events, scalars


# ---------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 5, 1.0),  # all five drawn: the two correct ones are among them
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c = 3 < 4: any 4 include a correct one
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_cases(n, c, k, expected):
    got = pass_at_k(n, torch.tensor([c]), k)
    assert got.dtype == torch.float64
    assert float(got[0]) == pytest.approx(expected, abs=1e-12)


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_matches_subset_enumeration(n):
    for k in range(1, n + 1):
        c = torch.arange(n + 1)
        got = pass_at_k(n, c, k)
        expected = torch.tensor([_pass_at_k_brute_force(n, int(ci), k) for ci in c], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, c, k", [(1000, 10, 100), (500, 3, 250), (200, 1, 1), (64, 63, 32)])
def test_pass_at_k_is_stable_for_large_n(n, c, k):
    # exact rational arithmetic with Python's big integers as the reference
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert float(pass_at_k(n, torch.tensor([c]), k)[0]) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_is_monotone_in_k_and_c():
    n = 16
    table = torch.stack([pass_at_k(n, torch.arange(n + 1), k) for k in range(1, n + 1)])  # (k, c)
    assert (table[1:] >= table[:-1] - 1e-12).all()  # more draws never hurt
    assert (table[:, 1:] >= table[:, :-1] - 1e-12).all()  # more correct samples never hurt
    torch.testing.assert_close(table[0], torch.arange(n + 1, dtype=torch.float64) / n)  # pass@1 = c / n


@pytest.mark.parametrize("n, c, k", [(5, [2], 0), (5, [2], 6), (5, [6], 1), (5, [-1], 1)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, torch.tensor(c), k)


# ----------------------------------------------------------------------------------------------- maj@k
def test_maj_at_k_hand_cases():
    answers = [
        ["3", "3", "4"],  # "3" wins 2-1 and is correct
        ["4", "3", "4"],  # "4" wins and is wrong
        ["5", "6", " 6 ", "5"],  # 2-2 tie ("6" and " 6 " are one vote): "5" appears first, wrong
        ["6", "5", "5", "6"],  # 2-2 tie: "6" appears first, correct
        [None, None, "7"],  # abstentions do not vote: "7" wins alone
        [None, "", None],  # nobody answered: 0
    ]
    correct = [
        [True, True, False],
        [False, True, False],
        [False, True, True, False],
        [True, False, False, True],
        [False, False, True],
        [False, False, False],
    ]
    got = torch.cat([maj_at_k([a], torch.tensor([c])) for a, c in zip(answers, correct)])
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_maj_at_k_batched_equals_row_by_row():
    answers = [["1", "2", "2"], ["9", "9", "8"], ["x", None, "y"]]
    correct = torch.tensor([[False, True, True], [False, False, True], [False, False, True]])
    assert maj_at_k(answers, correct).tolist() == [1.0, 0.0, 0.0]  # row 3: "x"/"y" tie, "x" first


def test_maj_at_k_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="correct"):
        maj_at_k([["1", "2"]], torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="answers"):
        maj_at_k([["1", "2", "3"]], torch.tensor([[True, False]]))


# ------------------------------------------------------------------------------------- the aggregation
def test_problem_sums_on_hand_built_arrays():
    ev = Evaluation(every_n_steps=1, name="toy", samples_per_prompt=3)
    # problem 0: 2 of 3 correct, majority "4" correct; problem 1: 0 correct; problem 2: 1 of 3, majority wrong
    correct = torch.tensor([True, True, False, False, False, False, False, True, False])
    extracted = ["4", "4", "5", None, "1", "1", "8", "6", "8"]
    lengths = torch.tensor([3, 5, 7, 16, 16, 1, 2, 2, 2])
    truncated = torch.tensor([False, False, False, True, True, False, False, False, False])
    mean, pas, maj, problems, len_sum, samples, trunc = ev.problem_sums(correct, extracted, lengths, truncated).tolist()
    assert mean == pytest.approx(2 / 3 + 0 + 1 / 3)
    assert pas == pytest.approx(1 + 0 + 1)  # with n = k, pass@k is "any correct"
    assert maj == pytest.approx(1 + 0 + 0)
    assert (problems, len_sum, samples, trunc) == (3, 54, 9, 2)
    assert ev.metric_names()[:3] == ["eval/toy_mean@3", "eval/toy_pass@3", "eval/toy_maj@3"]


# ------------------------------------------------------------------------------ arguments, schedule, state
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"samples_per_prompt": 0}, "samples_per_prompt"),
        ({"prompts_per_call": 0}, "prompts_per_call"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_problems": 0}, "max_problems"),
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 0.0, "samples_per_prompt": 4}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"Evaluation.{arg}"):
        Evaluation(**{"every_n_steps": 5, **kwargs})


def test_schedule():
    ev = Evaluation(every_n_steps=3)
    assert [s for s in range(10) if ev.due(s)] == [0, 3, 6, 9]
    assert [s for s in range(10) if Evaluation(every_n_steps=3, at_start=False).due(s)] == [3, 6, 9]
    ev.history.append({"step": 3, "eval/heldout_mean@4": 0.5})
    assert not ev.due(3)  # already evaluated at this step (e.g. restored from a checkpoint)


def test_history_round_trips_and_state_key_names_the_set():
    ev = Evaluation(every_n_steps=2, name="aime24")
    ev.history = [{"step": 0, "eval/aime24_mean@4": 0.1}, {"step": 2, "eval/aime24_mean@4": 0.3}]
    restored = Evaluation(every_n_steps=2, name="aime24")
    restored.load_state_dict(ev.state_dict())
    assert restored.history == ev.history
    assert "aime24" in ev.state_key and ev.state_key != Evaluation(every_n_steps=2, name="gsm8k").state_key


# ------------------------------------------------------------------------------------------ real path
@pytest.fixture(scope="module")
def arithmetic_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    train, val = root / "train.jsonl", root / "val.jsonl"
    with train.open("w") as fh:
        for a in range(4):
            fh.write(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n")
    with val.open("w") as fh:
        for a, b in [(1, 2), (3, 4), (5, 1)]:
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return train, val


def _datamodule(tiny_model_dir, files):
    from vapo_pl.datamodule import RolloutDataModule
    from vapo_pl.rewards.base import RewardTerm
    from vapo_pl.rollout.config import EngineConfig

    train, val = files
    return RolloutDataModule(
        train_files=str(train), val_files=str(val), model_path=str(tiny_model_dir),
        engine=EngineConfig(kind="hf", dtype="float32"), reward=[RewardTerm(name="math_verify")],
        max_prompt_length=32, max_response_length=16, prompts_per_step=2, samples_per_prompt=2, seed=0,
    )


def test_real_engine_evaluation_structure(tiny_model_dir, arithmetic_files):
    """The real DataModule and ``hf`` engine over a random tiny model: k samples per problem, metrics in
    range, a step-0 history entry, the same step giving the same numbers, no ReMax greedy decode."""
    dm = _datamodule(tiny_model_dir, arithmetic_files)
    dm.setup("fit")
    assert len(dm.val_prompt_ids) == 3
    ev = Evaluation(every_n_steps=1, name="arith", samples_per_prompt=3, max_tokens=8, max_problems=2,
                    prompts_per_call=1)
    engine = dm.engine
    calls = []
    engine_generate = engine.generate

    def recording_generate(prompt_token_ids, sampling):
        out = engine_generate(prompt_token_ids, sampling)
        calls.append((len(prompt_token_ids), sampling, [len(group) for group in out],
                      max(len(c.token_ids) for group in out for c in group)))
        return out

    engine.generate = recording_generate
    dm.greedy_baseline = True  # as under ReMax: evaluation must not add greedy decodes
    metrics = ev.evaluate(dm, step=0)
    assert dm.greedy_baseline is True  # untouched
    assert set(metrics) == set(ev.metric_names())
    assert len(calls) == 2  # max_problems=2, one problem per call, no greedy call
    for n_prompts, sampling, group_sizes, longest in calls:
        assert (sampling.n, sampling.temperature, sampling.top_p, sampling.max_tokens) == (3, 1.0, 1.0, 8)
        assert n_prompts == 1 and group_sizes == [3] and longest <= 8  # k samples, capped at max_tokens
    assert calls[0][1].seed != calls[1][1].seed
    for name in ("mean@3", "pass@3", "maj@3", "clip_ratio"):
        assert 0.0 <= metrics[f"eval/arith_{name}"] <= 1.0
    assert metrics["eval/arith_mean@3"] <= metrics["eval/arith_pass@3"]
    assert 1.0 <= metrics["eval/arith_response_length_mean"] <= 8.0
    assert ev.history == [{"step": 0, **metrics}]
    first_seeds = [c[1].seed for c in calls]
    calls.clear()
    assert ev.evaluate(dm, step=0) == metrics  # the seeds derive from the step: reproducible
    assert [c[1].seed for c in calls] == first_seeds and len(ev.history) == 2


class Stepper(pl.LightningModule):
    """Pulls the DataModule's real rollout batches the way ``VAPOModule`` does (``dataloader_iter``, no
    prefetch) and takes a dummy optimizer step, so the Trainer runs the callback's hooks as in a real run
    (the policy itself is not trained)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)
        opt = self.optimizers()
        self.manual_backward((self.weight ** 2).sum())
        opt.step()
        return {"rollout": batch, "entropy": None, "metrics": {}}

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)


def test_trainer_evaluates_at_start_every_n_and_at_end(tmp_path, tiny_model_dir, arithmetic_files, capsys):
    """A real Trainer over the real DataModule: evaluations at steps 0 and 2 (before those steps' rollouts)
    and 3 (the end), written to TensorBoard at those steps and kept in ``history``."""
    dm = _datamodule(tiny_model_dir, arithmetic_files)
    ev = Evaluation(every_n_steps=2, name="arith", samples_per_prompt=2, max_tokens=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=logger, callbacks=[ev],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    order = []
    generate = dm._generate

    def recording_generate(idx, sampling, records, prompt_ids, greedy_baseline):
        order.append(("eval" if records is dm.val_records else "train", trainer.global_step))
        return generate(idx, sampling, records, prompt_ids, greedy_baseline)

    dm._generate = recording_generate
    trainer.fit(Stepper(), datamodule=dm)

    assert [h["step"] for h in ev.history] == [0, 2, 3]
    # step s's evaluation runs before step s's rollout: both then describe the policy after s updates
    assert order == [("eval", 0), ("train", 0), ("train", 1), ("eval", 2), ("train", 2), ("eval", 3)]
    acc = read_events(logger)
    for name in ("mean@2", "pass@2", "maj@2"):
        logged = scalars(acc, f"eval/arith_{name}")
        assert sorted(logged) == [0, 2, 3]  # no stale repeat at step 1
        assert logged == pytest.approx({h["step"]: h[f"eval/arith_{name}"] for h in ev.history})
    assert float(trainer.callback_metrics["eval/arith_mean@2"]) == pytest.approx(ev.history[-1]["eval/arith_mean@2"])
    # one progress line per evaluation, with that evaluation's numbers
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("held-out 'arith' at step")]
    assert [ln.split(":")[0] for ln in lines] == [f"held-out 'arith' at step {s}" for s in (0, 2, 3)]
    assert lines[-1].endswith(f"maj@2 {ev.history[-1]['eval/arith_maj@2']:.3f}")


def test_summary_reports_first_and_last_evaluation():
    from vapo_pl.callbacks.evaluation import Evaluation

    cb = Evaluation(every_n_steps=5, name="heldout", samples_per_prompt=4)
    cb.history = [{"step": 0, "eval/heldout_mean@4": 0.25, "eval/heldout_pass@4": 0.5},
                  {"step": 5, "eval/heldout_mean@4": 0.5, "eval/heldout_pass@4": 0.75},
                  {"step": 10, "eval/heldout_mean@4": 0.875, "eval/heldout_pass@4": 1.0}]
    text = cb.summary()
    assert "step 0 -> step 10" in text
    assert "eval/heldout_mean@4" in text and "0.250 -> 0.875" in text and "0.500 -> 1.000" in text
