"""Sampler/trainer mismatch: how far the rollout engine's log-probs are from the trainer's, and the corrections that
reweight or drop the tokens it drew.

The engine (``mu``: vLLM with its own kernels, bf16 on GPU) samples the tokens; the trainer's old policy
``pi_old`` (the same weights in the trainer's precision) scores them. Even at PPO ratio 1 the gradient is then
off-policy by ``r = pi_old / mu = exp(old_logp - rollout_logp)`` per token (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training").

Every correction has one signature, ``fn(old_logp, rollout_logp, mask, params) -> CorrectionOutput``:

* ``old_logp``     (B, T) the trainer's log-probs of the sampled tokens before the update (detached here);
* ``rollout_logp`` (B, T) the sampler's log-probs of the same tokens (``RolloutBatch.rollout_logprobs``);
* ``mask``         (B, T) bool, True on policy tokens;
* ``params``       :class:`CorrectionParams`.

It returns per-token weights ``(B, T)``, detached, 0 on padding, that multiply the per-token policy loss (the
policy loss alone: the NLL and KL terms are not the sampler's business), and statistics. Registered names:

* ``none``: weight 1.
* ``token_tis``: ``w_t = min(r_t, C)`` (truncated importance sampling, per token; Yao et al. 2025, C = 2).
* ``seq_tis``: ``w = min(prod_t r_t, C)`` on all of a sequence's tokens.
* ``token_mis``: ``w_t = 1`` when ``lo <= r_t <= hi``, else 0 (masked importance sampling: the token is dropped).
* ``seq_mis``: the whole sequence kept (weight 1) or dropped (0) by its ``prod_t r_t``.

A dropped token still counts in the loss's token mean (its weight is 0, the denominator is the minibatch's policy
tokens, computed before the old log-probs may exist): MIS makes the step smaller by the dropped share rather than
renormalising it (``docs/decisions.md``). Log-ratios are clamped to [-20, 20] before ``exp``, as the policy losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vapo_pl.algorithms.utils import masked_mean
from vapo_pl.registry import Registry

_MAX_LOG_RATIO = 20.0
# mismatch metrics: the share of tokens whose r = exp(old - rollout) lies outside this band
MISMATCH_BAND = (0.5, 2.0)


@dataclass(frozen=True)
class CorrectionParams:
    """Truncation cap ``tis_cap`` (C) of the TIS weights and the band ``[mis_low, mis_high]`` MIS keeps."""

    tis_cap: float = 2.0  # Yao et al. 2025
    mis_low: float = 0.5
    mis_high: float = 2.0

    def __post_init__(self) -> None:
        for name in ("tis_cap", "mis_low", "mis_high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not self.mis_low < 1 < self.mis_high:
            raise ValueError(f"mis_low < 1 < mis_high must hold, got [{self.mis_low}, {self.mis_high}]")


@dataclass
class CorrectionOutput:
    weights: Tensor  # (B, T) detached, 0 on padding
    stats: dict[str, Tensor]  # detached 0-d: weight_mean, and dropped_share (MIS) or truncated_share (TIS)


CorrectionFn = Callable[[Tensor, Tensor, Tensor, CorrectionParams], CorrectionOutput]

ROLLOUT_CORRECTIONS: Registry[CorrectionFn] = Registry("rollout correction")


def log_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Tensor:
    """``log(pi_old / mu)`` per token, detached, clamped to [-20, 20]; 0 off ``mask`` (padding may hold NaN)."""
    if old_logp.shape != rollout_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(f"old_logp {tuple(old_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    diff = old_logp.detach().float() - rollout_logp.detach().float()
    return torch.where(mask.bool(), diff, torch.zeros((), device=diff.device)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _sequence_log_ratio(lr: Tensor, mask: Tensor) -> Tensor:
    """(B, 1) log of the product of the ratios over each sequence's policy tokens, clamped as a token's."""
    return (lr * mask).sum(-1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _out(weights: Tensor, mask: Tensor, name: str, flagged: Tensor) -> CorrectionOutput:
    weights = torch.where(mask, weights, torch.zeros((), device=weights.device))
    return CorrectionOutput(weights, {"weight_mean": masked_mean(weights, mask),
                                      name: masked_mean(flagged.float(), mask)})


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: CorrectionParams) -> CorrectionOutput:
    mask = mask.bool()
    return CorrectionOutput(mask.float(), {})


@ROLLOUT_CORRECTIONS.register("token_tis")
def token_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: CorrectionParams) -> CorrectionOutput:
    mask = mask.bool()
    r = log_ratio(old_logp, rollout_logp, mask).exp()
    return _out(r.clamp(max=params.tis_cap), mask, "truncated_share", r > params.tis_cap)


@ROLLOUT_CORRECTIONS.register("seq_tis")
def seq_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: CorrectionParams) -> CorrectionOutput:
    mask = mask.bool()
    r = _sequence_log_ratio(log_ratio(old_logp, rollout_logp, mask), mask).exp().expand_as(old_logp)
    return _out(r.clamp(max=params.tis_cap), mask, "truncated_share", r > params.tis_cap)


@ROLLOUT_CORRECTIONS.register("token_mis")
def token_mis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: CorrectionParams) -> CorrectionOutput:
    mask = mask.bool()
    r = log_ratio(old_logp, rollout_logp, mask).exp()
    keep = (r >= params.mis_low) & (r <= params.mis_high)
    return _out(keep.float(), mask, "dropped_share", ~keep)


@ROLLOUT_CORRECTIONS.register("seq_mis")
def seq_mis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: CorrectionParams) -> CorrectionOutput:
    mask = mask.bool()
    r = _sequence_log_ratio(log_ratio(old_logp, rollout_logp, mask), mask).exp().expand_as(old_logp)
    keep = (r >= params.mis_low) & (r <= params.mis_high)
    return _out(keep.float(), mask, "dropped_share", ~keep)


def mismatch_metrics(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the sampler is from the trainer on ``mask``'s tokens: mean and max ``|old_logp - rollout_logp|``,
    the k3 estimate of KL(mu || pi_old) from the sampled tokens (``(r - 1) - log r``, ``r = pi_old / mu``), and the
    share of tokens with ``r`` outside ``MISMATCH_BAND``. Empty when ``mask`` has no token."""
    mask = mask.bool()
    if not mask.any():
        return {}
    lr = log_ratio(old_logp, rollout_logp, mask)
    lo, hi = MISMATCH_BAND
    outside = (lr < math.log(lo)) | (lr > math.log(hi))
    on = lr[mask]
    return {
        "mismatch/logp_abs_diff_mean": float(on.abs().mean()),
        "mismatch/logp_abs_diff_max": float(on.abs().max()),
        "mismatch/kl_k3": float((torch.expm1(on) - on).mean()),
        "mismatch/ratio_outside_share": float(outside[mask].float().mean()),
    }
