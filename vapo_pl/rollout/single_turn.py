"""Single-turn rollouts: one response per prompt, generated in groups, scored, and (DAPO's dynamic sampling) filtered
over several rounds. The DataModule deals the prompts and owns the engine; this module runs the loop. A multi-turn
loop lives beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from vapo_pl.batch import RolloutBatch
from vapo_pl.common import derive_seed, max_across_ranks
from vapo_pl.prompts import PromptRecord
from vapo_pl.rewards.base import RewardInput, RewardOutput, complete_reward
from vapo_pl.rollout.base import Completion, Sampling

if TYPE_CHECKING:
    from vapo_pl.datamodule import RolloutDataModule


class SingleTurnRollout:
    """The rollout loop of ``dm``: its dealing, engine, tokenizer, reward and the module's hooks."""

    def __init__(self, dm: RolloutDataModule) -> None:
        self.dm = dm

    def step(self) -> RolloutBatch | None:
        """One RL step's rollouts for this rank: rounds of generation (dynamic sampling: until enough groups are
        informative, at most ``max_sampling_rounds``; every rank runs as many rounds), scored, filtered and filled;
        None when the rank's shard of the epoch is used up."""
        dm = self.dm
        need = dm.prompts_per_rank  # what this rank keeps; its replica generates need * tp prompts per round
        replica, _, _, tp = dm.replica_layout()
        step_seed = derive_seed(dm.seed, replica, dm.epoch, dm.batches_served)
        t0 = time.perf_counter()
        kept: list[RolloutBatch] = []
        spare: list[RolloutBatch] = []  # filtered-out groups, used to fill the batch if rounds run out
        round_stats: list[dict[str, float]] = []  # one per generation round (kept and spare share a round's)
        n_kept = n_seen = rounds = 0
        while True:
            idx = dm._take_prompts(need * tp)
            if idx is None:
                if rounds == 0:
                    return None
                break
            rounds += 1
            batch = dm._generate(idx, dm.training_sampling(derive_seed(step_seed, rounds)),
                                 dm.train_records, dm.train_prompt_ids, greedy_baseline=dm.greedy_baseline)
            n_seen += need
            round_stats.append(batch.stats)
            if not dm.dynamic_sampling:
                kept.append(batch)
                n_kept = need
            else:
                informative = informative_groups(batch.scores, batch.group_index, need)
                keep_rows = informative[batch.group_index]
                kept.append(batch.select(keep_rows.nonzero().squeeze(1)))
                spare.append(batch.select((~keep_rows).nonzero().squeeze(1)))
                n_kept += int(informative.sum())
            # every rank runs the same number of rounds so engines and collectives stay in lockstep
            more = int(n_kept < need and rounds < dm.max_sampling_rounds)
            if not max_across_ranks(more):
                break
        dm._sleep_engine()  # GPU: the trainer gets the engine's memory until the next generate call
        out = concat_groups(kept + spare, need, dm._pad_id())
        out.stats = merge_stats(round_stats)
        out.stats["perf/generate_tokens_per_s"] = out.stats["rollout/generated_tokens"] / max(
            out.stats["perf/generate_s"], 1e-9)
        out.stats.update({
            "rollout/sampling_rounds": float(rounds),
            "rollout/dropped_long_prompts": float(dm.dropped_prompts),
            "perf/rollout_s": time.perf_counter() - t0,
        })
        if dm.dynamic_sampling:
            out.stats["rollout/dynamic_sampling_kept_share"] = n_kept / max(n_seen, 1)
            out.stats["rollout/dynamic_sampling_filled"] = float(max(need - n_kept, 0))
        return out

    def evaluate(self, indices: list[int], sampling: Callable[[int], Sampling], prompts_per_call: int
                 ) -> Iterator[RolloutBatch]:
        """``RolloutDataModule.evaluate``: scored rollouts of the held-out prompts ``indices``, ``prompts_per_call`` at
        a time; the engine sleeps again when the iteration ends or is abandoned."""
        dm = self.dm
        try:
            starts = list(range(0, len(indices), prompts_per_call))
            # A sharded hf actor gathers weights in every forward: every rank makes as many generate calls as the
            # rank with the most (agreed before the first call, itself a collective); the extra ones are dropped.
            lockstep = getattr(dm.engine, "max_calls_across_ranks", None)
            calls = lockstep(len(starts)) if lockstep is not None else len(starts)
            for i in range(calls):
                if i >= len(starts):
                    dm._awake_engine()
                    with dm._precision_context():
                        dm.engine.generate([dm.val_prompt_ids[0]], sampling(0))
                    continue
                idx = indices[starts[i] : starts[i] + prompts_per_call]
                batch = dm._generate(idx, sampling(idx[0]), dm.val_records, dm.val_prompt_ids,
                                     greedy_baseline=False)
                if batch is not None:
                    yield batch
        finally:
            dm._sleep_engine()

    def generate(self, idx: list[int], sampling: Sampling, records: list[PromptRecord],
                 prompt_ids: list[list[int]], greedy_baseline: bool) -> RolloutBatch | None:
        """Rollouts for prompts ``idx`` of ``records``: generate (the whole tensor-parallel group submits ``idx``),
        keep this rank's share, decode, score, pad."""
        dm = self.dm
        engine = dm._awake_engine()
        version = dm.weight_version
        mine = dm.share(len(idx))
        t0 = time.perf_counter()
        with dm._precision_context():
            outs = engine.generate([prompt_ids[i] for i in idx], sampling)[mine]
        t_gen = time.perf_counter() - t0
        if not outs:  # a tensor-parallel rank whose share of a short evaluation call is empty
            return None
        baseline = None
        if greedy_baseline:
            greedy = Sampling(n=1, temperature=0.0, max_tokens=sampling.max_tokens)
            with dm._precision_context():
                g_outs = engine.generate([prompt_ids[i] for i in idx], greedy)[mine]
            g_batch = self.score(idx[mine], g_outs, records, prompt_ids, version)
            baseline = g_batch.scores.repeat_interleave(sampling.n)
        t1 = time.perf_counter()
        batch = self.score(idx[mine], outs, records, prompt_ids, version)
        batch.baseline_scores = baseline
        batch.stats.update({
            "perf/generate_s": t_gen,
            "perf/score_s": time.perf_counter() - t1,
            "rollout/generated_tokens": float(batch.lengths.sum()),
        })
        return batch

    def score(self, idx: list[int], outs: list[list[Completion]], records: list[PromptRecord],
              prompt_ids: list[list[int]], version: int) -> RolloutBatch:
        """The completions ``outs`` of prompts ``idx`` decoded, scored (the module's ``compute_reward`` or the reward
        terms) and padded into a ``RolloutBatch`` tagged with weight ``version``."""
        dm = self.dm
        tok = dm.load_tokenizer()
        n = len(outs[0])
        comps = [c for group in outs for c in group]
        sample_prompt = [i for i in idx for _ in range(n)]
        texts = tok.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
        lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.long)
        truncated = torch.tensor([c.truncated for c in comps], dtype=torch.bool)
        group_index = torch.arange(len(idx)).repeat_interleave(n)
        prompts_text = [records[i].prompt for i in sample_prompt]
        reward_input = RewardInput(
            prompts=prompts_text,
            rendered_prompts=[records[i].rendered for i in sample_prompt],
            responses=texts,
            answers=[records[i].answer for i in sample_prompt],
            group_index=group_index,
            lengths=lengths,
            truncated=truncated,
            max_response_length=dm.max_response_length,
            metadata=[records[i].extra for i in sample_prompt],
        )
        result = self.reward(reward_input, len(comps))
        pad = dm._pad_id()
        prompt_t = pad_sequence([torch.tensor(prompt_ids[i]) for i in sample_prompt], batch_first=True,
                                padding_value=pad, padding_side="left")
        resp_t = pad_sequence([torch.tensor(c.token_ids, dtype=torch.long) for c in comps], batch_first=True,
                              padding_value=pad)
        logp_t = pad_sequence([torch.tensor(c.logprobs, dtype=torch.float32) for c in comps], batch_first=True)
        width = resp_t.shape[1]
        response_mask = torch.arange(width)[None, :] < lengths[:, None]
        prompt_lens = torch.tensor([len(prompt_ids[i]) for i in sample_prompt])
        prompt_mask = torch.arange(prompt_t.shape[1])[None, :] >= (prompt_t.shape[1] - prompt_lens)[:, None]
        extracted = result.extracted or [None] * len(comps)
        metadata = [
            {"prompt": prompts_text[j], "response": texts[j], "answer": records[sample_prompt[j]].answer,
             "extracted": extracted[j], "source": records[sample_prompt[j]].source}
            for j in range(len(comps))
        ]
        stats = dict(result.stats)
        return RolloutBatch(
            input_ids=torch.cat([prompt_t, resp_t], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1).long(),
            response_mask=response_mask,
            rollout_logprobs=logp_t,
            scores=result.scores.float(),
            correct=result.correct.bool(),
            lengths=lengths,
            truncated=truncated,
            group_index=group_index,
            weight_version=version,
            reward_terms=dict(result.terms),
            metadata=metadata,
            stats=stats,
        )


    def reward(self, inputs: RewardInput, b: int) -> RewardOutput:
        """The ``b`` samples' rewards: the module's ``compute_reward`` hook if it has one, else the reward terms."""
        dm = self.dm
        if dm._module is not None and hasattr(dm._module, "compute_reward"):
            return complete_reward(dm._module.compute_reward(inputs, dm.reward_fn), b,
                                   f"{type(dm._module).__name__}.compute_reward")
        return complete_reward(dm.reward_fn(inputs), b, "reward")


def informative_groups(scores: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) bool: groups whose rewards are not all equal (DAPO's dynamic-sampling filter)."""
    hi = torch.full((n_groups,), -torch.inf).scatter_reduce(0, group_index, scores, "amax")
    lo = torch.full((n_groups,), torch.inf).scatter_reduce(0, group_index, scores, "amin")
    return hi > lo


def concat_groups(parts: list[RolloutBatch], n_groups: int, pad_id: int) -> RolloutBatch:
    """Concatenate batches group by group (renumbering groups), keeping the first ``n_groups``."""
    parts = [p for p in parts if len(p)]
    pw = max(p.prompt_width for p in parts)
    rw = max(p.response_mask.shape[1] for p in parts)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "response_mask", "rollout_logprobs",
                                             "observation_mask", "turn_rewards")}
    multi_turn = parts[0].observation_mask is not None
    offset = 0
    groups, rest = [], []
    for p in parts:
        lp, lr = pw - p.prompt_width, rw - p.response_mask.shape[1]
        ids = torch.nn.functional.pad(p.input_ids[:, : p.prompt_width], (lp, 0), value=pad_id)
        resp = torch.nn.functional.pad(p.responses, (0, lr), value=pad_id)
        cols["input_ids"].append(torch.cat([ids, resp], 1))
        am = p.attention_mask
        cols["attention_mask"].append(torch.cat([
            torch.nn.functional.pad(am[:, : p.prompt_width], (lp, 0)),
            torch.nn.functional.pad(am[:, p.prompt_width :], (0, lr))], 1))
        cols["response_mask"].append(torch.nn.functional.pad(p.response_mask, (0, lr)))
        cols["rollout_logprobs"].append(torch.nn.functional.pad(p.rollout_logprobs, (0, lr)))
        if multi_turn:
            cols["observation_mask"].append(torch.nn.functional.pad(p.observation_mask, (0, lr)))
            cols["turn_rewards"].append(torch.nn.functional.pad(p.turn_rewards, (0, lr)))
        _, new_gi = torch.unique(p.group_index, sorted=True, return_inverse=True)
        groups.append(new_gi + offset)
        offset += int(new_gi.max()) + 1
        rest.append(p)
    group_index = torch.cat(groups)
    keep = (group_index < n_groups).nonzero().squeeze(1)
    cat = lambda name: torch.cat([getattr(p, name) for p in rest])
    baseline = None if rest[0].baseline_scores is None else cat("baseline_scores")
    merged = RolloutBatch(
        input_ids=torch.cat(cols["input_ids"]),
        attention_mask=torch.cat(cols["attention_mask"]),
        response_mask=torch.cat(cols["response_mask"]),
        rollout_logprobs=torch.cat(cols["rollout_logprobs"]),
        scores=cat("scores"), correct=cat("correct"), lengths=cat("lengths"), truncated=cat("truncated"),
        group_index=group_index,
        weight_version=rest[0].weight_version,
        reward_terms={k: torch.cat([p.reward_terms[k] for p in rest]) for k in rest[0].reward_terms},
        baseline_scores=baseline,
        observation_mask=torch.cat(cols["observation_mask"]) if multi_turn else None,
        turn_rewards=torch.cat(cols["turn_rewards"]) if multi_turn else None,
        metadata=[m for p in rest for m in p.metadata],
    )
    if len(parts) == 1 and len(keep) == len(group_index):
        return merged
    return merged.select(keep)


def merge_stats(rounds: list[dict[str, float]]) -> dict[str, float]:
    """One step's stats from its generation rounds: seconds and generated tokens add up, every other value
    (shares, fractions; the rounds are of equal size) is averaged over the rounds that report it."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for s in rounds for k in s):
        values = [s[k] for s in rounds if k in s]
        summed = k.endswith("_s") or k == "rollout/generated_tokens"
        out[k] = float(sum(values)) if summed else float(sum(values) / len(values))
    return out
