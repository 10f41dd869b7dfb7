"""Critic loss and its main diagnostic.

Value loss: PPO2 (Schulman et al. 2017; the OpenAI baselines `ppo2` implementation), per token

    v_loss_unclipped = (V - R)^2
    V_clipped        = V_old + clip(V - V_old, -c, c)
    v_loss_clipped   = (V_clipped - R)^2
    v_loss           = 0.5 * max(v_loss_unclipped, v_loss_clipped)

with ``R`` the critic targets (VAPO's Decoupled-GAE: lambda_critic = 1 returns). The per-token loss
goes through ``aggregation.aggregate`` like the policy loss. With ``clip_range=None`` it is the plain
``0.5 * (V - R)^2`` (VAPO's value-pretraining and the paper do not clip).

Explained variance: ``1 - Var[R - V] / Var[R]`` over the response tokens (1 = perfect critic,
0 = no better than a constant, negative = worse than a constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vapo_pl.algorithms.utils import masked_mean, masked_var


def _check_same_shape(mask: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}")


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO2 clipped value loss per token.

    Args:
        values: (B, T) current critic values V(s_t), with grad.
        old_values: (B, T) critic values at rollout time; treated as constants (detached).
        returns: (B, T) critic targets R_t; treated as constants (detached).
        mask: (B, T) bool, real response tokens. Padding may hold NaN and never reaches the
            output nor the gradient (inputs are zeroed there before any arithmetic).
        clip_range: c > 0, or None for the unclipped loss.

    Returns:
        loss: (B, T) ``0.5 * max(unclipped, clipped)``, 0 on padding.
        stats: ``vf_clipfrac`` (detached scalar): share of masked tokens where the clipped term
            is the larger one, i.e. where clipping changed the loss (0 when unclipped).
    """
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range!r}")
    _check_same_shape(mask, values=values, old_values=old_values, returns=returns)

    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Zeroing padding first (rather than only masking the result) keeps NaN out of the backward
    # pass: d/dV of (V - R)^2 at a NaN position would be NaN * 0 = NaN otherwise.
    values = torch.where(mask, values, zero)
    old_values = torch.where(mask, old_values.detach(), zero)
    returns = torch.where(mask, returns.detach(), zero)

    v_loss_unclipped = (values - returns) ** 2
    if clip_range is None:
        v_loss = 0.5 * v_loss_unclipped
        vf_clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        v_loss_clipped = (values_clipped - returns) ** 2
        v_loss = 0.5 * torch.maximum(v_loss_unclipped, v_loss_clipped)
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask).detach()

    loss = torch.where(mask, v_loss, zero)
    return loss, {"vf_clipfrac": vf_clipfrac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens, as a detached scalar.

    Args:
        values: (B, T) critic values V(s_t).
        returns: (B, T) critic targets R_t.
        mask: (B, T) bool, real response tokens (padding may hold NaN; it is never read).

    Returns:
        () tensor in ``values``' dtype. NaN when ``Var[R] == 0`` over the mask (including an empty
        or one-token mask): the ratio is undefined there, as in Stable-Baselines3, and a NaN in the
        logs says so instead of a made-up number. This is common early in RL on hard prompts
        (every response wrong, every return 0), so consumers must tolerate NaN.
    """
    _check_same_shape(mask, values=values, returns=returns)
    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(mask, values, zero)
    returns = torch.where(mask, returns, zero)
    # Both variances share the same count, so the Bessel correction cancels in the ratio.
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    nan = torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, nan)
