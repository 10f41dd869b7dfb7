"""Held-out accuracy of a demo policy with transformers ``generate``, graded by the ``math_verify`` reward.

Separate from ``base_policy`` so that changing how the base is measured does not change the cache
key of how it is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vapo_pl.demo import task
from vapo_pl.demo.base_policy import prompt_ids
from vapo_pl.demo.task import Problem


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 400,
) -> list[list[str]]:
    """``n`` responses per prompt (temperature 0: greedy, ``n`` must be 1); pure sampling, no top-k/top-p."""
    from transformers import GenerationConfig

    if temperature == 0 and n != 1:
        raise ValueError(f"greedy decoding gives one response per prompt, got n={n}")
    sampled = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_k=0 if sampled else None,  # transformers would otherwise default to top-k 50
        top_p=1.0 if sampled else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    out: list[str] = []
    for i in range(0, len(flat), batch_size):
        chunk = [prompt_ids(tokenizer, p) for p in flat[i : i + batch_size]]
        t = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (t - len(c)) + c for c in chunk])  # (B, t) left-padded
        gen = model.generate(
            input_ids=ids, attention_mask=ids.ne(tokenizer.pad_token_id), generation_config=config
        )
        out += tokenizer.batch_decode(gen[:, t:], skip_special_tokens=True)
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def grade(responses: list[str], answers: list[str]) -> torch.Tensor:
    """(B,) bool: ``math_verify`` correctness, computed as the trainer's reward computes it."""
    from vapo_pl.rewards import RewardInput, resolve_reward_fn

    b = len(responses)
    inputs = RewardInput(
        prompts=[""] * b,
        responses=responses,
        answers=answers,
        group_index=torch.arange(b),
        lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
        truncated=torch.zeros(b, dtype=torch.bool),
        max_response_length=max(1, max((len(r) for r in responses), default=1)),
    )
    return resolve_reward_fn("math_verify")(inputs).correct


def evaluate_policy(
    path: str | Path,
    problems: list[Problem] | None = None,
    *,
    k: int = 8,
    seed: int = 0,
    max_new_tokens: int = 96,
) -> dict:
    """Accuracy of the model at ``path`` on ``problems`` (default: the held-out split).

    Responses are cut at ``max_new_tokens`` (a solution needs at most 75 with its EOS).

    Returns greedy accuracy; ``mean@4`` and ``mean@k`` (mean accuracy of the first 4 and of all ``k``
    samples at temperature 1); ``pass@k``; the same by number of carries; and the sampled responses'
    lengths in characters (= tokens, EOS excluded).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if k < 4:
        raise ValueError(f"k must be >= 4 (mean@4 is reported), got {k}")
    problems = task.read_split(task.HELDOUT_FILE) if problems is None else problems
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, answers = [p.prompt for p in problems], [p.answer for p in problems]
    greedy = [
        r[0]
        for r in sample_responses(
            model, tokenizer, prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens
        )
    ]
    sampled = sample_responses(
        model, tokenizer, prompts, n=k, temperature=1.0, seed=seed, max_new_tokens=max_new_tokens
    )
    ok_greedy = grade(greedy, answers).float()  # (P,)
    ok = (
        grade([r for rs in sampled for r in rs], [a for a in answers for _ in range(k)]).view(-1, k).float()
    )  # (P, k)
    carries = torch.tensor([len(p.carries) for p in problems])
    lengths = torch.tensor([len(r) for rs in sampled for r in rs], dtype=torch.float)
    by = {int(c): carries == c for c in carries.unique()}
    return {
        "greedy": ok_greedy.mean().item(),
        "mean@4": ok[:, :4].mean().item(),
        f"mean@{k}": ok.mean().item(),
        f"pass@{k}": ok.amax(1).mean().item(),
        "by_carries": {
            c: {
                "problems": int(m.sum()),
                "greedy": ok_greedy[m].mean().item(),
                f"mean@{k}": ok[m].mean().item(),
                f"pass@{k}": ok[m].amax(1).mean().item(),
            }
            for c, m in by.items()
        },
        "response_chars": {
            "mean": lengths.mean().item(),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        },
    }
