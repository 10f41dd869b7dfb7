"""Padding-free forward passes: a batch's sequences packed into rows of at most ``row_tokens`` tokens.

A rollout batch is stored as ``(B, P + T)``: left-padded prompts, right-padded responses. Run as is, every row
costs the batch's longest prompt + response, and on the demo and benchmark workloads about 40% of the matmul work
is padding. ``pack`` moves each sequence's real tokens into rows (best-fit decreasing by length), with position
ids restarting at 0 per sequence. Given ``position_ids`` and no attention mask, transformers builds a
block-diagonal causal mask from the restarts (SDPA and eager; flash-attention's varlen kernel on GPU), so no token
attends across sequences and each sequence sees exactly the positions it had padded.

Outputs come back to the ``(B, T)`` response layout through one index: response token ``t`` of sequence ``b`` is
predicted at packed column ``start[b] + prompt_len[b] - 1 + t`` of row ``row[b]``, which is also where the value
of the state before that token is read. Everything here is tensor indexing; the only Python loop is over
sequences (placing them into rows), never over tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Packed:
    """A batch packed into rows, and the map back to the ``(B, T)`` response layout."""

    input_ids: Tensor  # (R, L) token ids; slots after a row's last sequence hold pad ids
    position_ids: Tensor  # (R, L) positions restarting at 0 for every sequence
    row: Tensor  # (B,) the row of each sequence
    read_col: Tensor  # (B, T) column whose output predicts response token t (clamped into the row)
    response_mask: Tensor  # (B, T) bool, real response tokens

    def scatter(self, per_token: Tensor) -> Tensor:
        """(B, T, ...) -> (R, L, ...): the inverse of ``gather`` for real response tokens; zero elsewhere."""
        r, length = self.input_ids.shape
        out = per_token.new_zeros((r, length, *per_token.shape[2:]))
        rows = self.row.unsqueeze(1).expand_as(self.read_col)
        out[rows[self.response_mask], self.read_col[self.response_mask]] = per_token[self.response_mask]
        return out

    def gather(self, per_position: Tensor) -> Tensor:
        """(R, L, ...) -> (B, T, ...): each response token's entry; zero where the response is padding."""
        out = per_position[self.row.unsqueeze(1), self.read_col]
        mask = self.response_mask.view(*self.response_mask.shape, *([1] * (out.dim() - 2)))
        return out.masked_fill(~mask, 0)


def place(lengths: list[int], row_tokens: int) -> tuple[list[int], list[int], int]:
    """Best-fit decreasing: ``(row, start)`` per sequence and the number of rows. A sequence longer than
    ``row_tokens`` gets a row of its own (rows are as long as the longest of them)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    row, start = [0] * len(lengths), [0] * len(lengths)
    free: list[tuple[int, int]] = []  # (remaining capacity, row id), sorted
    used: list[int] = []  # tokens placed per row
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
            row[i], start[i] = r, used[r]
            used[r] += n
            if cap - n > 0:
                bisect.insort(free, (cap - n, r))
        else:
            r = len(used)
            row[i], start[i] = r, 0
            used.append(n)
            if row_tokens - n > 0:
                bisect.insort(free, (row_tokens - n, r))
    return row, start, len(used)


def pack(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, row_tokens: int, pad_id: int) -> Packed:
    """Pack the real tokens of a ``(B, P + T)`` batch (left-padded prompts, right-padded responses)."""
    b, width = input_ids.shape
    t = response_mask.shape[1]
    real = attention_mask.bool()
    seq_len = real.sum(1)
    prompt_len = real[:, : width - t].sum(1)
    row_l, start_l, n_rows = place(seq_len.tolist(), row_tokens)
    device = input_ids.device
    row = torch.tensor(row_l, device=device)
    start = torch.tensor(start_l, device=device)
    length = max(row_tokens, int(seq_len.max())) if b else row_tokens
    rank = real.long().cumsum(1) - 1  # position of each real token within its sequence
    dest = (row * length + start).unsqueeze(1) + rank  # (B, W) flat destination of each token
    ids = torch.full((n_rows * length,), pad_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(n_rows * length, dtype=torch.long, device=device)
    ids[dest[real]] = input_ids[real]
    pos[dest[real]] = rank[real]
    read = (start + prompt_len - 1).unsqueeze(1) + torch.arange(t, device=device)
    return Packed(input_ids=ids.view(n_rows, length), position_ids=pos.view(n_rows, length), row=row,
                  read_col=read.clamp(max=length - 1), response_mask=response_mask.bool())


def packed_targets(packed: Packed) -> Tensor:
    """(R, L) the token each column's output predicts (the next column's id; the last column predicts nothing
    and gets its own id, never read)."""
    ids = packed.input_ids
    return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
