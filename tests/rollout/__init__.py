"""Helpers shared by the rollout-engine tests: the trainer-side references the engines must agree with."""

from __future__ import annotations

import torch

# Token ids of the tiny character tokenizer (0 = <pad>, 1 = <eos>); lengths differ so batches get padded.
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44, 45, 46], [20, 21], [60, 3, 61, 3, 62]]
EOS = 1


def load_hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def perturb_(model, scale: float = 0.5, seed: int = 0) -> None:
    """Add Gaussian noise of ``scale`` times each tensor's std to every weight, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy decoding of one unpadded prompt, cut after the first EOS."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=EOS,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def reference_logprobs(
    model, prompt: list[int], response: list[int], temperature: float, top_k: int = -1
) -> torch.Tensor:
    """The trainer's view: one forward pass over prompt + response, ``log_softmax(logits / T)`` at the
    response tokens (after keeping only the ``top_k`` largest logits when ``top_k > 0``).  # (L,)
    """
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature  # (L, V)
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (L, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
