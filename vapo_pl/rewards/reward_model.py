"""``reward_model``: a learned scalar reward from a Hugging Face sequence-classification checkpoint.

The model (e.g. a ``Qwen2ForSequenceClassification`` with ``num_labels=1`` trained with the
Bradley-Terry loss ``-log sigmoid(r_w - r_l)``) reads the conversation and its single logit at the last
non-padding token is the score. The conversation is rendered with the reward model's own chat template
(user: the raw question, assistant: the response) when its tokenizer has one, as it was trained; otherwise
it is the prompt exactly as the policy saw it followed by the response. It is loaded once per (path, device, dtype) and kept.
Over-long texts are cut from the left so the end of the response, where the answer is, stays.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from vapo_pl.rewards.base import REWARD_FUNCTIONS, RewardInput, RewardOutput
from vapo_pl.rewards.correctness import check_positive_int

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=4)
def load_reward_model(path: str, device: str, dtype: str):
    """(model, tokenizer) for ``path``; cached, so a training run loads the checkpoint once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"reward_model path {path!r} is not a directory with a saved checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"reward_model path {path!r} could not be loaded: {first_line}") from None
    if model.config.num_labels != 1:
        raise ValueError(f"reward_model at {path!r} has num_labels={model.config.num_labels}, expected 1")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the model finds the last real token by it
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return model.to(device).eval(), tokenizer


def conversation_texts(inputs: RewardInput, tokenizer) -> list[str]:
    """What the reward model reads for each sample: its chat template over (question, response) if it has one,
    else the policy's rendered prompt followed by the response."""
    from vapo_pl.prompts import render_conversation

    if getattr(tokenizer, "chat_template", None):
        return [render_conversation(tokenizer, q, r) for q, r in zip(inputs.prompts, inputs.responses)]
    return [p + r for p, r in zip(inputs.rendered_prompts, inputs.responses)]


@REWARD_FUNCTIONS.register("reward_model")
def reward_model(
    inputs: RewardInput,
    *,
    path: str,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | None = None,
    dtype: str = "float32",
) -> RewardOutput:
    """The reward model's scalar score of each conversation (see ``conversation_texts``).

    Args:
        inputs: the batch; uses ``prompts`` (or ``rendered_prompts``) and ``responses``.
        path: directory of a ``save_pretrained`` sequence-classification checkpoint and tokenizer.
        batch_size: texts per forward pass.
        max_length: tokens per text; longer texts keep their last ``max_length`` tokens.
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: "float32", "bfloat16" or "float16".

    Returns:
        scores (B,) float32; stat ``reward_model/score_mean``.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"reward_model needs path= (a checkpoint directory), got {path!r}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_length", max_length)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_reward_model(os.path.abspath(path), device, dtype)
    texts = conversation_texts(inputs, tokenizer)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            scores.append(model(**enc).logits[:, 0].float().cpu())  # (b,)
    out = torch.cat(scores) if scores else torch.zeros(0)
    return RewardOutput(scores=out, stats={"reward_model/score_mean": out.mean().item() if len(out) else 0.0})
