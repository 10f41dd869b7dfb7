"""Per-token policy-gradient losses, registered by the names the configs use.

Every loss has one signature, ``fn(logp, old_logp, advantages, mask, params) -> PolicyLossOutput``:

* ``logp``       (B, T) log pi_theta(y_t | x, y_<t) of the sampled response tokens, WITH grad;
* ``old_logp``   (B, T) the same under the policy that generated the batch (treated as a constant);
* ``advantages`` (B, T) per-token advantages (treated as a constant);
* ``mask``       (B, T) bool, True on real response tokens;
* ``params``     :class:`PolicyLossParams`.

It returns the per-token loss ``(B, T)`` (0 on padding, to be reduced by
:func:`vapo_pl.algorithms.aggregation.aggregate`) and detached scalar statistics. Losses are the
negatives of the papers' objectives. Notation: ``r = pi_theta / pi_old = exp(logp - old_logp)``,
``clip(r) = clip(r, 1 - eps_low, 1 + eps_high)``, ``sg`` = stop-gradient.

Padding may hold NaN or garbage in any input: the inputs are replaced by 0 there with
``torch.where`` before any arithmetic, so neither the loss nor the gradient (which is exactly 0 on
padded ``logp``) can see it.

Departures shared by all losses: the per-token log-ratio is clamped to [-20, 20] before ``exp`` (as
verl does) so that an absurd ratio cannot overflow to ``inf`` and turn a zero gradient into
``0 * inf = NaN``; within that range, which covers ratios from 2e-9 to 5e8, nothing changes.

Statistics (all over masked tokens, token-weighted): ``pg_clipfrac_low`` / ``pg_clipfrac_high``
(share of tokens the lower / upper clip bound acts on, as defined per loss), ``approx_kl`` (the k3
estimator ``(r - 1) - log r`` of KL(pi_old || pi_theta), Schulman 2020), ``ratio_mean``, ``ratio_max``
(of the ratio the loss uses: per token, or for GSPO the sequence ratio repeated on its tokens), and
``dual_clipfrac`` for losses with a dual clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vapo_pl.algorithms.utils import masked_mean
from vapo_pl.registry import Registry

# Bound on |log r| before exp(); see the module docstring.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossParams:
    """Hyper-parameters shared by the policy losses (plain floats, validated on construction)."""

    eps_low: float = 0.2  # >= 0, lower clip bound 1 - eps_low
    eps_high: float = 0.28  # >= 0, upper bound 1 + eps_high (clip-higher, DAPO); = eps_low for vanilla PPO
    dual_clip_c: float | None = None  # > 1 when set: dual-clip bound (Ye et al. 2020: 3); aspo requires it
    # gspo applies eps_low / eps_high to the sequence ratio (its paper uses ~3e-4 / 4e-4; configs choose).

    def __post_init__(self) -> None:
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):  # also rejects NaN
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.dual_clip_c is not None and not (
            isinstance(self.dual_clip_c, (int, float))
            and self.dual_clip_c > 1
            and math.isfinite(self.dual_clip_c)
        ):
            raise ValueError(f"dual_clip_c must be a finite number > 1 (or None), got {self.dual_clip_c!r}")


@dataclass
class PolicyLossOutput:
    loss: Tensor  # (B, T) per-token loss, 0 on padding -> aggregate()
    stats: dict[str, Tensor]  # detached 0-d: pg_clipfrac_low/high, approx_kl, ratio_mean/max (+dual_clipfrac)


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossParams], PolicyLossOutput]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _prepare(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check shapes; return (logp, old_logp, advantages, mask) with 0 on padding and mask as bool."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Selecting before any arithmetic keeps NaN padding out of the backward pass as well (NaN * 0 = NaN).
    return (
        torch.where(mask, logp, zero),
        torch.where(mask, old_logp.detach(), zero),
        torch.where(mask, advantages.detach(), zero),
        mask,
    )


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, params: PolicyLossParams
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with clip-higher and optional dual clip, as a loss.

    ``ratio`` (B, T) carries the gradient. Returns the per-token loss
    ``max(-r A, -clip(r) A)``, and for A < 0 with ``dual_clip_c`` set ``min(that, -c A)``, i.e. the
    negative of ``max(min(r A, clip(r) A), c A)`` (Ye et al. 2020), plus boolean masks of where
    each bound acts (the gradient is 0 there).
    """
    loss = torch.maximum(
        -advantages * ratio, -advantages * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    )
    ratio = ratio.detach()
    clipped = {
        "low": (advantages < 0) & (ratio < 1 - params.eps_low),
        "high": (advantages > 0) & (ratio > 1 + params.eps_high),
    }
    if params.dual_clip_c is not None:
        c = params.dual_clip_c
        # For A < 0, max(-rA, -clip(r)A) = -rA whenever r > 1 - eps_low, so the dual bound acts iff r > c.
        loss = torch.where(advantages < 0, torch.minimum(loss, -c * advantages), loss)
        clipped["dual"] = (advantages < 0) & (ratio > c)
    return loss, clipped


def _output(
    loss: Tensor, mask: Tensor, ratio: Tensor, log_ratio: Tensor, clipped: dict[str, Tensor]
) -> PolicyLossOutput:
    """Zero the loss on padding and compute the statistics (``ratio``/``log_ratio`` (B, T), 0 on padding)."""
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    with torch.no_grad():
        ratio, log_ratio = ratio.detach(), log_ratio.detach()
        stats = {
            "pg_clipfrac_low": masked_mean(clipped["low"].to(loss.dtype), mask),
            "pg_clipfrac_high": masked_mean(clipped["high"].to(loss.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, zero).amax() if ratio.numel() else zero.clone(),
        }
        if "dual" in clipped:
            stats["dual_clipfrac"] = masked_mean(clipped["dual"].to(loss.dtype), mask)
    return PolicyLossOutput(loss=torch.where(mask, loss, zero), stats=stats)


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


@POLICY_LOSSES.register("ppo")
def ppo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, params: PolicyLossParams
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with clip-higher and optional dual clip.

    Per token ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (DAPO's decoupled bounds,
    arXiv 2503.14476); with ``dual_clip_c = c``, tokens with A < 0 take
    ``-max(min(r A, clip(r) A), c A)`` (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729), so their loss never
    exceeds ``-c A`` however large r grows. Shapes: all (B, T); see the module docstring.

    Stats: ``pg_clipfrac_low`` = share of tokens with A < 0 and r < 1 - eps_low,
    ``pg_clipfrac_high`` = A > 0 and r > 1 + eps_high (where the clip zeroes the gradient);
    ``dual_clipfrac`` = A < 0 and r > c (when ``dual_clip_c`` is set).
    """
    logp, old_logp, advantages, mask = _prepare(logp, old_logp, advantages, mask)
    log_ratio = _log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss, clipped = _clipped_surrogate(ratio, advantages, params)
    return _output(loss, mask, ratio, log_ratio, clipped)


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, params: PolicyLossParams
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), in its GSPO-token form.

    The importance ratio is one number per sequence, the geometric mean of the token ratios
    ``s_i = exp(mean_t(logp - old_logp))``. Each token carries
    ``s_it = sg(s_i) * exp(logp_t - sg(logp_t))``: its value is ``s_i`` and its gradient
    ``s_i * grad logp_t``. The per-token loss is ``-min(s_it A_it, clip(s_it) A_it)`` (clip bounds are the
    sequence-level ``eps_low`` / ``eps_high``, and ``dual_clip_c`` applies as in PPO when set). When the
    advantage is constant within a sequence (GRPO-style outcome advantages), aggregating with
    ``seq-mean-token-mean`` gives GSPO's sequence-level objective in value and gradient; per-token advantages
    give GSPO-token.

    Stats are over tokens, i.e. each sequence's ratio / clip decision weighted by its length;
    ``approx_kl`` uses the per-token log-ratios. Shapes: all (B, T); an all-padding row gets s = 1 and
    loss 0.
    """
    logp, old_logp, advantages, mask = _prepare(logp, old_logp, advantages, mask)
    token_log_ratio = logp - old_logp  # (B, T), 0 on padding
    lengths = mask.sum(dim=-1).to(logp.dtype).clamp(min=1)  # (B,)
    seq_log_ratio = (token_log_ratio.sum(dim=-1) / lengths).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B,)
    # Value s_i on every token of sequence i; gradient flows through this token's logp only.
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + (logp - logp.detach()))  # (B, T)
    loss, clipped = _clipped_surrogate(ratio, advantages, params)
    return _output(loss, mask, ratio, _log_ratio(logp, old_logp), clipped)


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, params: PolicyLossParams
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, stop-gradient IS weight.

    Per token ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp``: the weight is clipped, the token is
    not dropped, so a token past either bound still has gradient ``-clip(r) A grad logp`` (PPO's is 0).
    The loss *value* is therefore not a surrogate objective (it contains ``logp``); only its gradient
    is meaningful. The paper mostly leaves the lower bound open; set ``eps_low >= 1`` for that.

    Stats: ``pg_clipfrac_low`` / ``pg_clipfrac_high`` = share of tokens whose weight is clipped at the
    lower / upper bound, whatever the advantage's sign (the weight is clipped either way).
    ``dual_clip_c`` is not used: the weight is already bounded by ``1 + eps_high``.
    Shapes: all (B, T).
    """
    logp, old_logp, advantages, mask = _prepare(logp, old_logp, advantages, mask)
    log_ratio = _log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio).detach()  # (B, T)
    weight = ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    loss = -weight * advantages * logp
    clipped = {"low": ratio < 1 - params.eps_low, "high": ratio > 1 + params.eps_high}
    return _output(loss, mask, ratio, log_ratio, clipped)


@POLICY_LOSSES.register("aspo")
def aspo_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, params: PolicyLossParams
) -> PolicyLossOutput:
    """ASPO (Wang et al. 2025, arXiv 2510.06062): asymmetric importance sampling with soft dual clip.

    Our reading of the paper, as summarised in the project's tutorial (seeds/004, Sec. 3.3.15):

    1. Hard clip: tokens already past the PPO clip bound in the advantage's direction,
       ``r < 1 - eps_low`` with A < 0, or ``r > 1 + eps_high`` with A > 0, are masked out (loss and
       gradient 0). This is where PPO's own clip has zero gradient; it is applied as a mask because the
       flipped weight below would otherwise be clipped on the wrong side. (The tutorial writes
       ``r > 1 - eps_high`` for A > 0; we read it as the usual upper bound ``1 + eps_high``.)
    2. Flip for A > 0: weight ``w = pi_old / pi = 1 / r`` in value, with the gradient taken through
       ``pi`` as in ``pi_old * pi / sg(pi^2)``, so ``grad w = w * grad logp``: low-probability good
       tokens get the larger update. For A < 0 the weight stays ``w = r`` (gradient ``r grad logp``,
       exactly PPO's).
    3. Soft dual clip for both signs, in CISPO's form: where ``w > c`` (``c = dual_clip_c``, required
       here) the weight is ``c`` in value and the token keeps the gradient ``c * grad logp`` (hard
       dual-clip PPO would give it 0).

    Per token, on the kept tokens: ``loss = -A * sg(min(w, c)) * exp(logp - sg(logp))``, whose value is
    ``-A * min(w, c)`` and gradient ``-A * min(w, c) * grad logp``. For A < 0 and r <= c this equals
    PPO's ``-r A`` in value and gradient.

    Stats: ``pg_clipfrac_low`` / ``pg_clipfrac_high`` = share of tokens masked by step 1 on the A < 0 /
    A > 0 side; ``dual_clipfrac`` = share of kept tokens (A != 0) whose weight is capped at c;
    ``ratio_*`` describe r (not the flipped weight). Shapes: all (B, T).
    """
    if params.dual_clip_c is None:
        raise ValueError("aspo needs dual_clip_c (the soft dual-clip bound, e.g. 3.0); got None")
    logp, old_logp, advantages, mask = _prepare(logp, old_logp, advantages, mask)
    log_ratio = _log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio).detach()  # (B, T)
    positive, negative = advantages > 0, advantages < 0
    past_low = negative & (ratio < 1 - params.eps_low)
    past_high = positive & (ratio > 1 + params.eps_high)
    # Flip for A > 0: pi_old / pi, so the less likely good tokens get the larger update.
    weight = torch.where(positive, torch.exp(-log_ratio.detach()), ratio)  # (B, T)
    dual = (positive | negative) & ~past_low & ~past_high & (weight > params.dual_clip_c)
    weight = weight.clamp(max=params.dual_clip_c)
    loss = -advantages * weight * torch.exp(logp - logp.detach())  # value -A w, gradient -A w grad logp
    loss = torch.where(past_low | past_high, torch.zeros((), dtype=loss.dtype, device=loss.device), loss)
    return _output(loss, mask, ratio, log_ratio, {"low": past_low, "high": past_high, "dual": dual})
