"""Rollouts with transformers ``generate``: for machines without vLLM, and for debugging.

Same contract as ``VLLMEngine``:

- log-probs are "processed": ``log_softmax`` of the scores the sampler drew from (after temperature,
  top-k and top-p; masked tokens are ``-inf`` so the log-softmax renormalises over the kept ones),
  gathered at the sampled token — vLLM's ``logprobs_mode="processed_logprobs"``. Greedy calls return
  the log-probs of the unscaled distribution;
- ``finish_reason`` is ``"stop"`` when the response ends with an EOS token (included in ``token_ids``),
  ``"length"`` when ``max_tokens`` was reached first;
- a call with ``Sampling.seed`` set is reproducible on the same weights (and the same
  ``max_batch_size``); the seed is mixed with the replica index, and the trainer's global RNG is
  left untouched (the draw runs inside ``torch.random.fork_rng``).

The sampling settings are exactly the ``Sampling`` fields: the model's own ``generation_config``
(which may carry a repetition penalty, top-k 50, min-p ...) is swapped out for the duration of the
call, because ``generate`` fills every field left unset from it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from vapo_pl.common import derive_seed, require_model_dir
from vapo_pl.rollout.base import Completion, RolloutEngine, Sampling

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}


class HFEngine(RolloutEngine):
    """Left-padded batched ``model.generate`` over a shared or an owned causal LM.

    Args:
        model: either the trainer's actor module (shared: no copy, ``update_weights`` only bumps
            ``version`` — the engine already sees the new weights) or a ``save_pretrained`` directory
            (owned: loaded here, ``update_weights`` copies the trainer's state dict in).
        dtype: for an owned model, ``"auto"`` (from the config), ``"float32"`` or ``"bfloat16"``.
        device: for an owned model, where to put it (default CPU).
        seed: base seed; unseeded calls draw their call seed from an RNG seeded with ``seed + replica``.
        rank: global rank (default ``torch.distributed.get_rank()`` in a process group, else 0); every
            rank is its own replica.
        max_batch_size: rows (prompt x sample) per ``generate`` call; ``None`` puts all in one.
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        *,
        dtype: str = "auto",
        device: str | torch.device | None = None,
        seed: int = 0,
        rank: int | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if isinstance(model, nn.Module):
            self.model, self.shared = model, True
        else:
            from transformers import AutoModelForCausalLM

            path = require_model_dir(model, field="model")
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
            self.model, self.shared = loaded.to(device or "cpu").eval(), False

        import torch.distributed as dist

        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.replica = rank
        self._rng = random.Random(seed + rank)
        self.max_batch_size = max_batch_size
        self.version = 0
        # A shared actor sharded by FSDP2 (DTensor parameters) or ZeRO-3 gathers its weights inside every forward,
        # a collective: all ranks must run the same number of forwards. transformers' synced_gpus keeps decoding
        # on a rank whose rows have finished until every rank has; ``generate`` also evens out the calls.
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.lockstep = self.shared and world > 1 and any(
            hasattr(p, "ds_id") or type(p).__name__ == "DTensor" or hasattr(p, "device_mesh")
            for p in self.model.parameters())

        gen_cfg, cfg = self.model.generation_config, self.model.config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else cfg.eos_token_id
        if eos is None:
            raise ValueError("model: its config names no eos_token_id")
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else cfg.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        """Return, for every prompt (token ids), ``sampling.n`` completions."""
        if not prompt_token_ids:
            return []
        call_seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(62)
        # The n samples of a prompt are n adjacent rows of the batch: different draws of one stream.
        rows = [ids for ids in prompt_token_ids for _ in range(sampling.n)]
        step = self.max_batch_size or len(rows)
        device = next(self.model.parameters()).device
        rng_devices = [device] if device.type == "cuda" else []
        completions: list[Completion] = []
        starts = list(range(0, len(rows), step))
        calls = self.max_calls_across_ranks(len(starts))  # before any forward: it is a collective too
        with self._clean_generation_config(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(derive_seed(call_seed, self.replica))
            for i in range(calls):
                if i < len(starts):
                    completions += self._generate_rows(rows[starts[i] : starts[i] + step], sampling, device)
                else:  # as many chunks as the rank with the most, results dropped
                    self._generate_rows(rows[:1], sampling, device)
        n = sampling.n
        return [completions[i : i + n] for i in range(0, len(completions), n)]

    def max_calls_across_ranks(self, calls: int) -> int:
        """The most ``calls`` of any rank (ranks of a sharded actor must run as many forwards as each other)."""
        from vapo_pl.common import max_across_ranks

        return max_across_ranks(calls) if self.lockstep else calls

    def _generate_rows(
        self, rows: list[list[int]], sampling: Sampling, device: torch.device
    ) -> list[Completion]:
        from transformers import GenerationConfig

        prompts = [torch.tensor(ids, dtype=torch.long) for ids in rows]
        input_ids = pad_sequence(
            prompts, batch_first=True, padding_value=self.pad_token_id, padding_side="left"
        )
        lengths = torch.tensor([len(ids) for ids in rows])  # (N,)
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions >= input_ids.shape[1] - lengths[:, None]).long()  # (N, P) left pad = 0

        greedy = sampling.temperature == 0
        warpers = {}  # greedy leaves them unset: generate() fills in neutral defaults it then ignores
        if not greedy:
            warpers = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": max(sampling.top_k, 0),
            }
        config = GenerationConfig(
            do_sample=not greedy,
            **warpers,  # top_k 0 disables it in HF
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=0,
            repetition_penalty=1.0,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                synced_gpus=self.lockstep,
            )
        finally:
            self.model.train(was_training)

        response = out.sequences[:, input_ids.shape[1] :].cpu()  # (N, L)
        # One step at a time rather than stacking all L score tensors into (N, L, V): the stack would
        # double the memory generate() already holds for its scores.
        logprobs = torch.stack(
            [
                scores.float()
                .log_softmax(-1)
                .gather(1, response[:, t : t + 1].to(scores.device))
                .squeeze(1)
                .cpu()
                for t, scores in enumerate(out.scores)
            ],
            dim=1,
        )  # (N, L)
        is_eos = torch.isin(response, torch.tensor(self.eos_token_ids))  # (N, L)
        stopped = is_eos.any(dim=1)  # (N,)
        # Rows without EOS ran all L = max_tokens steps (generate stops early only when all rows stopped).
        length = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, response.shape[1])  # (N,)

        token_lists, logprob_lists = response.tolist(), logprobs.tolist()
        return [
            Completion(tokens[:k], lps[:k], "stop" if stop else "length")
            for tokens, lps, k, stop in zip(token_lists, logprob_lists, length.tolist(), stopped.tolist())
        ]

    def load_adapter(self, items: Iterable[tuple[str, Tensor]], peft_config: dict, version: int) -> None:
        """LoRA: a shared actor already carries its adapters; an owned model cannot take them (use merged sync)."""
        if not self.shared:
            raise ValueError("the hf engine takes LoRA adapters only when it shares the trainer's actor; set "
                             "model.lora.sync: merged")
        self.version += 1

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Owned model: copy the trainer's ``(hf_name, tensor)`` pairs in. Shared model: nothing to copy.

        A shared model's iterable is not consumed (the engine generates from the trainer's module).
        For tied embeddings ``lm_head.weight`` may be omitted.
        """
        if not self.shared:
            state = {name: t.detach() for name, t in weights}
            if not state:
                raise ValueError("weights: got no (name, tensor) pairs")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if getattr(self.model.config, "tie_word_embeddings", False):
                missing = [k for k in missing if k != "lm_head.weight"]
            if missing or unexpected:
                raise ValueError(f"weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.version += 1

    @contextmanager
    def _clean_generation_config(self) -> Iterator[None]:
        """Swap in a default ``GenerationConfig`` so unset fields cannot come from the checkpoint's."""
        from transformers import GenerationConfig

        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            yield
        finally:
            self.model.generation_config = saved
