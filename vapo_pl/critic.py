"""The value model: a transformer backbone plus a scalar head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vapo_pl.common import fp32_forward
from vapo_pl.parallel import gathered_for_init


class ValueModel(nn.Module):
    """``V(s_t)`` for every position: backbone hidden states through a ``Linear(hidden, 1)`` head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = fp32_forward(head)  # values in float32 under bf16 autocast too

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        init: Literal["base", "reward_model"] = "base",
        torch_dtype: torch.dtype | None = None,
        head_init: Literal["zero", "random"] = "random",
        seed: int = 0,
    ) -> ValueModel:
        """``init="base"``: a causal-LM (or bare) checkpoint's backbone with a new head: ``nn.Linear``'s uniform
        init (``head_init="random"``) or zeros (``"zero"``: the first values are 0, but the backbone gets no
        gradient until the head has grown; on the demo task that critic learned 10x slower, see
        docs/decisions.md). ``init="reward_model"``: a sequence-classification checkpoint (``num_labels=1``),
        whose score head becomes the value head (the paper's vanilla PPO setting); ``head_init`` does not
        apply. The random head is drawn from ``seed`` alone (a forked RNG), so it is the same on every rank
        and in every run with that seed."""
        from transformers import AutoModel, AutoModelForSequenceClassification

        if init == "reward_model":
            rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype)
            backbone = getattr(rm, rm.base_model_prefix)
            head = rm.score
            if head.bias is None:
                new = nn.Linear(head.in_features, 1, bias=True, dtype=head.weight.dtype)
                with gathered_for_init(head), gathered_for_init(new), torch.no_grad():
                    new.weight.copy_(head.weight)
                    new.bias.zero_()
                head = new
            return cls(backbone, head)
        if init != "base":
            raise ValueError(f"critic init must be 'base' or 'reward_model', got {init!r}")
        if head_init not in ("zero", "random"):
            raise ValueError(f"critic head_init must be 'zero' or 'random', got {head_init!r}")
        backbone = AutoModel.from_pretrained(path, dtype=torch_dtype)
        head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
        with gathered_for_init(head):  # ZeRO-3 partitions parameters as they are created
            if head_init == "zero":
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    head.reset_parameters()
        return cls(backbone, head)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """(B, L) ids -> (B, L) values (float32)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()
