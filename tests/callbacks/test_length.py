"""Tests for callbacks/length.py: hand-worked statistics and slopes, a loop reference for the slope, the
window and its checkpoint state, and a real Trainer writing scalars and the length histogram to TensorBoard
(the rollouts there are hand-built, no engine)."""

from __future__ import annotations

import math

import pytest
import torch
from vapo_pl.callbacks.length import HISTOGRAM_TAG, LengthScaling, least_squares_slope, length_stats

from tests.callbacks._helpers import make_rollout, read_events, run_trainer, scalars


def test_length_stats_hand_case():
    lengths = torch.tensor([2, 4, 6, 8, 30])
    truncated = torch.tensor([False, False, False, False, True])
    correct = torch.tensor([True, True, False, False, False])
    got = length_stats(lengths, truncated, correct)
    assert got["rollout/length_mean"] == pytest.approx(10.0)  # 50 / 5
    assert got["rollout/length_median"] == pytest.approx(6.0)
    # p90: position 0.9 * (5 - 1) = 3.6 between 8 and 30 -> 8 + 0.6 * 22 = 21.2
    assert got["rollout/length_p90"] == pytest.approx(21.2)
    assert got["rollout/length_max"] == 30.0
    assert got["rollout/length_clip_ratio"] == pytest.approx(0.2)  # 1 of 5 truncated
    assert got["rollout/length_correct_mean"] == pytest.approx(3.0)  # (2 + 4) / 2
    assert got["rollout/length_wrong_mean"] == pytest.approx(44 / 3)  # (6 + 8 + 30) / 3


def test_length_stats_median_of_even_count_interpolates():
    got = length_stats(torch.tensor([1, 2, 3, 10]), torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    assert got["rollout/length_median"] == pytest.approx(2.5)
    assert math.isnan(got["rollout/length_wrong_mean"])  # no wrong sample


@pytest.mark.parametrize(
    "x, y, slope",
    [
        ([0, 1, 2], [1, 3, 5], 2.0),  # exactly on y = 2x + 1
        # mean x = 1, mean y = 2: sum dx*dy = (-1)(-2) + 0 + (1)(1) = 3, sum dx^2 = 2 -> 1.5
        ([0, 1, 2], [0, 3, 3], 1.5),
        ([5, 7], [10, 4], -3.0),  # two points: the line through them
        ([0, 1, 2, 3], [4, 4, 4, 4], 0.0),
    ],
)
def test_least_squares_slope_hand_cases(x, y, slope):
    assert least_squares_slope(torch.tensor(x), torch.tensor(y, dtype=torch.float64)) == pytest.approx(slope)


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 5), (2, 17), (3, 50)])
def test_least_squares_slope_matches_normal_equations_loop(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randperm(3 * n, generator=g)[:n].to(torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64) * 100
    # normal equations for y = a + b x, written out with plain sums
    sx = sum(float(v) for v in x)
    sy = sum(float(v) for v in y)
    sxx = sum(float(v) ** 2 for v in x)
    sxy = sum(float(a) * float(b) for a, b in zip(x, y))
    b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    assert least_squares_slope(x, y) == pytest.approx(b, abs=1e-10, rel=1e-10)


def test_slope_uses_only_the_window():
    cb = LengthScaling(window=3)
    assert cb.slope() is None
    for step, mean in enumerate([100.0, 0.0, 10.0, 20.0, 30.0]):
        cb.recent.append((step, mean))
    # the last three points (2, 10), (3, 20), (4, 30) lie on a line of slope 10; with (0, 100) it would be < 0
    assert cb.slope() == pytest.approx(10.0)


def test_window_state_round_trips():
    cb = LengthScaling(window=4)
    for step, mean in enumerate([3.0, 5.0, 4.0, 8.0, 9.0]):
        cb.recent.append((step, mean))
    restored = LengthScaling(window=4)
    restored.load_state_dict(cb.state_dict())
    assert list(restored.recent) == list(cb.recent) == [(1, 5.0), (2, 4.0), (3, 8.0), (4, 9.0)]
    restored.recent.append((5, 20.0))
    assert len(restored.recent) == 4  # still bounded by the window after the restore


@pytest.mark.parametrize("window", [1, 0, 2.5, True])
def test_bad_window_names_the_argument(window):
    with pytest.raises(ValueError, match="LengthScaling.window"):
        LengthScaling(window=window)


def test_trainer_logs_scalars_slope_and_histogram(tmp_path):
    """Three steps of hand-built rollouts through a real Trainer with a real TensorBoardLogger."""
    batches = [
        make_rollout([2, 4], correct=[True, False], truncated=[False, False]),  # mean 3
        make_rollout([4, 8], correct=[True, True], truncated=[False, True]),  # mean 6
        make_rollout([6, 12, 9], correct=[False, False, True], truncated=[False, True, False]),  # mean 9
    ]
    outputs = [{"rollout": b, "entropy": None, "metrics": {}} for b in batches]
    _, logger = run_trainer(tmp_path, [LengthScaling(window=10)], outputs)
    acc = read_events(logger)

    # written at the RL step just completed (1, 2, 3), the module's x axis
    assert scalars(acc, "rollout/length_mean") == pytest.approx({1: 3.0, 2: 6.0, 3: 9.0})
    assert scalars(acc, "rollout/length_max") == pytest.approx({1: 4.0, 2: 8.0, 3: 12.0})
    assert scalars(acc, "rollout/length_clip_ratio") == pytest.approx({1: 0.0, 2: 0.5, 3: 1 / 3})
    assert scalars(acc, "rollout/length_correct_mean") == pytest.approx({1: 2.0, 2: 6.0, 3: 9.0})
    wrong = scalars(acc, "rollout/length_wrong_mean")
    assert wrong[1] == pytest.approx(4.0) and math.isnan(wrong[2]) and wrong[3] == pytest.approx(9.0)
    # slope from the second step on: (1, 3), (2, 6) -> 3; (1, 3), (2, 6), (3, 9) -> 3
    assert scalars(acc, "rollout/length_slope") == pytest.approx({2: 3.0, 3: 3.0})

    hists = {e.step: e.histogram_value for e in acc.Histograms(HISTOGRAM_TAG)}
    assert sorted(hists) == [1, 2, 3]
    h = hists[3]
    assert (h.min, h.max, h.num, h.sum) == (6.0, 12.0, 3.0, 27.0)
    assert (hists[1].min, hists[1].max, hists[1].num) == (2.0, 4.0, 2.0)


def test_trainer_without_rollout_logs_nothing(tmp_path):
    outputs = [{"rollout": None, "entropy": None, "metrics": {}}]
    _, logger = run_trainer(tmp_path, [LengthScaling()], outputs)
    acc = read_events(logger)
    assert "rollout/length_mean" not in acc.Tags()["scalars"]
    assert HISTOGRAM_TAG not in acc.Tags()["histograms"]
