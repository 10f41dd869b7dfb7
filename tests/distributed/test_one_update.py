"""One update per batch under DDP and FSDP2 (2 real processes, gloo, CPU, a vLLM engine per rank): the actor's old
log-probs and the critic's old values come from the update pass (the critic's micro-batches run forward and
backward before the actor's), and the weights after every step are those of the path with separate forwards.

What ran: ``scenario_fit`` with ``minibatch_size`` equal to the global batch (16), VAPO defaults (GAE,
``lambda_critic`` 1), a small KL loss (reference model present), the critic's log-prob head on
(``critic_logprob_features``), 2 RL steps, then ``ExportActor``; ``ddp_onebatch_separate`` has
``reuse_update_forward=False``.
"""

from __future__ import annotations

import pytest

from tests.distributed import _checks as checks

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

SCENARIOS = ("ddp_onebatch", "ddp_onebatch_separate", "fsdp2_onebatch")


def test_the_update_pass_gives_the_old_values_under_ddp_and_fsdp2(distributed_run):
    for scenario, expected in (("ddp_onebatch", True), ("fsdp2_onebatch", True), ("ddp_onebatch_separate", False)):
        ranks = distributed_run.ranks(scenario)
        assert all(r["values_from_update"] == [expected, expected] for r in ranks), scenario
        checks.assert_ranks_identical_and_moving(ranks, steps=2)
        checks.assert_losses_finite(ranks)


@pytest.mark.parametrize("scenario", ["ddp_onebatch", "fsdp2_onebatch"])
def test_weights_match_the_separate_forwards_step_by_step(distributed_run, scenario):
    for weights in (distributed_run.actor_weights, distributed_run.critic_weights):
        separate, here = weights("ddp_onebatch_separate"), weights(scenario)
        diff = checks.max_abs_diff(here, separate)
        assert diff[0] == 0.0 and max(diff) < checks.CROSS_STRATEGY_ATOL, diff
        moved = checks.max_abs_diff(separate[1:], separate[:-1])
        assert min(moved) > 10 * checks.CROSS_STRATEGY_ATOL, moved


def test_export_actor_writes_the_whole_actor_from_ddp_and_fsdp2(distributed_run):
    """``ExportActor`` after the last step: every rank gathers, rank 0 writes; the export loads in transformers with
    exactly the actor's final full weights (FSDP2 shards included)."""
    for scenario in ("ddp_onebatch", "fsdp2_onebatch"):
        first = distributed_run.ranks(scenario)[0]
        assert first["export"]["same_keys"], scenario
        assert first["export"]["max_abs_diff"] == 0.0, (scenario, first["export"])
