"""The training-side forward passes: the policy's log-probs and entropies of the response tokens, and the critic's
values, on packed rows (``row_tokens``; ``vapo_pl.packing``) or padded ones (``None``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from vapo_pl.algorithms.logprob import _ChunkedLogProbs, entropy_from_logits
from vapo_pl.batch import RolloutBatch
from vapo_pl.common import _fp32_linear_forward, fp32_forward
from vapo_pl.critic import logprob_state_features
from vapo_pl.packing import Packed, block_causal_mask, pack, segment_lengths, to_device


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counted from each row's first real token (left padding gets 0), as vLLM numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ResponseIndex:
    """Where a forward's outputs meet the response tokens, built on the host from the batch's lengths.

    ``hidden``: flat positions in the model's ``(rows x columns)`` output whose hidden state predicts a response token
    (the column before it); ``target``: that token's id; ``grid``: its flat position in the ``(B, T)`` response
    layout. Only real response tokens are listed: prompt positions and padding never reach the output head."""

    hidden: Tensor  # (N,) long
    target: Tensor  # (N,) long
    grid: Tensor  # (N,) long
    shape: tuple[int, int]  # (B, T)

    @classmethod
    def build(cls, first: Tensor, response_lens: Sequence[int], width: int, ids: Tensor) -> ResponseIndex:
        """``first``: (B,) CPU flat position of the column predicting each sequence's response token 0; ``ids``: the
        forward's input ids (any shape), whose flattened entry after a position is the token it predicts."""
        b, n = len(response_lens), sum(response_lens)
        response_lens = torch.tensor(list(response_lens), dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(b), response_lens)  # (N,) the sequence of each token
        offsets = torch.cumsum(response_lens, 0) - response_lens
        t = torch.arange(n) - offsets[seq]  # (N,) index within its response
        hidden = to_device(first[seq] + t, ids.device)
        grid = to_device(seq * width + t, ids.device)
        return cls(hidden=hidden, target=ids.flatten()[hidden + 1], grid=grid, shape=(b, width))

    def to_grid(self, flat: Tensor) -> Tensor:
        """(N,) per-token values -> (B, T), 0 at padding (differentiable)."""
        out = flat.new_zeros(self.shape[0] * self.shape[1])
        return out.index_put((self.grid,), flat).view(self.shape)


def policy_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float, chunk_size: int,
                    row_tokens: int | None, with_entropy: bool = False, checkpoint_head: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs of the response tokens under ``model`` at the sampler's temperature (0 at padding).

    The output head runs only at the positions that predict response tokens (``ResponseIndex``): no logits exist for
    prompt tokens or padding. ``checkpoint_head``: with gradient, compute the head ``chunk_size`` tokens at a time
    and recompute each chunk's logits in backward, so at most a chunk's logits are alive instead of all of them."""
    if row_tokens is not None:
        groups = row_groups(batch, row_tokens, varlen=uses_varlen_attention(model))
        if len(groups) > 1:
            parts = [policy_logprobs(model, sub, temperature, chunk_size, capacity, with_entropy, checkpoint_head)
                     for sub, _, capacity in groups]
            rows = [r for _, r, _ in groups]
            return (_assemble(rows, [lp for lp, _ in parts], len(batch)),
                    _assemble(rows, [e for _, e in parts], len(batch)) if with_entropy else None)
        row_tokens = groups[0][2]
    layout = batch.layout
    width = batch.response_mask.shape[1]
    if row_tokens is not None:
        packed = pack_batch(batch, row_tokens)
        columns = packed.input_ids.shape[1]
        row_host, start_host = packed.host_placement
        first = row_host * columns + start_host + torch.tensor(list(layout.prompt_lens), dtype=torch.long) - 1
        index = ResponseIndex.build(first, layout.response_lens, width, packed.input_ids)
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                  **attention_inputs(model, packed)}
    else:
        prompt_width = batch.prompt_width
        first = torch.arange(len(batch)) * batch.input_ids.shape[1] + prompt_width - 1
        index = ResponseIndex.build(first, layout.response_lens, width, batch.input_ids)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "position_ids": position_ids(batch.attention_mask)}
    head = ResponseHead(index, temperature, chunk_size, with_entropy, checkpoint_head)
    with head.installed(model):
        out = model(**inputs, use_cache=False)
    # the model's output, not head.logp itself: ZeRO-3 and FSDP2 hook it (same values) for their backward
    if out.logits.shape != head.logp.shape:
        raise RuntimeError(f"{type(model).__name__} reshapes its logits after the output head; the response-only "
                           "head cannot be used with it")
    logp = index.to_grid(out.logits)
    ent = index.to_grid(head.entropy) if with_entropy else None
    return logp, ent


def _config(model: nn.Module):
    return getattr(getattr(model, "backbone", model), "config", None)


def attention_inputs(model: nn.Module, packed: Packed) -> dict:
    """The attention arguments of a packed forward, prepared from the host placement so that transformers does not
    detect the packing itself (``find_packed_sequence_indices`` reads a device tensor back: one host sync per
    forward). SDPA: a block-diagonal causal mask over each row (``block_causal_mask``), or none for rows that each
    hold one sequence without padding (plain causal attention). flash-attention: no mask and the varlen lengths
    (``cu_seq_lens_*``, ``max_length_*``). Models with other layer types (sliding windows) or other kernels get
    position ids only, as before."""
    config = _config(model)
    impl = getattr(config, "_attn_implementation", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if set(layer_types) != {"full_attention"} or impl not in ("sdpa", "flash_attention_2"):
        return {}
    spans = segment_lengths(packed)
    if impl == "sdpa":
        solo = all(len(row) == 1 for row in spans)
        return {"attention_mask": {"full_attention": None if solo else block_causal_mask(packed)}}
    lens = [n for row in spans for n in row]
    cu = to_device(torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32), packed.input_ids.device)
    longest = max(lens)
    return {"attention_mask": {"full_attention": None}, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def uses_varlen_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a causal LM or a ``ValueModel``) attends with flash-attention, whose varlen kernel runs
    packed rows of any length without a mask."""
    return getattr(_config(model), "_attn_implementation", None) == "flash_attention_2"


def row_groups(batch: RolloutBatch, row_tokens: int, varlen: bool
               ) -> list[tuple[RolloutBatch, Tensor | None, int]]:
    """How a micro-batch is packed: ``(sequences, their rows in the batch on device or None for all, row length)``.

    With flash-attention's varlen kernel, one packing whose rows hold up to ``max(row_tokens, longest sequence)``
    tokens. Otherwise (SDPA, eager) transformers builds a (rows, L, L) mask for packed rows, so rows stay at
    ``row_tokens`` and every longer sequence is run alone with its exact length: one row with no padding and no
    restart needs no mask at all (causal attention, SDPA's flash kernel on GPU), and no memory grows with the square
    of a long sequence."""
    layout = batch.layout
    seq = [p + r for p, r in zip(layout.prompt_lens, layout.response_lens)]
    longest = max(seq, default=0)
    if varlen or longest <= row_tokens:
        return [(batch, None, max(row_tokens, longest) if varlen else row_tokens)]
    short = [i for i, n in enumerate(seq) if n <= row_tokens]
    parts = ([(short, row_tokens)] if short else []) + [([i], n) for i, n in enumerate(seq) if n > row_tokens]
    device = batch.input_ids.device
    out = []
    for rows, capacity in parts:
        index = to_device(torch.tensor(rows, dtype=torch.long), device)
        out.append((batch.select(index, rows), index, capacity))
    return out


def _assemble(rows: list[Tensor], parts: list[Tensor], n: int) -> Tensor:
    """(n, T, ...) from the groups' parts, each at its rows: one out-of-place index_put, so gradients reach every
    part."""
    part = torch.cat(parts)
    return part.new_zeros((n, *part.shape[1:])).index_put((torch.cat(rows),), part)


class ResponseHead:
    """Stands in for a causal LM's output head during one forward: the hidden states at ``index.hidden`` only, through
    the head's weights (in float32 when the head is kept in float32, ``keep_output_head_in_fp32``), to log-probs of
    ``index.target`` at ``temperature`` and, with ``with_entropy``, entropies. The forward returns the (N,) log-probs
    as its "logits", so the model's output stays connected to them (FSDP2 and ZeRO-3 hook the output for backward)."""

    def __init__(self, index: ResponseIndex, temperature: float, chunk_size: int, with_entropy: bool,
                 checkpoint: bool) -> None:
        self.index, self.temperature, self.chunk_size = index, temperature, chunk_size
        self.with_entropy, self.checkpoint = with_entropy, checkpoint
        self.logp: Tensor | None = None
        self.entropy: Tensor | None = None

    @contextmanager
    def installed(self, model: nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(model).__name__} has no nn.Linear output head (get_output_embeddings)")
        own = head.__dict__.get("forward")  # an instance-level forward (fp32_forward) or None
        head.forward = lambda x: self(head, x)
        try:
            yield
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own

    def _logits(self, head: nn.Linear, h: Tensor) -> Tensor:
        if getattr(head, "_vapo_fp32", False):
            return _fp32_linear_forward(head, h)
        return torch.nn.functional.linear(h, head.weight, head.bias)

    def _chunk(self, head: nn.Linear, h: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = self._logits(head, h)
        logp = _ChunkedLogProbs.apply(logits, target, float(self.temperature), self.chunk_size)
        if not self.with_entropy:
            return logp, logp.new_zeros(0)
        return logp, entropy_from_logits(logits.detach(), self.chunk_size, temperature=self.temperature)

    def __call__(self, head: nn.Linear, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1]).index_select(0, self.index.hidden)  # (N, H)
        target = self.index.target
        if self.checkpoint and torch.is_grad_enabled() and h.shape[0] > self.chunk_size:
            parts = [torch.utils.checkpoint.checkpoint(self._chunk, head, h[s : s + self.chunk_size],
                                                       target[s : s + self.chunk_size], use_reentrant=False)
                     for s in range(0, h.shape[0], self.chunk_size)]
            logp = torch.cat([p[0] for p in parts])
            entropy = torch.cat([p[1] for p in parts]) if self.with_entropy else None
        else:
            logp, entropy = self._chunk(head, h, target)
        self.logp = logp
        self.entropy = entropy.detach() if self.with_entropy else None
        return logp


def critic_values(critic: nn.Module, batch: RolloutBatch, row_tokens: int | None) -> Tensor:
    """(B, T) values V(s_t), s_t = prompt + response[:t], read at the last token of s_t (0 at padding)."""
    feats = None  # (B, T, 3), placed below where each state's value is read; only for a critic that reads them
    if getattr(critic, "uses_logprob_features", False):
        feats = logprob_state_features(batch.rollout_logprobs, batch.response_mask)
    if row_tokens is not None:
        groups = row_groups(batch, row_tokens, varlen=uses_varlen_attention(critic))
        if len(groups) > 1:
            return _assemble([r for _, r, _ in groups], [critic_values(critic, sub, cap) for sub, _, cap in groups],
                             len(batch))
        packed = pack_batch(batch, groups[0][2])
        extra = {} if feats is None else {"logprob_features": packed.scatter(feats)}
        attn = attention_inputs(critic, packed)
        return packed.gather(critic(packed.input_ids, attn.pop("attention_mask", None), packed.position_ids,
                                    **extra, **attn))
    width = batch.response_mask.shape[1]
    start = batch.prompt_width - 1  # the value of s_t is read at column start + t
    extra = {} if feats is None else {"logprob_features": torch.nn.functional.pad(
        feats, (0, 0, start, batch.input_ids.shape[1] - start - width))}
    values = critic(batch.input_ids, batch.attention_mask, position_ids(batch.attention_mask), **extra)
    return values[:, start : start + width]

def pack_batch(batch: RolloutBatch, row_tokens: int) -> Packed:
    # Pad slots hold token 0: they come after every real token of their row, so causal attention keeps them
    # out of every output that is read.
    layout = batch.layout
    return pack(batch.input_ids, batch.attention_mask, batch.token_mask, row_tokens, pad_id=0,
                prompt_lens=layout.prompt_lens, response_lens=layout.response_lens)


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
