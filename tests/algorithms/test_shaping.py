"""Tests for vapo_pl/algorithms/shaping.py: DAPO's soft overlong punishment."""

from __future__ import annotations

import pytest
import torch

from vapo_pl.algorithms.shaping import overlong_penalty

L_MAX, L_CACHE = 20480, 4096  # DAPO's settings: the ramp starts at 20480 - 4096 = 16384


def test_boundaries_exactly():
    lengths = torch.tensor([0, 16383, 16384, 16385, 18432, 20479, 20480, 20481, 30000])
    expected = torch.tensor(
        [
            0.0,  # far below the ramp
            0.0,  # l < L_max - L_cache
            0.0,  # l = L_max - L_cache: last length without penalty
            -1 / 4096,  # one token into the ramp: (16384 - 16385)/4096
            -0.5,  # midway: (16384 - 18432)/4096 = -2048/4096
            -4095 / 4096,  # one token before L_max
            -1.0,  # l = L_max: (16384 - 20480)/4096 = -1
            -1.0,  # beyond L_max
            -1.0,
        ]
    )
    got = overlong_penalty(lengths, L_MAX, L_CACHE)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)  # exact: every value is a dyadic fraction


def test_float_lengths_keep_their_dtype():
    lengths = torch.tensor([16384.0, 17408.0, 20480.5], dtype=torch.float64)
    # 17408 is a quarter of the way: (16384 - 17408)/4096 = -0.25
    got = overlong_penalty(lengths, L_MAX, L_CACHE)
    assert got.dtype == torch.float64
    assert got.tolist() == [0.0, -0.25, -1.0]


def test_cache_equal_to_max_length_ramps_from_zero():
    # L_cache = L_max = 8: penalty -l/8 up to l = 8, -1 beyond; l = 2 -> -0.25.
    got = overlong_penalty(torch.tensor([0, 2, 8, 9]), max_length=8, cache_length=8)
    assert got.tolist() == [0.0, -0.25, -1.0, -1.0]


def _naive(length, max_length, cache_length):
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return (max_length - cache_length - length) / cache_length
    return -1.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_piecewise_definition_and_is_monotone(seed):
    g = torch.Generator().manual_seed(seed)
    max_length = int(torch.randint(10, 200, (1,), generator=g))
    cache_length = int(torch.randint(1, max_length + 1, (1,), generator=g))
    lengths = torch.randint(0, max_length + 20, (64,), generator=g)
    got = overlong_penalty(lengths, max_length, cache_length)
    expected = [_naive(int(x), max_length, cache_length) for x in lengths]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
    # DAPO's property: longer never means a smaller penalty; the penalty is in [-1, 0].
    ordered = overlong_penalty(torch.sort(lengths).values, max_length, cache_length)
    assert bool((ordered[1:] <= ordered[:-1]).all())
    assert bool(((got >= -1) & (got <= 0)).all())


def test_invalid_arguments():
    lengths = torch.tensor([1, 2, 3])
    for bad in (0, -5):
        with pytest.raises(ValueError, match="cache_length"):
            overlong_penalty(lengths, max_length=100, cache_length=bad)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(lengths, max_length=100, cache_length=101)
    with pytest.raises(ValueError, match="max_length"):
        overlong_penalty(lengths, max_length=0, cache_length=1)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(lengths, max_length=100, cache_length=2.5)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([3, -1]), max_length=100, cache_length=10)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([[3]]), max_length=100, cache_length=10)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([float("nan")]), max_length=100, cache_length=10)
