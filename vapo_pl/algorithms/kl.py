"""KL regularisation towards a reference policy.

Per-token estimators of KL(pi || pi_ref) from one sample y_t ~ pi (J. Schulman, "Approximating KL
Divergence", 2020), with ``log_ratio = logp - ref_logp = log(pi / pi_ref)``:

    k1 = log_ratio                                   unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio^2                           biased (low when pi ~ pi_ref), >= 0
    k3 = exp(-log_ratio) + log_ratio - 1             unbiased, >= 0 (GRPO's estimator:
       = pi_ref/pi - log(pi_ref/pi) - 1              pi_ref/pi - log(pi_ref/pi) - 1)

Two uses: a penalty in the reward, ``r_t - beta * kl_t`` (InstructGPT, REINFORCE++), or a loss term
``beta * aggregate(kl_estimate(logp, ref_logp, "k3"), mask, ...)`` (GRPO).

Coefficient controllers: fixed, or the adaptive one of Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences", sec. 2.2): ``e = clip(KL / KL_target - 1, -0.2, 0.2)``,
``beta <- beta * (1 + e * n_steps / horizon)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) (Schulman 2020).

    Args:
        logp: (B, T) log pi(y_t) of the sampled tokens; may carry grad (loss-term use).
        ref_logp: (B, T) log pi_ref(y_t) of the same tokens.
        kind: one of ``KL_ESTIMATORS``.

    Returns:
        (B, T) estimate, elementwise (no masking here: callers mask or aggregate). Not clamped.
        k3 uses ``expm1(x) - x``, equal to ``exp(x) - x - 1`` but without cancellation when
        pi ~ pi_ref, which is the usual regime.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    neg_log_ratio = -log_ratio  # log(pi_ref / pi)
    return torch.expm1(neg_log_ratio) - neg_log_ratio


def kl_penalty_rewards(
    token_rewards: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    kind: str,
) -> Tensor:
    """Token rewards with the KL penalty folded in: ``r_t - beta * kl_t`` on response tokens.

    Args:
        token_rewards: (B, T) reward per response token (verifier score on the last one).
        logp: (B, T) log-probs under the rollout policy; detached here (a reward is a constant).
        ref_logp: (B, T) log-probs under the reference policy; detached here.
        mask: (B, T) bool, real response tokens (padding may hold NaN; it is never read).
        beta: KL coefficient >= 0 (e.g. ``controller.value``).
        kind: one of ``KL_ESTIMATORS`` (InstructGPT and REINFORCE++ use k1).

    Returns:
        (B, T) penalised rewards, 0 on padding, no grad.
    """
    if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
    for name, t in (("token_rewards", token_rewards), ("logp", logp), ("ref_logp", ref_logp)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}")
    mask = mask.bool()
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    kl = kl_estimate(logp.detach(), ref_logp.detach(), kind)
    return torch.where(mask, token_rewards.detach() - beta * kl, zero)


def _check_kl_coef(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_update_args(current_kl: float, n_steps: int) -> None:
    if not math.isfinite(float(current_kl)):
        raise ValueError(f"current_kl must be finite, got {current_kl!r}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps!r}")


class FixedKLController:
    """Constant KL coefficient; ``update`` only validates its arguments.

    Args:
        kl_coef: beta >= 0.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_kl_coef("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        _check_update_args(current_kl, n_steps)


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (sec. 2.2, "dynamic KL coefficient").

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    The clip bounds how fast beta moves: at most a factor ``1 +- 0.2 * n_steps / horizon``
    per update. Departure: the factor is floored at 0 so beta can never become negative.

    Args:
        init_kl_coef: initial beta >= 0 (a beta of 0 stays 0: the rule is multiplicative).
        target: KL_target > 0, in the same units as ``current_kl`` (nats per token or per sequence,
            as the caller measures it).
        horizon: K_beta > 0, in the units of ``n_steps`` (Ziegler et al.: 10000 samples).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = _check_kl_coef("init_kl_coef", init_kl_coef)
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a finite float > 0, got {target!r}")
        if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards keeping ``current_kl`` at ``target``; ``n_steps`` samples since the last update."""
        _check_update_args(current_kl, n_steps)
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        # Floored at 0: with n_steps > 5 * horizon the raw factor would turn beta negative.
        self.value *= max(0.0, 1.0 + proportional_error * n_steps / self.horizon)
