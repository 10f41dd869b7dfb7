"""Assertions shared by the strategy tests; each reads the per-rank results of one worker scenario."""

from __future__ import annotations

import math

STEPS = 3  # two RL steps and the fixed-batch step (worker.RL_STEPS + 1)
MIN_STEP_CHANGE = 1e-4  # lr 1e-3 with Adam moves some weight by ~1e-3 per optimizer step
MAX_LOGP_GAP = 1e-4  # vLLM vs transformers in float32 on the same weights: ~1e-6 seen
CROSS_STRATEGY_ATOL = 2e-5  # same data and maths, different reduction order: ~3e-6 seen; one lost step ~1e-3


def assert_ranks_identical_and_moving(ranks: list[dict], steps: int = STEPS) -> None:
    """After every step both ranks hold bit-identical actor and critic weights, and the step moved them."""
    for rank in ranks:
        assert len(rank["steps"]) == steps
        for step, rec in enumerate(rank["steps"], start=1):
            for model in ("actor", "critic"):
                r = rec[model]
                assert r["ranks_identical"], f"step {step}: {model} differs between ranks"
                assert r["max_change_this_step"] > MIN_STEP_CHANGE, f"step {step}: {model} did not move"
            assert rec["policy_version"] == step
    for step in range(steps):
        assert ranks[0]["steps"][step]["actor"]["digest"] == ranks[1]["steps"][step]["actor"]["digest"]
    # identical weights must come from averaged gradients, not identical data: the ranks' prompts differ
    for step in range(steps):
        assert not set(ranks[0]["steps"][step]["prompts"]) & set(ranks[1]["steps"][step]["prompts"])


def assert_losses_finite(ranks: list[dict]) -> None:
    for rank in ranks:
        for rec in rank["steps"][:-1]:  # RL steps (the fixed-batch step logs only its pg loss)
            m = rec["metrics"]
            for key in ("actor/pg_loss", "actor/nll_loss", "actor/kl_loss", "critic/value_loss"):
                assert math.isfinite(m[key]), (key, m[key])
        assert all(math.isfinite(x) for x in rank["fixed_losses"])


def assert_engine_got_full_trained_weights(ranks: list[dict]) -> None:
    """Every sync (start + one per step) hands each rank's engine plain tensors of the full Hugging Face
    shapes, bit-identical to the gathered trained weights; the engine then samples with the trainer's
    log-probs although training moved those log-probs far from the initial ones."""
    for rank in ranks:
        received = rank["received"]
        assert len(received) == STEPS + 1
        for r in received:
            assert r["types"] == ["Tensor"], r["types"]  # no DTensor or ZeRO placeholder reached the engine
            assert r["shapes"] == rank["hf_shapes"]
        assert [r["digest"] for r in received[1:]] == [s["actor"]["digest"] for s in rank["steps"]]
        assert all(s["engine_last_digest"] == s["actor"]["digest"] for s in rank["steps"])
        checks = rank["logp_checks"]
        assert len(checks) == STEPS
        assert all(c["engine_vs_actor"] < MAX_LOGP_GAP for c in checks), checks
        assert checks[0]["actor_vs_initial"] == 0.0  # nothing trained before the first rollout
        assert all(c["actor_vs_initial"] > 1000 * MAX_LOGP_GAP for c in checks[1:]), checks


def assert_loss_decreases_on_fixed_batch(ranks: list[dict]) -> None:
    """Pass k's policy loss is measured at the weights after k updates on the same batch (global token
    mean, identical on both ranks): gradient descent on a fixed batch must lower it."""
    losses = ranks[0]["fixed_losses"]
    assert ranks[1]["fixed_losses"] == losses
    assert len(losses) == 4
    assert losses[1] < losses[0] and losses[2] < losses[0], losses
    assert losses[-1] < losses[0] - 1e-3, losses


def assert_single_optimizer_two_groups(ranks: list[dict]) -> None:
    for rank in ranks:
        start = rank["start"]
        assert start["n_optimizers"] == 1
        assert start["inner_optimizer"] == "AdamW"
        assert [(g["name"], g["lr"]) for g in start["groups"]] == [("actor", 1e-3), ("critic", 2e-3)]
        assert rank["global_step"] == STEPS  # RL steps, not the 2-per-step optimizer steps


def max_abs_diff(a, b) -> list[float]:
    """Per recorded point (start, after step 1, 2, 3): max |a - b| over all actor weights."""
    return [float((a[i] - b[i]).abs().max()) for i in range(len(a))]
