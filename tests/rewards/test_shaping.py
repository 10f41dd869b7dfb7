"""``overlong`` (DAPO soft overlong punishment) and ``format`` as reward functions."""

from __future__ import annotations

import pytest
import torch

from tests.rewards._helpers import make_inputs
from vapo_pl.algorithms.shaping import overlong_penalty
from vapo_pl.rewards import resolve_reward_fn

overlong = resolve_reward_fn("overlong")
format_reward = resolve_reward_fn("format")


def test_overlong_hand_worked():
    # L_max 100, L_cache 20: no penalty up to 80, then (80 - l) / 20, -1 from 100 on.
    inputs = make_inputs(["r"] * 6, lengths=[0, 80, 85, 90, 100, 120], max_response_length=100)
    out = overlong(inputs, cache_length=20)
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert out.stats["overlong/penalized_frac"] == pytest.approx(4 / 6)
    assert out.correct is None


def test_overlong_defaults_and_agreement_with_the_shaping_function():
    inputs = make_inputs(["r"] * 5, lengths=[10, 160, 170, 190, 200], max_response_length=200)
    # Defaults: L_max = max_response_length = 200, L_cache = 200 // 5 = 40 -> ramp from 160.
    torch.testing.assert_close(overlong(inputs).scores, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))
    torch.testing.assert_close(
        overlong(inputs, max_length=180, cache_length=30).scores, overlong_penalty(inputs.lengths, 180, 30)
    )


def test_overlong_bad_kwargs():
    inputs = make_inputs(["r"], max_response_length=100)
    with pytest.raises(ValueError, match="cache_length must be a positive int"):
        overlong(inputs, cache_length=0)
    with pytest.raises(ValueError, match="cache_length"):
        overlong(inputs, max_length=10, cache_length=20)


def test_format_values_and_forms():
    responses = ["so \\boxed{4}", "The answer is 4.", "\\boxed{4", "nothing"]
    out = format_reward(make_inputs(responses))
    torch.testing.assert_close(out.scores, torch.tensor([0.1, 0.0, 0.0, 0.0]))
    out = format_reward(make_inputs(responses), present=0.0, missing=-1.0, forms=["boxed", "anchor"])
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 0.0, -1.0, -1.0]))
    assert out.stats["format/present_frac"] == pytest.approx(0.5)
    out = format_reward(make_inputs(responses), present=1.0, forms=("anchor",))
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_format_bad_kwargs():
    inputs = make_inputs(["x"])
    with pytest.raises(ValueError, match="forms must be a non-empty subset"):
        format_reward(inputs, forms=("latex",))
    with pytest.raises(ValueError, match="present must be a finite number"):
        format_reward(inputs, present=float("nan"))
    with pytest.raises(ValueError, match="missing must be a finite number"):
        format_reward(inputs, missing="-1")
