"""RewardInput/RewardTerm validation, name resolution and the weighted composite."""

from __future__ import annotations

import pytest
import torch

from tests.rewards._helpers import make_inputs
from tests.rewards.user_rewards import length_bonus
from vapo_pl.rewards import REWARD_FUNCTIONS, CompositeReward, RewardInput, RewardTerm, resolve_reward_fn
from vapo_pl.rewards.shaping import format_reward


def test_builtin_names_registered():
    assert set(REWARD_FUNCTIONS.names()) >= {"math_verify", "overlong", "format", "ttrl", "reward_model"}
    assert resolve_reward_fn("format") is format_reward


@pytest.mark.parametrize(
    "path", ["tests.rewards.user_rewards:length_bonus", "tests.rewards.user_rewards.length_bonus"]
)
def test_user_callable_by_import_path(path):
    assert resolve_reward_fn(path) is length_bonus


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward function 'math_verfy'") as e:
        resolve_reward_fn("math_verfy")
    for name in ("format", "math_verify", "overlong", "reward_model", "ttrl"):
        assert name in str(e.value)
    with pytest.raises(
        ValueError, match="neither registered nor importable.*registered names: .*math_verify"
    ):
        resolve_reward_fn("tests.rewards.user_rewards:no_such_fn")
    with pytest.raises(ValueError, match="neither registered nor importable"):
        resolve_reward_fn("no_such_package.module:fn")
    with pytest.raises(ValueError, match="not callable"):
        resolve_reward_fn("tests.rewards.user_rewards:not_a_function")
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_reward_fn("")


def test_reward_term_validation():
    assert RewardTerm("format").weight == 1.0
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="RewardTerm.weight must be finite"):
            RewardTerm("format", weight=bad)
    with pytest.raises(ValueError, match="RewardTerm.weight must be a number"):
        RewardTerm("format", weight="1")
    with pytest.raises(ValueError, match="RewardTerm.name"):
        RewardTerm("")
    with pytest.raises(ValueError, match="RewardTerm.kwargs"):
        RewardTerm("format", kwargs=[1])


def test_reward_input_validation_names_the_field():
    good = make_inputs(["a", "b"])
    assert len(good) == 2 and good.metadata == [{}, {}]
    fields = dict(
        prompts=["", ""],
        responses=["a", "b"],
        answers=[None, None],
        group_index=torch.tensor([0, 0]),
        lengths=torch.tensor([1, 2]),
        truncated=torch.tensor([False, False]),
        max_response_length=8,
    )
    with pytest.raises(ValueError, match="RewardInput.answers has 1 entries"):
        RewardInput(**{**fields, "answers": [None]})
    with pytest.raises(ValueError, match="RewardInput.lengths must be a \\(2,\\)"):
        RewardInput(**{**fields, "lengths": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError, match="RewardInput.truncated"):
        RewardInput(**{**fields, "truncated": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="RewardInput.group_index"):
        RewardInput(**{**fields, "group_index": torch.tensor([0])})
    with pytest.raises(ValueError, match="RewardInput.max_response_length"):
        RewardInput(**{**fields, "max_response_length": 0})


def test_composite_sums_weighted_terms_hand_worked():
    inputs = make_inputs(
        ["so \\boxed{3}", "no answer here", "\\boxed{5"],
        ["3", "3", "5"],
        lengths=[10, 90, 100],
        max_response_length=100,
    )
    reward = CompositeReward(
        [
            RewardTerm("math_verify"),
            RewardTerm("overlong", weight=0.5, kwargs={"cache_length": 20}),
            RewardTerm("format", kwargs={"present": 0.2, "missing": -0.2}),
            RewardTerm("tests.rewards.user_rewards:length_bonus", weight=0.1, kwargs={"scale": 2.0}),
        ]
    )
    out = reward(inputs)
    # math_verify: [1, 0, 0] (no answer; unbalanced box).
    # overlong, L_max 100, L_cache 20, ramp from 80: [0, (80-90)/20, -1] = [0, -0.5, -1], x0.5.
    # format: [0.2, -0.2, -0.2] (the unbalanced box is not a well-formed answer).
    # length_bonus: 2 * [10, 90, 100] / 100 = [0.2, 1.8, 2.0], x0.1.
    expected_terms = {
        "math_verify": [1.0, 0.0, 0.0],
        "overlong": [0.0, -0.25, -0.5],
        "format": [0.2, -0.2, -0.2],
        "tests.rewards.user_rewards:length_bonus": [0.02, 0.18, 0.2],
    }
    assert list(out.terms) == list(expected_terms)
    for name, values in expected_terms.items():
        torch.testing.assert_close(out.terms[name], torch.tensor(values), atol=1e-6, rtol=0)
    # 1 + 0 + 0.2 + 0.02 = 1.22;  0 - 0.25 - 0.2 + 0.18 = -0.27;  0 - 0.5 - 0.2 + 0.2 = -0.5
    torch.testing.assert_close(out.scores, torch.tensor([1.22, -0.27, -0.5]), atol=1e-6, rtol=0)
    assert out.correct.tolist() == [True, False, False]  # from math_verify, not from scores > 0
    assert out.extracted == ["3", None, None]
    assert out.stats["overlong/penalized_frac"] == pytest.approx(2 / 3)
    assert out.stats["math_verify/answered_frac"] == pytest.approx(1 / 3)


def test_composite_correct_falls_back_to_positive_score():
    inputs = make_inputs(["\\boxed{1}", "none"])
    out = CompositeReward([RewardTerm("format", kwargs={"present": 1.0, "missing": -1.0})])(inputs)
    assert out.correct.tolist() == [True, False]
    assert out.extracted is None


def test_composite_rejects_bad_configuration():
    with pytest.raises(ValueError, match="reward term 'format': bad kwargs \\['presnt'\\]"):
        CompositeReward([RewardTerm("format", kwargs={"presnt": 1.0})])
    with pytest.raises(ValueError, match="unique.*'format'"):
        CompositeReward([RewardTerm("format"), RewardTerm("format", weight=2.0)])
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        CompositeReward([RewardTerm("nope")])
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward([])
    broken = CompositeReward([RewardTerm("tests.rewards.user_rewards:nan_reward")])
    with pytest.raises(ValueError, match="nan_reward' returned non-finite scores"):
        broken(make_inputs(["x"]))


def test_composite_accepts_dict_terms_as_from_yaml():
    reward = CompositeReward([{"name": "overlong", "weight": 2.0, "kwargs": {"cache_length": 10}}])
    out = reward(make_inputs(["x", "y"], lengths=[95, 100], max_response_length=100))
    # ramp from 90: (90 - 95) / 10 = -0.5 -> x2 = -1.0; 100 -> -1 -> x2 = -2.0
    torch.testing.assert_close(out.scores, torch.tensor([-1.0, -2.0]))
