"""A user-defined advantage estimator, named by import path in tests (not registered)."""

from __future__ import annotations

from vapo_pl.algorithms.advantages import AdvantageOutputs


def critic_baseline(inputs, params):
    """Return minus the critic's values: needs a critic, declared as ``needs``."""
    values = inputs.values
    return AdvantageOutputs(advantages=-values * inputs.mask, returns=values * 0)


critic_baseline.needs = frozenset({"values"})


NOT_A_FUNCTION = 3
