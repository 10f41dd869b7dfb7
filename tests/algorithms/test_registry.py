"""Registries: names or import paths, and what each estimator declares it needs."""

from __future__ import annotations

import pytest

from vapo_pl.algorithms.advantages import ADVANTAGE_ESTIMATORS
from vapo_pl.algorithms.policy_losses import POLICY_LOSSES
from vapo_pl.config import AlgorithmConfig

USER = "tests.algorithms.user_estimators"


@pytest.mark.parametrize(("name", "needs"), [
    ("gae", {"values"}), ("grpo", {"group_index"}), ("dr_grpo", {"group_index"}), ("rloo", {"group_index"}),
    ("remax", {"baseline_scores"}), ("reinforce_pp", set()),
])
def test_builtin_estimators_declare_their_needs(name, needs):
    assert ADVANTAGE_ESTIMATORS.needs(name) == needs


def test_what_is_built_follows_from_the_needs():
    assert AlgorithmConfig(estimator="gae").uses_critic
    assert not AlgorithmConfig(estimator="grpo").uses_critic
    # a user's estimator by import path: a critic because it declares values
    cfg = AlgorithmConfig(estimator=f"{USER}:critic_baseline")
    assert cfg.uses_critic and cfg.estimator_needs == {"values"}
    assert ADVANTAGE_ESTIMATORS.get(f"{USER}.critic_baseline").__name__ == "critic_baseline"


def test_import_paths_are_checked_at_config_time():
    with pytest.raises(ValueError, match=r"algorithm.estimator: unknown 'tests.algorithms.user_estimators:nope'"):
        AlgorithmConfig(estimator=f"{USER}:nope")
    with pytest.raises(ValueError, match="algorithm.estimator: unknown 'gea'"):
        AlgorithmConfig(estimator="gea")
    assert f"{USER}:NOT_A_FUNCTION" not in ADVANTAGE_ESTIMATORS
    # policy losses take import paths the same way
    assert POLICY_LOSSES.get("vapo_pl.algorithms.policy_losses:ppo_loss") is POLICY_LOSSES.get("ppo")
