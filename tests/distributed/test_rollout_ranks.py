"""RolloutDataModule in 2 real processes (torchrun, gloo) with the real vLLM engine, one per rank.

What ran: ``worker.scenario_rollout``: a RolloutDataModule on 17 prompts (``prompts_per_step=4``, so 2
prompts per rank per step), each rank building its own ``vllm.LLM`` (float32, ``external_launcher``) through
``RolloutDataModule.engine``; two full epochs through ``train_dataloader()``; then dynamic sampling with a reward that
makes every group of rank 0 uninformative and every group of rank 1 informative.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

SCENARIOS = ("rollout",)


def _served(rank: dict, epoch: int) -> list[str]:
    return [p for batch in rank["epochs"][epoch]["served"] for p in batch]


def test_each_epoch_deals_every_usable_prompt_to_exactly_one_rank(distributed_run):
    r0, r1 = distributed_run.ranks("rollout")
    prompts = r0["all_prompts"]
    assert r1["all_prompts"] == prompts and len(prompts) == 17
    for epoch in range(2):
        a, b = _served(r0, epoch), _served(r1, epoch)
        # 17 prompts over 2 ranks: 16 usable (equal shards keep the ranks in lockstep), 8 per rank, served
        # as 4 batches of 2; the stream then ends on both ranks in the same step
        assert len(r0["epochs"][epoch]["served"]) == len(r1["epochs"][epoch]["served"]) == 4
        assert len(a) == len(set(a)) == 8 and len(b) == len(set(b)) == 8  # no repeat within a rank
        assert not set(a) & set(b)  # no prompt on both ranks
        assert len(set(a) | set(b)) == 16 and set(a) | set(b) <= set(prompts)
    assert r0["epoch_after"] == r1["epoch_after"] == 2
    # a new permutation per epoch: the prompt left out (and the order) changes
    assert _served(r0, 0) != _served(r0, 1)


def test_ranks_sample_different_completions(distributed_run):
    r0, r1 = distributed_run.ranks("rollout")
    assert r0["epochs"][0]["responses"] != r1["epochs"][0]["responses"]
    # the same prompt with the same sampling seed: reproducible on one rank, different across ranks (the
    # engine seed and the call seeds are derived per rank), so the ranks' samples are not copies
    for r in (r0, r1):
        first, second = r["same_prompt_tokens"]
        assert first == second and len(first) == 2 and first[0] != first[1]
    assert r0["same_prompt_tokens"][0] != r1["same_prompt_tokens"][0]


def test_dynamic_sampling_rounds_stay_in_lockstep(distributed_run):
    """Rank 1 had its 2 informative groups after round 1, but rank 0 (none informative) needed more: both
    must run the same 3 rounds, or rank 0's per-round all-reduce would wait for a rank that left."""
    r0, r1 = distributed_run.ranks("rollout")
    d0, d1 = r0["dynamic"], r1["dynamic"]
    assert d0["rounds"] == d1["rounds"] == 3
    assert d0["cursor"] == d1["cursor"] == 6  # 3 rounds x 2 prompts consumed on each rank
    assert d0["n_samples"] == d1["n_samples"] == 4 and d0["groups"] == d1["groups"] == 2
    assert d0["kept_share"] == 0.0 and d0["filled"] == 2  # rank 0 filled its batch with filtered groups
    assert d1["kept_share"] == 1.0 and d1["filled"] == 0
