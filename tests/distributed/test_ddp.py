"""VAPOModule under Lightning's DDPStrategy: 2 real processes (torchrun, gloo, CPU), a vLLM engine per rank.

What ran: ``Trainer(strategy=DDPStrategy(find_unused_parameters=True, process_group_backend="gloo"),
accelerator="cpu", devices=2, max_steps=3)``: two RL steps (VAPO defaults, critic, a small KL loss so a
frozen reference model is present), then one step of 4 updates on a fixed rollout batch. Each rank
generates its own prompts with its own engine; a callback all-gathers the full weights after every step.
"""

from __future__ import annotations

import pytest

from tests.distributed import _checks as checks

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

SCENARIOS = ("ddp",)


def test_ranks_hold_identical_weights_after_every_step(distributed_run):
    ranks = distributed_run.ranks("ddp")
    assert ranks[0]["strategy"] == "DDPStrategy"
    checks.assert_ranks_identical_and_moving(ranks)
    for rank in ranks:
        growth = [s["actor"]["max_change_from_init"] for s in rank["steps"]]
        assert growth[0] > checks.MIN_STEP_CHANGE and growth[-1] > growth[0]


def test_engines_receive_the_trained_weights(distributed_run):
    checks.assert_engine_got_full_trained_weights(distributed_run.ranks("ddp"))


def test_one_optimizer_with_actor_and_critic_groups(distributed_run):
    ranks = distributed_run.ranks("ddp")
    checks.assert_single_optimizer_two_groups(ranks)
    for rank in ranks:
        start = rank["start"]
        assert start["optimizer"] == "AdamW"
        assert [g["n_params"] for g in start["groups"]] == [start["n_actor_params"], start["n_critic_params"]]
    checks.assert_losses_finite(ranks)


def test_loss_decreases_on_a_fixed_batch(distributed_run):
    checks.assert_loss_decreases_on_fixed_batch(distributed_run.ranks("ddp"))
