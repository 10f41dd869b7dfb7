"""Tests for callbacks/entropy.py: hand-worked sums, a loop reference, the collapse warning, and a real
Trainer writing the scalars to TensorBoard (the rollouts there are hand-built, no engine)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from vapo_pl.callbacks.entropy import FORKING_ENTROPY_NATS, LOW_ENTROPY_NATS, EntropyTracker, entropy_sums

from tests.callbacks._helpers import make_rollout, read_events, run_trainer, scalars

NAN = float("nan")


def test_defaults_are_the_80_20_paper_thresholds():
    cb = EntropyTracker()
    assert (cb.low_threshold, cb.high_threshold) == (LOW_ENTROPY_NATS, FORKING_ENTROPY_NATS) == (0.01, 0.672)


def test_entropy_sums_hand_case():
    # Row 0 has 4 tokens, row 1 has 2; padding holds NaN and 9.0, which must not be read.
    entropy = torch.tensor([[0.0, 0.005, 0.5, 1.0], [2.0, 0.3, NAN, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    total, count, low, high = entropy_sums(entropy, mask, 0.01, 0.672).tolist()
    assert total == pytest.approx(0.0 + 0.005 + 0.5 + 1.0 + 2.0 + 0.3)  # 3.805
    assert count == 6
    assert low == 2  # 0.0 and 0.005 are < 0.01
    assert high == 2  # 1.0 and 2.0 are > 0.672


def test_thresholds_are_strict():
    # A token exactly at a threshold is neither low nor high.
    entropy = torch.tensor([[0.25, 0.75]])  # exact in float32
    _, _, low, high = entropy_sums(entropy, torch.ones(1, 2, dtype=torch.bool), 0.25, 0.75).tolist()
    assert (low, high) == (0, 0)


@pytest.mark.parametrize("seed, shape", [(0, (3, 5)), (1, (8, 17)), (2, (1, 1)), (3, (16, 4))])
def test_compute_matches_a_loop(seed, shape):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0
    mask = torch.rand(shape, generator=g) < 0.7
    mask[0, 0] = True
    cb = EntropyTracker(low_threshold=0.3, high_threshold=1.5)
    got = cb.compute(entropy, mask)
    vals = [float(entropy[i, j]) for i in range(shape[0]) for j in range(shape[1]) if mask[i, j]]
    assert got["actor/entropy_mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-10)
    assert got["actor/entropy_low_share"] == pytest.approx(sum(v < 0.3 for v in vals) / len(vals), abs=1e-10)
    assert got["actor/entropy_high_share"] == pytest.approx(sum(v > 1.5 for v in vals) / len(vals), abs=1e-10)


def test_compute_returns_none_without_tokens():
    assert EntropyTracker().compute(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)) is None


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"low_threshold": -0.1}, "low_threshold"),
        ({"low_threshold": 0.5, "high_threshold": 0.5}, "high_threshold"),
        ({"collapse_threshold": 0.0}, "collapse_threshold"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.5}, "patience"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"EntropyTracker.{arg}"):
        EntropyTracker(**kwargs)


def _collapse_warnings(cb: EntropyTracker, means: list[float]) -> list[int]:
    """Steps at which ``update_collapse`` warned (a one-line log warning, not a Python warning with a path)."""
    import logging

    fired = []
    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger("vapo_pl.callbacks.entropy")
    handler = Catch(logging.WARNING)
    logger.addHandler(handler)
    try:
        for step, m in enumerate(means):
            before = len(seen)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cb.update_collapse(m, step)
            assert not caught  # no Python warning (their lines carry a source path)
            if any("collapsed" in r.getMessage() for r in seen[before:]):
                fired.append(step)
    finally:
        logger.removeHandler(handler)
    return fired


def test_collapse_warns_once_per_episode():
    cb = EntropyTracker(collapse_threshold=0.1, patience=3)
    means = [0.5, 0.05, 0.05, 0.05, 0.05, 0.05,  # episode 1: warn on its 3rd step (step 3), then stay quiet
             0.2,  # recovers: the episode ends
             0.01, 0.01,  # two steps below: not yet
             0.3,  # recovers before patience: no warning
             0.0, 0.0, 0.0]  # episode 2: warn at step 12
    assert _collapse_warnings(cb, means) == [3, 12]


def test_collapse_state_survives_a_restore():
    cb = EntropyTracker(collapse_threshold=0.1, patience=3)
    assert _collapse_warnings(cb, [0.05, 0.05]) == []
    restored = EntropyTracker(collapse_threshold=0.1, patience=3)
    restored.load_state_dict(cb.state_dict())
    assert _collapse_warnings(restored, [0.05]) == [0]  # the third step below, counted across the restore


def test_trainer_logs_entropy_scalars_to_tensorboard(tmp_path):
    """Three steps of hand-built rollouts through a real Trainer; the second step has no entropy (None), so it has
    no point. Each RL step is written at its own number (1, 2, 3), like the module's metrics."""
    r = make_rollout([3, 1])  # mask: row 0 three tokens, row 1 one token
    outputs = [
        # tokens 0.0, 0.5, 1.0 | 2.0 -> mean 3.5/4 = 0.875, low (<0.01) 1/4, high (>0.672) 2/4
        {"rollout": r, "entropy": torch.tensor([[0.0, 0.5, 1.0], [2.0, NAN, NAN]]), "metrics": {}},
        {"rollout": r, "entropy": None, "metrics": {}},
        # tokens 0.001, 0.002, 0.003 | 0.004 -> mean 0.0025, all low, none high
        {"rollout": r, "entropy": torch.tensor([[0.001, 0.002, 0.003], [0.004, 7.0, 7.0]]), "metrics": {}},
    ]
    _, logger = run_trainer(tmp_path, [EntropyTracker()], outputs)
    acc = read_events(logger)
    mean = scalars(acc, "actor/entropy_mean")
    assert sorted(mean) == [1, 3]  # step 2 is not a repeat of step 1's value
    assert mean[1] == pytest.approx(0.875)
    assert mean[3] == pytest.approx(0.0025)
    low, high = scalars(acc, "actor/entropy_low_share"), scalars(acc, "actor/entropy_high_share")
    assert (low[1], low[3], high[1], high[3]) == pytest.approx((0.25, 1.0, 0.5, 0.0))


def test_trainer_without_entropy_logs_nothing(tmp_path):
    r = make_rollout([2])
    _, logger = run_trainer(tmp_path, [EntropyTracker()], [{"rollout": r, "entropy": None, "metrics": {}}] * 2)
    assert "actor/entropy_mean" not in read_events(logger).Tags()["scalars"]


def test_trainer_warns_on_collapse(tmp_path):
    r = make_rollout([2])
    low = {"rollout": r, "entropy": torch.tensor([[0.001, 0.001]]), "metrics": {}}
    import logging

    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    logger = logging.getLogger("vapo_pl.callbacks.entropy")
    logger.addHandler(handler)
    try:
        run_trainer(tmp_path, [EntropyTracker(collapse_threshold=0.05, patience=2)], [low, low])
    finally:
        logger.removeHandler(handler)
    assert any("collapsed" in r.getMessage() for r in seen)
