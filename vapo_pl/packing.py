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
from collections.abc import Sequence
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
    host_row: tuple[int, ...] = ()  # (B,) ``row``, on the host
    host_start: tuple[int, ...] = ()  # (B,) each sequence's first column in its row
    host_seq_lens: tuple[int, ...] = ()  # (B,) each sequence's length in tokens

    @property
    def host_placement(self) -> tuple[Tensor, Tensor]:
        """(row, start) of each sequence as CPU tensors: where it was placed, known without reading the device."""
        return torch.tensor(self.host_row, dtype=torch.long), torch.tensor(self.host_start, dtype=torch.long)

    def scatter(self, per_token: Tensor) -> Tensor:
        """(B, T, ...) -> (R, L, ...): the inverse of ``gather`` for real response tokens; zero elsewhere."""
        r, length = self.input_ids.shape
        dump = r * length  # padding entries land in one extra slot, dropped at the end (no boolean indexing)
        dest = torch.where(self.response_mask, self.row.unsqueeze(1) * length + self.read_col, dump)
        out = per_token.new_zeros((dump + 1, *per_token.shape[2:]))
        out[dest.flatten()] = per_token.flatten(0, 1)
        return out[:dump].view(r, length, *per_token.shape[2:])

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


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without waiting for the accelerator: pinned, then copied asynchronously."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def pack(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, row_tokens: int, pad_id: int,
         prompt_lens: Sequence[int] | None = None, response_lens: Sequence[int] | None = None) -> Packed:
    """Pack the real tokens of a ``(B, P + T)`` batch (left-padded prompts, right-padded responses).

    ``prompt_lens``, ``response_lens``: each sequence's lengths (``RolloutBatch.layout``); with them,
    packing reads nothing back from the accelerator (rows are placed on the host from the lengths, and tokens move
    by a scatter, not by boolean indexing). Without them the lengths are read from the masks."""
    b, width = input_ids.shape
    t = response_mask.shape[1]
    device = input_ids.device
    real = attention_mask.bool()
    if prompt_lens is None or response_lens is None:
        prompt_lens = real[:, : width - t].sum(1).tolist()
        response_lens = response_mask.sum(1).tolist()
    seq_lens = [p + r for p, r in zip(prompt_lens, response_lens)]
    row_l, start_l, n_rows = place(seq_lens, row_tokens)
    length = max(row_tokens, max(seq_lens)) if b else row_tokens
    row = to_device(torch.tensor(row_l, dtype=torch.long), device)
    start = to_device(torch.tensor(start_l, dtype=torch.long), device)
    prompt_len = to_device(torch.tensor(list(prompt_lens), dtype=torch.long), device)
    dump = n_rows * length  # one extra slot that receives every padding token, then is dropped
    rank = real.long().cumsum(1) - 1  # position of each real token within its sequence
    dest = torch.where(real, (row * length + start).unsqueeze(1) + rank, dump)  # (B, W) flat destination
    ids = torch.full((dump + 1,), pad_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(dump + 1, dtype=torch.long, device=device)
    ids.scatter_(0, dest.flatten(), input_ids.flatten())
    pos.scatter_(0, dest.flatten(), rank.clamp(min=0).flatten())
    read = (start + prompt_len - 1).unsqueeze(1) + torch.arange(t, device=device)
    return Packed(input_ids=ids[:dump].view(n_rows, length), position_ids=pos[:dump].view(n_rows, length), row=row,
                  read_col=read.clamp(max=length - 1), response_mask=response_mask.bool(), host_row=tuple(row_l),
                  host_start=tuple(start_l), host_seq_lens=tuple(seq_lens))


def segment_lengths(packed: Packed) -> list[list[int]]:
    """Per row, the lengths of the spans its columns fall into, in order: each sequence, then the trailing padding
    as one span (from the host placement; nothing is read from the device)."""
    rows, length = packed.input_ids.shape
    spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for r, st, n in zip(packed.host_row, packed.host_start, packed.host_seq_lens):
        spans[r].append((st, n))
    out = []
    for row in spans:
        row.sort()
        lens = [n for _, n in row]
        if sum(lens) < length:
            lens.append(length - sum(lens))
        out.append(lens)
    return out


def block_causal_mask(packed: Packed) -> Tensor:
    """(R, 1, L, L) bool, True where a column may attend: causal within each sequence of its row, as transformers
    builds it for SDPA from restarting position ids, but from the placement instead of by reading the positions back
    (its packed-sequence detection ends in a host sync on every forward)."""
    pos = packed.position_ids
    seg = (pos == 0).long().cumsum(-1)  # (R, L): sequence number within the row (each padding slot its own)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    length = pos.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pos.device).tril()
    return (same & causal).unsqueeze(1)


def packed_targets(packed: Packed) -> Tensor:
    """(R, L) the token each column's output predicts (the next column's id; the last column predicts nothing
    and gets its own id, never read)."""
    ids = packed.input_ids
    return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
