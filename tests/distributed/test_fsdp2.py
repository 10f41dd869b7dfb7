"""FSDP2 through Lightning's ModelParallelStrategy in 2 real processes (torchrun, gloo, CPU).

What ran: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend=
"gloo")`` as shipped in Lightning 2.6, no workaround. It does not require CUDA: it builds its device mesh
with ``init_device_mesh(device_type=root_device.type)`` ("cpu" here) and passes no ``device_id`` to the
process group on CPU; ``torch.distributed.fsdp.fully_shard`` runs over gloo. ``VAPOModule.configure_model``
shards actor, critic and reference model per decoder layer (``vapo_pl.parallel.fully_shard_model``); the
weight sync gathers them with ``get_model_state_dict(full_state_dict=True)``. Same run as ``test_ddp``
(two RL steps, then 4 updates on one fixed batch, one vLLM engine per rank), so the two are compared.
"""

from __future__ import annotations

import pytest

from tests.distributed import _checks as checks

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

SCENARIOS = ("ddp", "fsdp2")


def test_parameters_are_sharded_across_ranks(distributed_run):
    ranks = distributed_run.ranks("fsdp2")
    starts = [r["start"] for r in ranks]
    for rank, start in zip(ranks, starts):
        assert rank["strategy"] == "ModelParallelStrategy"
        assert start["actor_param_type"] == "DTensor"
        # every actor weight's first dimension is even here, so each rank stores exactly half
        assert 2 * start["actor_param_local_numel"] == start["actor_full_numel"]
        # the critic's (1, H) head cannot split its one row: rank 0 holds it, so the halves differ by H + 1
        assert start["critic_param_local_numel"] < 0.51 * start["critic_full_numel"]
        # the sharded models start from the checkpoint, and the value head from zero
        assert rank["init_vs_checkpoint"] == {"actor": 0.0, "critic_backbone": 0.0}
        assert start["critic_head_init_abs_max"] == 0.0
    assert sum(s["critic_param_local_numel"] for s in starts) == starts[0]["critic_full_numel"]


def test_weight_sync_gathers_full_weights(distributed_run):
    """The engine gets plain tensors of the checkpoint's full shapes, equal to the trained weights."""
    checks.assert_engine_got_full_trained_weights(distributed_run.ranks("fsdp2"))


def test_training_matches_ddp_step_by_step(distributed_run):
    ranks = distributed_run.ranks("fsdp2")
    checks.assert_ranks_identical_and_moving(ranks)
    checks.assert_single_optimizer_two_groups(ranks)
    checks.assert_losses_finite(ranks)
    ddp, fsdp = distributed_run.actor_weights("ddp"), distributed_run.actor_weights("fsdp2")
    diff = checks.max_abs_diff(fsdp, ddp)
    assert diff[0] == 0.0 and max(diff) < checks.CROSS_STRATEGY_ATOL, diff
    moved = checks.max_abs_diff(ddp[1:], ddp[:-1])  # each step moves weights ~100x more than the gap
    assert min(moved) > 50 * checks.CROSS_STRATEGY_ATOL, moved


def test_loss_decreases_on_a_fixed_batch(distributed_run):
    ranks = distributed_run.ranks("fsdp2")
    checks.assert_loss_decreases_on_fixed_batch(ranks)
    ddp = distributed_run.ranks("ddp")[0]["fixed_losses"]
    assert ranks[0]["fixed_losses"] == pytest.approx(ddp, abs=1e-6)
