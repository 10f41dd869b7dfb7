"""The training-side forward passes: the policy's log-probs and entropies of the response tokens, and the critic's
values, on packed rows (``row_tokens``; ``vapo_pl.packing``) or padded ones (``None``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vapo_pl.algorithms.logprob import entropy_from_logits, logprobs_from_logits
from vapo_pl.batch import RolloutBatch
from vapo_pl.common import fp32_forward
from vapo_pl.critic import logprob_state_features
from vapo_pl.packing import Packed, pack, packed_targets


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counted from each row's first real token (left padding gets 0), as vLLM numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float, chunk_size: int,
                    row_tokens: int | None, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs of the response tokens under ``model`` at the sampler's temperature (0 at padding)."""
    if row_tokens is not None:
        packed = pack_batch(batch, row_tokens)
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        logp = packed.gather(logprobs_from_logits(logits, packed_targets(packed), temperature,
                                                  chunk_size))
        ent = packed.gather(entropy_from_logits(logits.detach(), chunk_size,
                                                temperature=temperature)) if with_entropy else None
        return logp, ent
    width = batch.response_mask.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids(batch.attention_mask), use_cache=False, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]  # (B, T, V): position P-1+t predicts response token t
    logp = logprobs_from_logits(logits, batch.responses, temperature, chunk_size)
    ent = entropy_from_logits(logits.detach(), chunk_size, temperature=temperature) \
        if with_entropy else None
    return logp, ent

def critic_values(critic: nn.Module, batch: RolloutBatch, row_tokens: int | None) -> Tensor:
    """(B, T) values V(s_t), s_t = prompt + response[:t], read at the last token of s_t (0 at padding)."""
    feats = None  # (B, T, 3), placed below where each state's value is read; only for a critic that reads them
    if getattr(critic, "uses_logprob_features", False):
        feats = logprob_state_features(batch.rollout_logprobs, batch.response_mask)
    if row_tokens is not None:
        packed = pack_batch(batch, row_tokens)
        extra = {} if feats is None else {"logprob_features": packed.scatter(feats)}
        return packed.gather(critic(packed.input_ids, None, packed.position_ids, **extra))
    width = batch.response_mask.shape[1]
    start = batch.prompt_width - 1  # the value of s_t is read at column start + t
    extra = {} if feats is None else {"logprob_features": torch.nn.functional.pad(
        feats, (0, 0, start, batch.input_ids.shape[1] - start - width))}
    values = critic(batch.input_ids, batch.attention_mask, position_ids(batch.attention_mask), **extra)
    return values[:, start : start + width]

def pack_batch(batch: RolloutBatch, row_tokens: int) -> Packed:
    # Pad slots hold token 0: they come after every real token of their row, so causal attention keeps them
    # out of every output that is read.
    return pack(batch.input_ids, batch.attention_mask, batch.response_mask, row_tokens, pad_id=0)


def keep_output_head_in_fp32(model: nn.Module) -> None:
    """Compute ``model``'s output projection (the logits) in float32 even under bf16 autocast.

    With ``trainer.precision: bf16-mixed`` every matmul runs in bf16, and bf16 logits (3 significant digits) move
    log-probs by up to ~0.1 nat for logits around 10-30, which the PPO ratio ``exp(logp - old_logp)`` turns into
    10% noise. With the head in float32, log-probs (and so ratios, KL and entropy) come from float32 logits; the
    rest of the network stays in bf16.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        fp32_forward(head)
