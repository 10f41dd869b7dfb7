"""Multi-turn rollouts: episodes of policy turns and environment observations, generated in batches through the
engine.

Every generate call advances each active episode of a step by one policy turn: the first call samples the ``n``
episodes of every prompt from the prompt itself (as a single-turn rollout does), each later call continues every
episode still running from its whole context, with one sample each (vLLM's prefix cache serves the shared prefixes).
After a turn the environments react, concurrently in a thread pool (tool calls are subprocesses), and an episode
ends when its environment says so, when its turn stopped at the length cap, or at a limit of ``EpisodeLimits``;
episodes of one step finish at different turns.

Token in, token out: the sequence trained on is the prompt's ids, then each turn's sampled ids exactly as the engine
returned them, then the observation's ids (the observation text tokenised once, cut to ``max_observation_tokens``),
and so on. No text is ever re-tokenised. In the ``RolloutBatch``, ``response_mask`` marks the sampled tokens only
(they carry the sampler's log-probs), ``observation_mask`` the observations (log-prob 0, no loss term of any kind),
and ``turn_rewards`` each turn's reward at its last sampled token.

Rewards: the episode's return (``scores``) is the environment's turn rewards plus the reward terms (``data.reward``)
on the transcript, placed on the last token; with ``data.reward: []`` the environment's rewards are all there is and
an episode is correct when its return is positive.

Limits: the response (turns and observations together) stays within ``data.max_response_length`` and the whole
episode within ``episode.max_total_tokens``; an episode stopped by a limit (tokens, turns) or whose turn hit the
length cap is ``truncated``, as an overlong single-turn response is.
"""

from __future__ import annotations

import importlib
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence

from vapo_pl.batch import RolloutBatch
from vapo_pl.common import derive_seed
from vapo_pl.envs.base import Environment, EpisodeLimits, StepResult
from vapo_pl.prompts import PromptRecord
from vapo_pl.rewards.base import RewardInput
from vapo_pl.rollout.base import Sampling
from vapo_pl.rollout.single_turn import SingleTurnRollout

if TYPE_CHECKING:
    from vapo_pl.datamodule import RolloutDataModule

SHORT_NAMES = {"tools": "vapo_pl.envs.ToolEnvironment"}


@dataclass(frozen=True)
class EnvironmentSpec:
    """``data.environment``: ``name``, the ``Environment`` subclass (an import path ``pkg.module.Class``, or ``tools``),
    and ``kwargs``, the keyword arguments each episode's instance is built with (as ``data.reward``'s terms are
    written); checked when the config is read."""

    cls: type
    kwargs: dict[str, Any]

    @classmethod
    def parse(cls, value: str | type | dict | EnvironmentSpec) -> EnvironmentSpec:
        if isinstance(value, EnvironmentSpec):
            return value
        if isinstance(value, (str, type)):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError(f"data.environment must be a class path or {{name: ..., kwargs: {{...}}}}, got {value!r}")
        unknown = sorted(set(value) - {"name", "kwargs"})
        if unknown:
            raise ValueError(f"data.environment has no field {unknown[0]!r} (fields: name, kwargs)")
        if isinstance(value["name"], type):  # the Python API may pass the class itself
            env_cls = value["name"]
            path = name = env_cls.__name__
        else:
            path = SHORT_NAMES.get(value["name"], value["name"])
            module, _, name = path.rpartition(".")
            try:
                env_cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"data.environment.name {path!r} cannot be imported: {e}") from None
        if not (isinstance(env_cls, type) and issubclass(env_cls, Environment)):
            raise ValueError(f"data.environment.name {path!r} is not a vapo_pl.envs.Environment subclass")  # noqa: TRY004
        args = dict(value.get("kwargs") or {})
        try:
            inspect.signature(env_cls).bind(**args)
            env_cls(**args).close()  # built once here, so that a bad argument fails when the config is read
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.environment.kwargs for {name}: {e}") from None
        return cls(env_cls, args)

    def make(self, tokenizer: Any) -> Environment:
        env = self.cls(**self.kwargs)
        env.tokenizer = tokenizer
        return env


@dataclass
class Episode:
    """One episode's tokens as they are generated: ``ids`` after the prompt, which of them the policy sampled, their
    log-probs (0 on observation tokens), and each turn's reward with the position of the turn's last token."""

    prompt: int  # index into the records
    context: list[int]  # prompt ids + everything so far: what the next turn is generated from
    env: Environment
    budget: int  # tokens the response may hold
    ids: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)
    turn_texts: list[tuple[str, str]] = field(default_factory=list)  # ("policy" | "observation", text)
    info: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    truncated: bool = False
    done: bool = False
    observation_cut: int = 0  # observation tokens dropped by max_observation_tokens

    @property
    def left(self) -> int:
        return self.budget - len(self.ids)


class MultiTurnRollout(SingleTurnRollout):
    """The rollout loop of a DataModule with ``data.environment`` set: ``step`` (dynamic-sampling rounds) and
    ``evaluate`` are the single-turn ones; ``generate`` runs episodes."""

    def __init__(self, dm: RolloutDataModule, spec: EnvironmentSpec, limits: EpisodeLimits, workers: int) -> None:
        super().__init__(dm)
        self.spec, self.limits, self.workers = spec, limits, workers

    def generate(self, idx: list[int], sampling: Sampling, records: list[PromptRecord],
                 prompt_ids: list[list[int]], greedy_baseline: bool) -> RolloutBatch | None:
        dm = self.dm
        if greedy_baseline:
            raise ValueError("a greedy baseline (ReMax) is not defined for multi-turn episodes; use another "
                             "estimator with data.environment")
        engine = dm._awake_engine()
        version = dm.weight_version
        tok = dm.load_tokenizer()
        n = sampling.n
        t_gen = t_env = 0.0
        episodes: list[Episode] = []
        try:
            for i in idx:
                for _ in range(n):
                    env = self.spec.make(tok)
                    episodes.append(Episode(prompt=i, context=[], env=env, budget=0))
                    first = env.reset(records[i], records[i].rendered or records[i].prompt)
                    ctx = list(prompt_ids[i]) if first == (records[i].rendered or records[i].prompt) else \
                        tok(first, add_special_tokens=False)["input_ids"]
                    episodes[-1].context = ctx
                    episodes[-1].budget = max(min(dm.max_response_length, self.limits.max_total_tokens - len(ctx)), 0)
            active = [e for e in episodes if e.left > 0]
            for e in episodes:
                if e.left <= 0:
                    e.truncated = e.done = True
            turn = 0
            while active:
                turn += 1
                cap = min(sampling.max_tokens, max(e.left for e in active),
                          self.limits.max_turn_tokens or sampling.max_tokens)
                t0 = time.perf_counter()
                with dm._precision_context():
                    if turn == 1 and all(e.context == list(prompt_ids[e.prompt]) for e in active) and \
                            len(active) == len(episodes):
                        # every episode starts from its prompt: one request per prompt with n samples
                        outs = engine.generate([episodes[k * n].context for k in range(len(idx))],
                                               replace(sampling, max_tokens=cap))
                        comps = [c for group in outs for c in group]
                    else:
                        seed = None if sampling.seed is None else derive_seed(sampling.seed, turn)
                        outs = engine.generate([e.context for e in active],
                                               replace(sampling, n=1, max_tokens=cap, seed=seed))
                        comps = [group[0] for group in outs]
                t_gen += time.perf_counter() - t0
                t0 = time.perf_counter()
                stepping = []
                for e, c in zip(active, comps):
                    ids = list(c.token_ids[: e.left])
                    e.ids += ids
                    e.policy += [True] * len(ids)
                    e.logprobs += list(c.logprobs[: len(ids)])
                    e.context += ids
                    e.turns += 1
                    text = tok.decode(ids, skip_special_tokens=True)
                    e.turn_texts.append(("policy", text))
                    # a turn stopped by the episode's budget (not by max_turn_tokens) ends it as truncated
                    out_of_budget = len(ids) < len(c.token_ids) or (c.truncated and e.left == 0)
                    if out_of_budget or not ids or (c.truncated and self.limits.max_turn_tokens is None):
                        e.truncated = e.done = True  # the turn did not finish: as an overlong response
                    else:
                        stepping.append((e, ids, text))
                results = self._step_all(stepping)
                for (e, _, _), r in zip(stepping, results):
                    self._apply(e, r, tok)
                t_env += time.perf_counter() - t0
                active = [e for e in active if not e.done]
        finally:
            for e in episodes:
                e.env.close()
        mine = dm.share(len(idx))
        keep = episodes[mine.start * n : mine.stop * n]
        if not keep:
            return None
        t1 = time.perf_counter()
        batch = self.build(idx[mine], keep, records, prompt_ids, version)
        batch.stats.update({
            "perf/generate_s": t_gen,
            "perf/env_s": t_env,
            "perf/score_s": time.perf_counter() - t1,
            "rollout/generated_tokens": float(batch.response_mask.sum()),
        })
        return batch

    def _step_all(self, stepping: list[tuple[Episode, list[int], str]]) -> list[StepResult]:
        """Every episode's environment reacts to its turn; concurrently when there are several."""
        if not stepping:
            return []

        def one(item: tuple[Episode, list[int], str]) -> StepResult:
            e, ids, text = item
            out = e.env.step(ids, text)
            if not isinstance(out, StepResult):
                raise TypeError(f"{type(e.env).__name__}.step returned {type(out).__name__}, expected StepResult")
            return out

        if self.workers <= 1 or len(stepping) == 1:
            return [one(s) for s in stepping]
        with ThreadPoolExecutor(min(self.workers, len(stepping))) as pool:
            return list(pool.map(one, stepping))

    def _apply(self, e: Episode, r: StepResult, tok: Any) -> None:
        """Record the environment's answer to ``e``'s last turn: its reward on the turn's last token, and the
        observation's tokens appended, or the end of the episode."""
        e.turn_rewards.append((len(e.ids) - 1, float(r.reward)))
        for k, v in r.info.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                e.info[k] = e.info.get(k, 0.0) + float(v)
        if r.done or r.observation is None:
            e.done = True
            return
        if e.turns >= self.limits.max_turns:
            e.truncated = e.done = True  # the environment wanted another turn
            return
        obs = tok(r.observation, add_special_tokens=False)["input_ids"]
        if len(obs) > self.limits.max_observation_tokens:
            e.observation_cut += len(obs) - self.limits.max_observation_tokens
            obs = obs[: self.limits.max_observation_tokens]
        if len(obs) >= e.left:  # no room for the observation and a token of the next turn
            e.truncated = e.done = True
            return
        e.ids += obs
        e.policy += [False] * len(obs)
        e.logprobs += [0.0] * len(obs)
        e.context += obs
        e.turn_texts.append(("observation", tok.decode(obs, skip_special_tokens=True)))

    def build(self, idx: list[int], episodes: list[Episode], records: list[PromptRecord],
              prompt_ids: list[list[int]], version: int) -> RolloutBatch:
        """The episodes scored and padded into a ``RolloutBatch`` (see the module docstring for the layout)."""
        dm = self.dm
        tok = dm.load_tokenizer()
        n = len(episodes) // len(idx)
        b = len(episodes)
        sample_prompt = [e.prompt for e in episodes]
        transcripts = tok.batch_decode([e.ids for e in episodes], skip_special_tokens=True)
        lengths = torch.tensor([len(e.ids) for e in episodes], dtype=torch.long)
        truncated = torch.tensor([e.truncated for e in episodes], dtype=torch.bool)
        group_index = torch.arange(len(idx)).repeat_interleave(n)
        pad = dm._pad_id()
        width = max(1, int(lengths.max()))
        resp = torch.full((b, width), pad, dtype=torch.long)
        policy = torch.zeros((b, width), dtype=torch.bool)
        logp = torch.zeros((b, width), dtype=torch.float32)
        turn_rewards = torch.zeros((b, width), dtype=torch.float32)
        for j, e in enumerate(episodes):
            k = len(e.ids)
            resp[j, :k] = torch.tensor(e.ids, dtype=torch.long)
            policy[j, :k] = torch.tensor(e.policy, dtype=torch.bool)
            logp[j, :k] = torch.tensor(e.logprobs, dtype=torch.float32)
            for pos, r in e.turn_rewards:
                turn_rewards[j, pos] += r
        real = torch.arange(width)[None, :] < lengths[:, None]
        observation = real & ~policy
        env_return = turn_rewards.sum(1)
        prompts_text = [records[i].prompt for i in sample_prompt]
        if dm.reward_terms:
            result = self.reward(RewardInput(
                prompts=prompts_text,
                rendered_prompts=[records[i].rendered for i in sample_prompt],
                responses=transcripts,
                answers=[records[i].answer for i in sample_prompt],
                group_index=group_index,
                lengths=lengths,
                truncated=truncated,
                max_response_length=dm.max_response_length,
                metadata=[records[i].extra for i in sample_prompt],
            ), b)
            scores = result.scores.float() + env_return
            correct, terms, stats = result.correct.bool(), dict(result.terms), dict(result.stats)
            extracted = result.extracted or [None] * b
        else:
            scores, correct, terms, stats, extracted = env_return, env_return > 0, {}, {}, [None] * b
        terms["environment"] = env_return
        prompt_t = pad_sequence([torch.tensor(prompt_ids[i]) for i in sample_prompt], batch_first=True,
                                padding_value=pad, padding_side="left")
        prompt_lens = torch.tensor([len(prompt_ids[i]) for i in sample_prompt])
        prompt_mask = torch.arange(prompt_t.shape[1])[None, :] >= (prompt_t.shape[1] - prompt_lens)[:, None]
        metadata = [
            {"prompt": prompts_text[j], "response": marked_transcript(e.turn_texts), "answer":
             records[e.prompt].answer, "extracted": extracted[j], "source": records[e.prompt].source,
             "turns": e.turns, "tool_calls": int(e.info.get("tool_calls", 0))}
            for j, e in enumerate(episodes)
        ]
        stats.update(episode_stats(episodes, policy, observation, turn_rewards, self.spec.cls.metrics))
        return RolloutBatch(
            input_ids=torch.cat([prompt_t, resp], dim=1),
            attention_mask=torch.cat([prompt_mask, real], dim=1).long(),
            response_mask=policy,
            rollout_logprobs=logp,
            scores=scores,
            correct=correct,
            lengths=lengths,
            truncated=truncated,
            group_index=group_index,
            weight_version=version,
            reward_terms=terms,
            observation_mask=observation,
            turn_rewards=turn_rewards,
            metadata=metadata,
            stats=stats,
        )


def marked_transcript(turns: list[tuple[str, str]]) -> str:
    """An episode as text with its turns marked, for sample logs: ``[turn 1] ...``, ``[observation] ...``."""
    parts, k = [], 0
    for role, text in turns:
        if role == "policy":
            k += 1
            parts.append(f"[turn {k}] {text}")
        else:
            parts.append(f"[observation] {text}")
    return "\n".join(parts)


def episode_stats(episodes: list[Episode], policy: torch.Tensor, observation: torch.Tensor,
                  turn_rewards: torch.Tensor, counters: tuple[str, ...]) -> dict[str, float]:
    """Per-step episode metrics: turns, the environment's ``counters`` per episode (``Environment.metrics``:
    ``tool_calls``, ``tool_errors``, ...), the observations' share of the response tokens, tool latency per call, and
    the reward per turn. The keys depend only on ``counters``, so every rank logs the same ones."""
    b = len(episodes)
    turns = sum(e.turns for e in episodes)
    out = {
        "episode/turns": turns / b,
        "episode/truncated_share": sum(e.truncated for e in episodes) / b,
        "episode/observation_token_share": float(observation.sum()) / max(float((policy | observation).sum()), 1.0),
        "episode/observation_tokens_cut": float(sum(e.observation_cut for e in episodes)),
        "episode/turn_reward": float(turn_rewards.sum()) / max(turns, 1),
    }
    for k in counters:
        total = sum(e.info.get(k, 0.0) for e in episodes)
        if k == "tool_seconds":
            calls = sum(e.info.get("tool_calls", 0.0) for e in episodes)
            out["episode/tool_latency_ms"] = 1000 * total / max(calls, 1.0)
        else:
            out[f"episode/{k}"] = total / b
            if k == "tool_calls":
                out["episode/tool_call_rate"] = sum(e.info.get(k, 0.0) > 0 for e in episodes) / b
    return out
