"""The typed batch that flows from the rollout DataModule to the module."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class HostLayout:
    """Each sequence's prompt and response length as Python ints, read once where the batch is built (on the CPU),
    so that packing and the response-token index of a micro-batch read nothing back from the accelerator."""

    prompt_lens: tuple[int, ...]
    response_lens: tuple[int, ...]

    @classmethod
    def of(cls, attention_mask: Tensor, response_mask: Tensor) -> HostLayout:
        """From the batch's masks (a device-to-host copy if they live on an accelerator). The response length counts
        every real token after the prompt: a multi-turn episode's observation tokens too."""
        width = response_mask.shape[1]
        split = attention_mask.shape[1] - width
        prompt, response = attention_mask[:, :split].sum(1), attention_mask[:, split:].sum(1)
        return cls(prompt_lens=tuple(prompt.tolist()), response_lens=tuple(response.tolist()))

    def select(self, rows: list[int]) -> HostLayout:
        return HostLayout(tuple(self.prompt_lens[i] for i in rows), tuple(self.response_lens[i] for i in rows))


@dataclass
class RolloutBatch:
    """One RL step's worth of generated samples, padded to a common shape.

    Layout: prompts are left-padded to width ``P``, responses right-padded to width ``T``, and
    ``input_ids = cat(prompt, response)`` so that the response logits are a single slice.
    ``B`` counts samples (prompts x samples per prompt).

    A multi-turn episode's "response" is every turn after the prompt: the policy's sampled tokens and the
    environment's observation tokens between them. ``response_mask`` marks the policy's tokens only (every loss,
    entropy, KL and value term reads it), ``observation_mask`` the observations (context, never trained on), and
    ``attention_mask`` both; ``lengths`` counts both, so the episode's last token is its last policy token.
    """

    input_ids: Tensor  # (B, P + T) long, prompt left-padded then response right-padded
    attention_mask: Tensor  # (B, P + T) long, 1 on real prompt and response tokens
    response_mask: Tensor  # (B, T) bool, True on the policy's response tokens (EOS included)
    rollout_logprobs: Tensor  # (B, T) float, the sampler's log-probabilities (0 on padding and observations)
    scores: Tensor  # (B,) float, total sequence reward (sum of the reward terms)
    correct: Tensor  # (B,) bool, verifier says correct (drives accuracy and the positive-example NLL)
    lengths: Tensor  # (B,) long, response length in tokens (multi-turn: policy and observation tokens)
    truncated: Tensor  # (B,) bool, stopped by max_tokens rather than EOS
    group_index: Tensor  # (B,) long, which prompt of this batch the sample answers
    weight_version: int  # policy version (number of weight syncs) that generated the batch
    reward_terms: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,) float
    baseline_scores: Tensor | None = None  # (B,) float, ReMax: score of the greedy response
    # multi-turn episodes only (None for single-turn rollouts):
    observation_mask: Tensor | None = None  # (B, T) bool, True on observation tokens (tool results, env replies)
    turn_rewards: Tensor | None = None  # (B, T) float, per-turn rewards on each turn's last policy token (in scores)
    metadata: list[dict[str, Any]] = field(default_factory=list)  # per sample: prompt, response, answer...
    stats: dict[str, float] = field(default_factory=dict)  # rollout-side metrics (dropped prompts, kept share...)
    # lengths on the host (``HostLayout``), set where the batch is built on the CPU and carried by ``to``/``select``
    host: HostLayout | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.host is None and self.input_ids.device.type == "cpu":
            self.host = HostLayout.of(self.attention_mask, self.response_mask)

    @property
    def layout(self) -> HostLayout:
        """The host-side lengths; computed (one device-to-host copy) for a batch built on an accelerator."""
        if self.host is None:
            self.host = HostLayout.of(self.attention_mask, self.response_mask)
        return self.host

    @property
    def token_mask(self) -> Tensor:
        """(B, T) bool: every real token after the prompt (the policy's and the observations')."""
        return self.response_mask if self.observation_mask is None else self.response_mask | self.observation_mask

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def responses(self) -> Tensor:  # (B, T)
        return self.input_ids[:, self.prompt_width :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch on ``device``. Copies to an accelerator are asynchronous (ordered on the current stream before
        any kernel that reads them); copies to the CPU are not: an asynchronous device-to-host copy returns before
        the data is there, and the replay pools and metrics read these tensors at once."""
        non_blocking = torch.device(device).type != "cpu"
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                moved[f.name] = v.to(device, non_blocking=non_blocking)
            elif f.name == "reward_terms":
                moved[f.name] = {k: t.to(device, non_blocking=non_blocking) for k, t in v.items()}
        return replace(self, **moved)

    def select(self, index: Tensor, host_index: list[int] | None = None) -> RolloutBatch:
        """Rows ``index`` (a (b,) long tensor), e.g. one minibatch; metadata and the host layout follow.

        ``host_index``: the same rows as a list, which the micro-batch loops pass so that selecting reads nothing back
        from the accelerator. Without it, ``index`` is read once for the metadata and the layout."""
        if host_index is None:
            host_index = index.tolist()
        out: dict[str, Any] = {"host": None if self.host is None else self.host.select(host_index)}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[index]
            elif f.name == "reward_terms":
                out[f.name] = {k: t[index] for k, t in v.items()}
            elif f.name == "metadata" and v:
                out[f.name] = [v[i] for i in host_index]
        return replace(self, **out)


@dataclass
class PreparedBatch:
    """What ``VAPOModule.prepare`` computes before the update, without gradient; ``None`` where not computed."""

    old_logp: Tensor | None = None  # (B, T) log-probs of the response under the policy that sampled it
    entropy: Tensor | None = None  # (B, T) token entropy of that policy
    ref_logp: Tensor | None = None  # (B, T) log-probs under the reference model (when a KL term is on)
    old_values: Tensor | None = None  # (B, T) critic values V(s_t) before the update (when there is a critic)


class StepOutput(dict):
    """What ``VAPOModule.training_step`` returns and callbacks read (``outputs`` in ``on_train_batch_end``).

    A ``dict`` (Lightning requires a mapping from ``training_step``) with typed attribute access:
    ``outputs.rollout``, ``outputs.entropy`` ((B, T) or ``None``), ``outputs.metrics``.
    """

    def __init__(self, rollout: RolloutBatch, entropy: Tensor | None, metrics: dict[str, float]) -> None:
        super().__init__(rollout=rollout, entropy=entropy, metrics=metrics)

    def copy(self) -> StepOutput:  # Lightning copies the step's output before handing it to callbacks
        return StepOutput(self["rollout"], self["entropy"], self["metrics"])

    @property
    def rollout(self) -> RolloutBatch:
        return self["rollout"]

    @property
    def entropy(self) -> Tensor | None:
        return self["entropy"]

    @property
    def metrics(self) -> dict[str, float]:
        return self["metrics"]
