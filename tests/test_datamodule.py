"""RolloutDataModule on the tiny model with the transformers engine (fast); vLLM paths are in tests/rollout."""

from __future__ import annotations

import json

import pytest
import torch

from vapo_pl.datamodule import RolloutDataModule
from vapo_pl.rollout.single_turn import informative_groups as _informative_groups
from vapo_pl.rewards.base import RewardTerm
from vapo_pl.rollout.config import EngineConfig


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"{i}+1=?", "answer": str(i + 1)} for i in range(30)]
    rows.append({"prompt": "9" * 200, "answer": "0"})  # longer than max_prompt_length: dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dm(prompts, tiny_model_dir, **kw):
    args = dict(train_files=prompts, model_path=str(tiny_model_dir), max_prompt_length=32, max_response_length=10,
                prompts_per_step=4, samples_per_prompt=3, engine=EngineConfig(kind="hf", dtype="float32"),
                reward=[RewardTerm(name="tests.trainer.task_rewards.coin")])
    args.update(kw)
    dm = RolloutDataModule(**args)
    dm.setup("fit")
    return dm


def test_batch_fields_and_shapes(prompts, tiny_model_dir):
    dm = _dm(prompts, tiny_model_dir)
    assert dm.dropped_prompts == 1 and len(dm.train_prompt_ids) == 30
    b = dm.next_batch()
    assert len(b) == 12 and b.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    width = b.response_mask.shape[1]
    assert b.input_ids.shape == (12, b.prompt_width + width) and b.attention_mask.shape == b.input_ids.shape
    assert torch.equal(b.response_mask.sum(1), b.lengths) and int(b.lengths.max()) <= 10
    assert torch.equal(b.truncated, b.lengths == 10) or b.truncated.sum() <= (b.lengths == 10).sum()
    # left-padded prompts: every prompt row ends with a real token, response rows start right after
    assert bool(b.attention_mask[:, b.prompt_width - 1].all())
    assert b.rollout_logprobs.shape == b.response_mask.shape and bool((b.rollout_logprobs[b.response_mask] <= 0).all())
    assert set(b.metadata[0]) >= {"prompt", "response", "answer", "extracted", "source"}
    assert b.weight_version == 0 and b.stats["rollout/dropped_long_prompts"] == 1.0
    assert "reward/" not in b.reward_terms and set(b.reward_terms) == {"tests.trainer.task_rewards.coin"}


def test_epoch_covers_each_prompt_once_then_ends(prompts, tiny_model_dir):
    dm = _dm(prompts, tiny_model_dir, max_response_length=2, samples_per_prompt=1)
    seen = []
    stream = iter(dm.train_dataloader())
    for b in stream:
        seen += [m["prompt"] for m in b.metadata]
    assert len(seen) == 28 and len(set(seen)) == 28  # 7 full steps of 4 from 30 prompts, none twice
    assert dm.epoch == 1 and dm.cursor == 0


def test_dynamic_sampling_keeps_informative_groups_and_fills(prompts, tiny_model_dir):
    dm = _dm(prompts, tiny_model_dir, dynamic_sampling=True, max_sampling_rounds=4, samples_per_prompt=4)
    b = dm.next_batch()
    assert len(b) == 16 and sorted(set(b.group_index.tolist())) == [0, 1, 2, 3]
    kept = _informative_groups(b.scores, b.group_index, 4)
    filled = int(b.stats["rollout/dynamic_sampling_filled"])
    assert int(kept.sum()) == 4 - filled  # informative groups first; any filler has all-equal rewards
    assert 0 < b.stats["rollout/dynamic_sampling_kept_share"] <= 1
    assert 1 <= b.stats["rollout/sampling_rounds"] <= 4


def test_dynamic_sampling_step_stats_count_each_round_once(prompts, tiny_model_dir):
    """Half of each round's groups are informative, so a step of 4 groups takes 2 rounds and the first round is
    split into kept and filtered parts: the step's generated tokens and seconds are those of the 2 rounds, each
    counted once."""
    dm = _dm(prompts, tiny_model_dir, dynamic_sampling=True, max_sampling_rounds=3, samples_per_prompt=2,
             reward=[RewardTerm(name="tests.trainer.task_rewards.half_informative")])
    generated = []
    generate = dm._generate

    def recording(*args, **kwargs):
        batch = generate(*args, **kwargs)
        generated.append(batch)
        return batch

    dm._generate = recording
    b = dm.next_batch()
    assert len(generated) == 2 and b.stats["rollout/sampling_rounds"] == 2.0
    assert b.stats["rollout/dynamic_sampling_filled"] == 0.0 and len(b) == 8
    assert b.stats["rollout/generated_tokens"] == sum(float(g.lengths.sum()) for g in generated)
    assert b.stats["perf/generate_s"] == pytest.approx(sum(g.stats["perf/generate_s"] for g in generated))
    assert b.stats["perf/generate_s"] <= b.stats["perf/rollout_s"]
    assert b.stats["half/share"] == 0.5  # a share is averaged over the rounds, not summed


def test_informative_groups_filter():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert _informative_groups(scores, groups, 3).tolist() == [False, True, False]


def test_remax_greedy_baseline(prompts, tiny_model_dir):
    dm = _dm(prompts, tiny_model_dir, greedy_baseline=True)
    b = dm.next_batch()
    assert b.baseline_scores is not None and b.baseline_scores.shape == (12,)
    # one greedy score per prompt, repeated over its samples
    assert torch.equal(b.baseline_scores.view(4, 3), b.baseline_scores.view(4, 3)[:, :1].expand(4, 3))


def test_training_top_p_refused_and_bad_values_name_the_field(prompts):
    with pytest.raises(ValueError, match="data.top_p"):
        RolloutDataModule(train_files=prompts, top_p=0.7)
    with pytest.raises(ValueError, match="data.samples_per_prompt"):
        RolloutDataModule(train_files=prompts, samples_per_prompt=0)
    with pytest.raises(ValueError, match="engine.gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_missing_model_dir_is_one_line(prompts, tmp_path):
    dm = RolloutDataModule(train_files=prompts, model_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError) as e:
        dm.setup("fit")
    assert "data.model_path" in str(e.value) and "\n" not in str(e.value)


def test_all_prompts_too_long_fails_clearly(prompts, tiny_model_dir):
    with pytest.raises(ValueError, match="max_prompt_length"):
        _dm(prompts, tiny_model_dir, max_prompt_length=2)


class _Hooked:
    """A stand-in for the module's two hooks (the DataModule calls only these): a plain-text template, and a
    reward hook that records what it was given and returns what the test chooses."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def build_prompt(self, record, tokenizer, template):
        return f"<q>{record.prompt}</q>"

    def compute_reward(self, inputs, default):
        self.seen.append(inputs)
        return self.reply(inputs)


def test_reward_input_carries_raw_and_rendered_prompts_and_hook_output_is_completed(prompts, tiny_model_dir):
    """One reward contract: the hook returns the registered functions' ``RewardOutput``; ``correct`` and ``terms``
    default as for a registered function; ``prompts`` is the raw question, ``rendered_prompts`` what the policy saw."""
    import torch as _t

    from vapo_pl.rewards import RewardOutput

    hook = _Hooked(lambda inp: RewardOutput(scores=_t.arange(len(inp), dtype=_t.float32) - 1))
    dm = _dm(prompts, tiny_model_dir)
    dm.connect(hook)
    dm.train_prompt_ids = []
    dm.setup("fit")  # tokenise again with the hook's template
    b = dm.next_batch()
    inp = hook.seen[-1]
    assert all(q.endswith("+1=?") and "<q>" not in q for q in inp.prompts)
    assert inp.rendered_prompts == [f"<q>{q}</q>" for q in inp.prompts]
    assert b.correct.tolist() == (b.scores > 0).tolist() and b.correct.any() and not b.correct.all()
    assert list(b.reward_terms) == ["_Hooked.compute_reward"]

    hook.reply = lambda inp: {"scores": _t.zeros(len(inp))}
    with pytest.raises(ValueError, match=r"^_Hooked.compute_reward returned dict, expected RewardOutput$"):
        dm.next_batch()
    hook.reply = lambda inp: RewardOutput(scores=_t.zeros(len(inp) + 1))
    with pytest.raises(ValueError, match=r"_Hooked.compute_reward returned scores of shape \(13,\), expected \(12,\)"):
        dm.next_batch()
