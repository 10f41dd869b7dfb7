"""``reward_model`` with a tiny Qwen2ForSequenceClassification (num_labels=1) built here, char tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.rewards._helpers import make_inputs
from vapo_pl.rewards import resolve_reward_fn
from vapo_pl.rewards.reward_model import load_reward_model
from vapo_pl.tiny import build_char_tokenizer

reward_model = resolve_reward_fn("reward_model")


def _build(path: Path, num_labels: int = 1) -> str:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    return _build(tmp_path_factory.mktemp("rm") / "model")


RESPONSES = ["The answer is 4.", "I do not know.", "2+2=5", "The answer is 4.", "x"]


def test_scores_deterministic_and_response_dependent(rm_dir):
    load_reward_model.cache_clear()
    inputs = make_inputs(RESPONSES)
    first = reward_model(inputs, path=rm_dir, batch_size=2)
    second = reward_model(inputs, path=rm_dir, batch_size=2)
    assert first.scores.shape == (5,) and first.scores.dtype == torch.float32
    assert torch.equal(first.scores, second.scores)
    assert load_reward_model.cache_info().misses == 1  # loaded once, then cached
    # Different responses (same prompt index pattern aside) give different scores.
    assert len({round(s, 6) for s in first.scores[[0, 1, 2, 4]].tolist()}) == 4
    # Padding does not leak into the score: batch size 1 and 5 agree.
    torch.testing.assert_close(
        reward_model(inputs, path=rm_dir, batch_size=5).scores, first.scores, atol=1e-5, rtol=0
    )


def _expected(rm_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    with torch.no_grad():
        return torch.tensor([model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts])


def test_score_is_the_models_logit_on_its_own_chat_rendering(rm_dir):
    """With a chat template, the reward model reads (user: raw question, assistant: response) in its own template,
    whatever template the policy's prompt used."""
    inputs = make_inputs(RESPONSES[:2])
    inputs.rendered_prompts = [f"<policy template> {p}" for p in inputs.prompts]  # must not be read
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    assert tok.chat_template
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                     tokenize=False) for q, r in zip(inputs.prompts, inputs.responses)]
    assert all(q in t and r in t and "<policy template>" not in t for q, r, t in
               zip(inputs.prompts, inputs.responses, texts))
    torch.testing.assert_close(reward_model(inputs, path=rm_dir).scores, _expected(rm_dir, texts), atol=1e-5, rtol=0)


def test_without_a_chat_template_it_reads_the_rendered_prompt_and_response(tmp_path):
    from transformers import AutoTokenizer

    path = _build(tmp_path / "plain")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    tok.save_pretrained(path)
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    inputs = make_inputs(RESPONSES[:2])
    inputs.rendered_prompts = [f"<user>{p}<assistant>" for p in inputs.prompts]
    texts = [p + r for p, r in zip(inputs.rendered_prompts, inputs.responses)]
    torch.testing.assert_close(reward_model(inputs, path=path).scores, _expected(path, texts), atol=1e-5, rtol=0)


def test_truncation_keeps_the_end(rm_dir):
    # Same last 16 characters, different beginnings: with max_length 12 only the end is read.
    # (No spaces: transformers 5 loads this directory's tokenizer as Qwen2Tokenizer, which drops them.)
    inputs = make_inputs(["aaaaaaaaaaaa;hencetheanswer=42.", "bbbb;hencetheanswer=42."])
    out = reward_model(inputs, path=rm_dir, max_length=12)
    torch.testing.assert_close(out.scores[0], out.scores[1], atol=1e-6, rtol=0)
    full = reward_model(inputs, path=rm_dir)
    assert abs(full.scores[0].item() - full.scores[1].item()) > 1e-6


def test_missing_or_bad_path_fails_with_one_line(tmp_path):
    inputs = make_inputs(["x"])
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError) as e:
        reward_model(inputs, path=missing)
    assert "\n" not in str(e.value) and missing in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="could not be loaded") as e:
        reward_model(inputs, path=str(empty))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs path="):
        reward_model(inputs, path="")


def test_rejects_multi_label_checkpoint(tmp_path):
    path = _build(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2, expected 1"):
        reward_model(make_inputs(["x"]), path=path)
