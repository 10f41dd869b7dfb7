"""The value model: a transformer backbone plus a scalar head, and optionally a small head on the sampler's
log-probs of the tokens already written (``logprob_state_features``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from vapo_pl.common import fp32_forward
from vapo_pl.parallel import gathered_for_init

LOGPROB_FEATURES = 3  # per state: running minimum, running mean and last of the written tokens' log-probs
_LOGPROB_FLOOR = -20.0  # log-probs are clamped here (a token sampled at e^-20 is as telling as one at e^-40)
_LOGPROB_SCALE = 5.0  # ... and divided by this, so the features lie in [-4, 0]


def logprob_state_features(logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """(B, T) log-probs of the sampled response tokens -> (B, T, 3) features of the states ``s_t`` (the prompt and
    ``response[:t]``): the running minimum, the running mean and the last of the log-probs of tokens ``< t``
    (all 0 at ``t = 0``), clamped to [-20, 0] and divided by 5. ``s_t`` never sees the log-prob of token ``t``
    itself, so the value of a state does not depend on the action taken in it. Padding positions get 0.

    Why: a slip (a token the policy itself found unlikely) shows in these numbers where it is written, even where
    a critic cannot check the content; ``benchmarks/critic_fit.py --logprob-features`` measures what it adds."""
    mask = response_mask.bool()
    lp = logprobs.float().clamp(min=_LOGPROB_FLOOR, max=0.0).masked_fill(~mask, 0.0)
    prev = torch.nn.functional.pad(lp[:, :-1], (1, 0))  # (B, T): log-prob of token t - 1, 0 at t = 0
    run_min = torch.cummin(prev, dim=1).values
    steps = torch.arange(lp.shape[1], device=lp.device, dtype=lp.dtype).clamp(min=1)
    run_mean = prev.cumsum(1) / steps
    feats = torch.stack([run_min, run_mean, prev], dim=-1) / _LOGPROB_SCALE
    return feats.masked_fill(~mask.unsqueeze(-1), 0.0)


class ValueModel(nn.Module):
    """``V(s_t)`` for every position: backbone hidden states through a ``Linear(hidden, 1)`` head, plus, with
    ``logprob_head``, a small MLP of the state's log-prob features (``logprob_state_features``) added to it."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, logprob_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = fp32_forward(head)  # values in float32 under bf16 autocast too
        self.logprob_head = logprob_head

    @property
    def uses_logprob_features(self) -> bool:
        return self.logprob_head is not None

    @staticmethod
    def new_logprob_head(seed: int, hidden: int = 32) -> nn.Module:
        """``Linear(3, hidden) -> tanh -> Linear(hidden, 1)`` in float32, drawn from ``seed`` alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            first, last = nn.Linear(LOGPROB_FEATURES, hidden), nn.Linear(hidden, 1)
        return nn.Sequential(fp32_forward(first), nn.Tanh(), fp32_forward(last))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        init: Literal["base", "reward_model"] = "base",
        torch_dtype: torch.dtype | None = None,
        head_init: Literal["zero", "random"] = "random",
        seed: int = 0,
        logprob_features: bool = False,
        empty: bool = False,
        attn_implementation: str | None = None,
    ) -> ValueModel:
        """``init="base"``: a causal-LM (or bare) checkpoint's backbone with a new head: ``nn.Linear``'s uniform
        init (``head_init="random"``) or zeros (``"zero"``: the first values are 0, but the backbone gets no
        gradient until the head has grown; on the demo task that critic learned 10x slower, see
        docs/decisions.md). ``init="reward_model"``: a sequence-classification checkpoint (``num_labels=1``),
        whose score head becomes the value head (the paper's vanilla PPO setting); ``head_init`` does not
        apply. The random head is drawn from ``seed`` alone (a forked RNG), so it is the same on every rank
        and in every run with that seed. ``logprob_features`` adds the log-prob head (``new_logprob_head``, drawn
        from ``seed + 1``); ``forward`` then needs the features.

        ``empty``: the checkpoint's weights are not read; they stay on the meta device with a ``CheckpointSource``
        each, for ``vapo_pl.loading.materialize`` to fill after sharding (FSDP2). The new heads are real either way.
        ``attn_implementation``: passed to transformers (``sdpa``, ``flash_attention_2``, ``eager``)."""
        from transformers import AutoModel, AutoModelForSequenceClassification

        from vapo_pl.loading import SOURCE_ATTR, CheckpointSource, empty_from_pretrained, parameters_on_meta

        extra = cls.new_logprob_head(seed + 1) if logprob_features else None
        attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}

        if init == "reward_model":
            if empty:
                rm = empty_from_pretrained(AutoModelForSequenceClassification, path, torch_dtype, num_labels=1, **attn)
            else:
                rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype, **attn)
            backbone = getattr(rm, rm.base_model_prefix)
            head = rm.score
            if empty:
                prefix = f"{rm.base_model_prefix}."
                setattr(backbone, SOURCE_ATTR, CheckpointSource(Path(path), ("", prefix)))
                if head.bias is None:
                    with parameters_on_meta():
                        head = nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
                setattr(head, SOURCE_ATTR, CheckpointSource(Path(path), renames={
                    "weight": "score.weight", "bias": "score.bias" if rm.score.bias is not None else None}))
                return cls(backbone, head, extra)
            if head.bias is None:
                new = nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
                with gathered_for_init(head), gathered_for_init(new), torch.no_grad():
                    new.weight.copy_(head.weight)
                    new.bias.zero_()
                head = new
            return cls(backbone, head, extra)
        if init != "base":
            raise ValueError(f"critic init must be 'base' or 'reward_model', got {init!r}")
        if head_init not in ("zero", "random"):
            raise ValueError(f"critic head_init must be 'zero' or 'random', got {head_init!r}")
        if empty:
            backbone = empty_from_pretrained(AutoModel, path, torch_dtype, **attn)
        else:
            backbone = AutoModel.from_pretrained(path, dtype=torch_dtype, **attn)
        head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
        with gathered_for_init(head):  # ZeRO-3 partitions parameters as they are created
            if head_init == "zero":
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    head.reset_parameters()
        return cls(backbone, head, extra)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | dict | None, position_ids: Tensor | None = None,
                logprob_features: Tensor | None = None, **attention_kwargs) -> Tensor:
        """(B, L) ids -> (B, L) values (float32). ``logprob_features``: (B, L, 3), each position's state features
        (``logprob_state_features``, placed where that state's value is read); required with a log-prob head.
        ``attention_mask`` may be a prepared mask mapping and ``attention_kwargs`` flash-attention's varlen lengths
        (``vapo_pl.forward.attention_inputs``); both go to the backbone."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **attention_kwargs,
        ).last_hidden_state
        values = self.value_head(hidden).squeeze(-1).float()
        if self.logprob_head is not None:
            if logprob_features is None:
                raise ValueError("this critic has a log-prob head (model.critic_logprob_features): pass the features")
            values = values + self.logprob_head(logprob_features.float()).squeeze(-1)
        # Not a view of the head's output: FSDP2 hooks a sharded module's output for its backward, and an in-place op
        # by a caller on a view would skip that hook (FSDP2 warns about it at every forward).
        return values.clone() if values._is_view() else values

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()
