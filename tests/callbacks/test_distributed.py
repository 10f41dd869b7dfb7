"""The callbacks' cross-rank reductions, in two real gloo processes.

Each rank's rollouts are hand-built, and ``Evaluation`` reads a stub DataModule whose ``evaluate`` yields
hand-built batches: two real engines in two processes would take most of the test budget, and the point
here is the sharding and the all-reduce / all-gather arithmetic, which the stub exercises unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vapo_pl.callbacks.entropy import EntropyTracker
from vapo_pl.callbacks.evaluation import Evaluation
from vapo_pl.callbacks.length import _gather_columns

from tests.callbacks._helpers import make_rollout

K = 3
N_PROBLEMS = 5


class StubDataModule:
    """Problem p's sample j is correct when j < p % (K + 1); sample j extracts answer str(j % 2)."""

    seed = 0
    max_response_length = 16
    greedy_baseline = False

    def __init__(self) -> None:
        self.val_records = [None] * N_PROBLEMS
        self.val_prompt_ids = [[1, 2]] * N_PROBLEMS
        self.seen: list[int] = []

    def evaluate(self, indices, sampling, prompts_per_call):
        for start in range(0, len(indices), prompts_per_call):
            idx = indices[start : start + prompts_per_call]
            yield self._generate(idx, sampling(idx[0]))

    def _generate(self, idx, sampling):
        self.seen.extend(idx)
        correct = [j < p % (K + 1) for p in idx for j in range(sampling.n)]
        lengths = [p + j + 1 for p in idx for j in range(sampling.n)]
        metadata = [{"extracted": str(j % 2)} for _ in idx for j in range(sampling.n)]
        return make_rollout(lengths, correct=correct, metadata=metadata)


def _local_inputs(rank: int):
    """Rank-specific entropy rows and lengths of unequal sizes (rank r holds r + 1 samples)."""
    g = torch.Generator().manual_seed(rank)
    entropy = torch.rand(rank + 1, 4, generator=g, dtype=torch.float64)
    mask = torch.arange(4)[None, :] < torch.arange(1, rank + 2)[:, None]  # row i has i + 1 tokens
    lengths = torch.arange(rank + 1) + 10 * rank
    return entropy, mask, lengths


def _worker(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        dm = StubDataModule()
        ev = Evaluation(every_n_steps=1, samples_per_prompt=K, prompts_per_call=2)
        metrics = ev.evaluate(dm, step=4)
        entropy, mask, lengths = _local_inputs(rank)
        ent = EntropyTracker(low_threshold=0.2, high_threshold=0.8).compute(entropy, mask)
        cols = torch.stack([lengths, lengths * 0 + rank])
        gathered = _gather_columns(cols).tolist()
        one_empty = _gather_columns(torch.full((2, rank), 7)).tolist()  # rank 0 contributes nothing
        Path(root, f"rank{rank}.json").write_text(json.dumps(
            {"metrics": metrics, "seen": dm.seen, "entropy": ent, "gathered": gathered, "one_empty": one_empty}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_reductions_across_two_ranks_equal_one_process(tmp_path):
    # fork (the children inherit the imported modules instead of importing torch and lightning again), unless an
    # in-process vLLM engine earlier in this test process made its one-rank default group (and its threads): a forked
    # child would inherit both, so then spawn (the children import torch and the callbacks afresh)
    method = "spawn" if dist.is_initialized() else "fork"
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method=method)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # Evaluation: problems dealt round-robin, every problem once, and the same metrics as one process
    assert results[0]["seen"] == [0, 2, 4] and results[1]["seen"] == [1, 3]
    single = Evaluation(every_n_steps=1, samples_per_prompt=K, prompts_per_call=2).evaluate(StubDataModule(), 4)
    for r in results:
        assert r["metrics"] == pytest.approx(single)
    # by hand: c per problem = p % 4 -> [0, 1, 2, 3, 0]; mean@3 = (0 + 1/3 + 2/3 + 1 + 0) / 5 = 0.4
    assert single["eval/heldout_mean@3"] == pytest.approx(0.4)
    assert single["eval/heldout_pass@3"] == pytest.approx(3 / 5)  # problems 1, 2, 3 have a correct sample
    # maj: answers "0","1","0" -> "0" (sample 0) wins; correct iff 0 < c: problems 1, 2, 3
    assert single["eval/heldout_maj@3"] == pytest.approx(3 / 5)

    # EntropyTracker: the pooled tokens of both ranks
    pooled_e = []
    for rank in range(2):
        e, m, _ = _local_inputs(rank)
        pooled_e.append(e[m])
    tokens = torch.cat(pooled_e)
    expected = {"actor/entropy_mean": float(tokens.mean()),
                "actor/entropy_low_share": float((tokens < 0.2).double().mean()),
                "actor/entropy_high_share": float((tokens > 0.8).double().mean())}
    for r in results:
        assert r["entropy"] == pytest.approx(expected, abs=1e-12)

    # LengthScaling's gather: unequal sizes (1 and 2 samples), concatenated in rank order
    for r in results:
        assert r["gathered"] == [[0, 10, 11], [0, 1, 1]]
        assert r["one_empty"] == [[7], [7]]
