"""Multi-turn rollouts through real vLLM (the CPU build) on the tiny random model: token in, token out; masks; turn
rewards; limits; and the config checks of ``data.environment``.

The environment here (``Countdown``) is a test double for a task: it answers each turn with a fixed text naming the
turn and the turn's length, rewards each turn, and ends an episode after a number of turns that depends on the prompt,
so that episodes of one call finish at different turns. The random model rarely writes EOS, so turns are cut by
``max_turn_tokens`` (the environment still answers them)."""

from __future__ import annotations

import pytest
import torch

from vapo_pl.envs import Environment, StepResult

pytestmark = pytest.mark.vllm


class Countdown(Environment):
    metrics = ("tool_calls", "tool_errors")

    def __init__(self, bonus: float = 0.25) -> None:
        self.bonus = bonus
        self.turn = 0
        self.last = 1

    def reset(self, record, prompt):
        self.last = 1 + int(record.prompt.split("+")[0]) % 3  # episodes end after 1, 2 or 3 turns
        return prompt

    def step(self, turn_ids, turn_text):
        self.turn += 1
        reward = self.bonus * self.turn
        if self.turn >= self.last:
            return StepResult(observation=None, reward=reward, done=True, info={"tool_calls": 1})
        return StepResult(observation=f"\nobs {self.turn}: {len(turn_ids)} tokens\nA:", reward=reward,
                          info={"tool_calls": 1, "tool_errors": self.turn % 2})


class Recording:
    """Wraps the real engine: every request's context and the completions vLLM returned for it."""

    def __init__(self, engine):
        self.engine, self.calls = engine, {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, sampling):
        outs = self.engine.generate(prompts, sampling)
        for p, o in zip(prompts, outs):
            self.calls.setdefault(tuple(p), []).extend(o)
        return outs


def build_dm(tiny_model_dir, prompt_file, **over):
    from vapo_pl import RolloutDataModule

    kw = {"train_files": prompt_file, "model_path": str(tiny_model_dir), "max_prompt_length": 32, "max_response_length": 64,
              "prompts_per_step": 6, "samples_per_prompt": 1, "engine": {"kind": "vllm", "dtype": "float32",
                                                                 "enforce_eager": True},
              "environment": {"name": f"{__name__}.Countdown"}, "reward": [],
              "episode": {"max_turns": 4, "max_total_tokens": 96, "max_turn_tokens": 5}}
    kw.update(over)
    dm = RolloutDataModule(**kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def rollout(tiny_model_dir, prompt_file):
    dm = build_dm(tiny_model_dir, prompt_file)
    rec = Recording(dm.engine)
    dm.attach_engine(rec)
    return dm, rec, dm.next_batch()


def test_trained_ids_are_the_sampled_ids_and_the_observation_ids(rollout):
    """Walk every episode: from its context, the next policy segment is exactly what vLLM returned for that context
    (ids and log-probs), the next observation segment exactly the tokeniser's ids of the environment's text; the
    masks mark the segments, the turn rewards sit on each turn's last sampled token."""
    dm, rec, batch = rollout
    tok = dm.load_tokenizer()
    p = batch.prompt_width
    turns_seen = set()
    for j in range(len(batch)):
        real = batch.attention_mask[j].bool()
        prompt = batch.input_ids[j, :p][real[:p]].tolist()
        resp = batch.input_ids[j, p:][real[p:]].tolist()
        pol, obs = batch.response_mask[j], batch.observation_mask[j]
        ctx, pos, turn = list(prompt), 0, 0
        while pos < len(resp):
            (comp,) = rec.calls[tuple(ctx)]
            k = len(comp.token_ids)
            assert resp[pos : pos + k] == comp.token_ids  # byte for byte what vLLM sampled
            assert pol[pos : pos + k].all() and not obs[pos : pos + k].any()
            assert batch.rollout_logprobs[j, pos : pos + k].tolist() == pytest.approx(comp.logprobs, abs=0)
            turn += 1
            assert batch.turn_rewards[j, pos + k - 1] == pytest.approx(0.25 * turn)
            ctx += comp.token_ids
            pos += k
            if pos == len(resp):
                break
            want = tok(f"\nobs {turn}: {k} tokens\nA:", add_special_tokens=False)["input_ids"]
            assert resp[pos : pos + len(want)] == want
            assert obs[pos : pos + len(want)].all() and not pol[pos : pos + len(want)].any()
            assert (batch.rollout_logprobs[j, pos : pos + len(want)] == 0).all()
            ctx += want
            pos += len(want)
        assert turn == batch.metadata[j]["turns"]
        turns_seen.add(turn)
        assert int(batch.lengths[j]) == len(resp) and pol[len(resp) - 1]  # the last token is the policy's
        assert batch.scores[j] == pytest.approx(float(batch.turn_rewards[j].sum()))  # reward: [] -> env only
    assert turns_seen == {1, 2, 3}  # episodes of one call finished at different turns
    assert batch.host.response_lens == tuple(batch.lengths.tolist())  # observations count in the layout


def test_episode_metrics_and_marked_samples(rollout):
    _, _, batch = rollout
    s = batch.stats
    turns = [m["turns"] for m in batch.metadata]
    assert s["episode/turns"] == pytest.approx(sum(turns) / len(turns))
    assert s["episode/tool_calls"] == pytest.approx(sum(turns) / len(turns))
    obs, pol = batch.observation_mask.sum().item(), batch.response_mask.sum().item()
    assert s["episode/observation_token_share"] == pytest.approx(obs / (obs + pol))
    assert s["rollout/generated_tokens"] == pol
    multi = next(m for m in batch.metadata if m["turns"] == 3)
    assert multi["response"].count("[turn ") == 3 and multi["response"].count("[observation]") == 2


def test_limits_truncate_like_an_overlong_response(tiny_model_dir, prompt_file):
    """At most one turn: an episode whose environment wants a second one is truncated; a budget too small for an
    observation truncates too."""
    dm = build_dm(tiny_model_dir, prompt_file, episode={"max_turns": 1, "max_total_tokens": 96, "max_turn_tokens": 5})
    b = dm.next_batch()
    ends_after_one = torch.tensor([int(r["prompt"].split("+")[0]) % 3 == 0 for r in b.metadata])
    assert (b.truncated == ~ends_after_one).all() and b.observation_mask.sum() == 0
    tight = build_dm(tiny_model_dir, prompt_file, max_response_length=8,
                     episode={"max_turns": 4, "max_total_tokens": 96, "max_turn_tokens": 5})
    b = tight.next_batch()
    assert int(b.lengths.max()) <= 8
    assert b.truncated[[m["turns"] > 1 or int(m["prompt"].split("+")[0]) % 3 != 0 for m in b.metadata]].all()


def test_environment_config_errors_name_the_field(tiny_model_dir, prompt_file):
    from vapo_pl import RolloutDataModule

    base = {"train_files": prompt_file, "model_path": str(tiny_model_dir)}
    for env, msg in (({"name": "no.such.Env"}, "data.environment.name 'no.such.Env' cannot be imported"),
                     ({"name": "vapo_pl.batch.RolloutBatch"}, "is not a vapo_pl.envs.Environment subclass"),
                     ({"name": "tools", "kwargs": {"tags": "calc"}}, "data.environment.kwargs for ToolEnvironment"),
                     ({"name": "tools", "kwargs": {"tools": ["search"]}}, "no built-in tool 'search'"),
                     ({"name": "tools", "args": {}}, "data.environment has no field 'args'")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            RolloutDataModule(**base, environment=env)
    with pytest.raises(ValueError, match="data.reward is empty"):
        RolloutDataModule(**base, reward=[])
    with pytest.raises(ValueError, match="data.episode.max_turns must be an integer >= 1"):
        RolloutDataModule(**base, environment="tools", episode={"max_turns": 0})


def test_cpu_engine_uses_small_kv_blocks_so_the_prefix_cache_serves_later_turns(rollout):
    """vLLM's CPU default block is 128 tokens and its prefix cache reuses whole blocks only: a multi-turn engine gets
    32 (``EngineConfig.block_size``), so an episode's earlier turns are not recomputed at every turn."""
    _dm, rec, _ = rollout
    cache = rec.engine.llm.llm_engine.vllm_config.cache_config
    assert cache.block_size == 32 and cache.enable_prefix_caching
    from vapo_pl.rollout.config import EngineConfig

    with pytest.raises(ValueError, match="engine.block_size must be an integer >= 1"):
        EngineConfig(block_size=0)
