"""PPO-ptx language-modelling data: the rows of ``data.ptx_files`` tokenised, and each step's batch of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from vapo_pl.common import derive_seed
from vapo_pl.prompts import render_prompt

if TYPE_CHECKING:
    from vapo_pl.datamodule import RolloutDataModule


def load_ptx(dm: RolloutDataModule) -> tuple[list[list[int]], list[int]]:
    """Tokenise the PPO-ptx rows: ``text`` rows train on every token, ``prompt`` + ``response`` rows on the
    response (its prompt rendered like a rollout's), each ending with EOS, cut to ``ptx_max_length``. Returns the
    token ids and, for each sequence, the first token the loss covers."""
    from vapo_pl.prompts import DataError, _read_rows

    ids_out: list[list[int]] = []
    starts: list[int] = []
    tok = dm.load_tokenizer()
    eos = tok.eos_token_id
    for p in [dm.ptx_files] if isinstance(dm.ptx_files, str) else dm.ptx_files:
        if not Path(p).exists():
            raise DataError(f"data.ptx_files: {p} does not exist")
        for loc, row in _read_rows(Path(p)):
            if isinstance(row.get("text"), str) and row["text"].strip():
                head, body = [], tok(row["text"], add_special_tokens=False)["input_ids"]
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                rendered = render_prompt(tok, row["prompt"], dm.template)
                head = tok(rendered, add_special_tokens=dm.template != "chat")["input_ids"]
                body = tok(row["response"], add_special_tokens=False)["input_ids"]
            else:
                raise DataError(f"{loc}: a PPO-ptx row needs a non-empty 'text', or 'prompt' and 'response'")
            ids = (head + body + ([eos] if eos is not None else []))[: dm.ptx_max_length]
            if len(ids) - max(len(head), 1) < 1:
                continue  # nothing left to train on after the cut
            ids_out.append(ids)
            starts.append(max(len(head), 1))
    if len(ids_out) < dm.ptx_batch_size:
        raise DataError(f"data.ptx_files: {len(ids_out)} usable sequences, fewer than "
                        f"data.ptx_batch_size={dm.ptx_batch_size}")
    return ids_out, starts


def next_ptx_batch(dm: RolloutDataModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """This rank's share of the next PPO-ptx batch: right-padded ``(ids, attention_mask, loss_mask)``, where
    ``loss_mask[:, t]`` marks the tokens whose log-prob is trained (predicted from position ``t - 1``). The
    order is a seeded permutation per pass over the data; the position is checkpointed."""
    if not dm.ptx_ids:
        return None
    world = dm.world_size
    if dm.ptx_batch_size % world:
        raise ValueError(f"data.ptx_batch_size={dm.ptx_batch_size} is not divisible by the {world} ranks")
    per_pass = len(dm.ptx_ids) - len(dm.ptx_ids) % dm.ptx_batch_size
    if dm.ptx_cursor + dm.ptx_batch_size > per_pass:
        dm.ptx_epoch, dm.ptx_cursor = dm.ptx_epoch + 1, 0
    g = torch.Generator().manual_seed(derive_seed(dm.seed, 0x9771, dm.ptx_epoch))
    order = torch.randperm(len(dm.ptx_ids), generator=g).tolist()
    chosen = order[dm.ptx_cursor : dm.ptx_cursor + dm.ptx_batch_size][dm.rank :: world]
    dm.ptx_cursor += dm.ptx_batch_size
    seqs = [torch.tensor(dm.ptx_ids[i]) for i in chosen]
    ids = pad_sequence(seqs, batch_first=True, padding_value=dm._pad_id())
    lengths = torch.tensor([len(s) for s in seqs])
    cols = torch.arange(ids.shape[1])[None, :]
    attention = (cols < lengths[:, None]).long()
    loss_mask = (cols >= torch.tensor([dm.ptx_loss_start[i] for i in chosen])[:, None]) & attention.bool()
    return ids, attention, loss_mask
