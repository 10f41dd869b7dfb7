"""Positive-example LM loss (VAPO, arXiv 2504.05118, technique 6; self-imitation learning).

    L_NLL = - (1 / sum_{i in correct} |y_i|) * sum_{i in correct} sum_t log pi(y_it | x_i, y_i<t)

i.e. the token-mean negative log-likelihood of the responses the verifier marked correct, added to
the policy loss as ``L = L_ppo + mu * L_NLL`` (paper: mu = 0.1). Token-level normalisation, like
VAPO's policy loss, so long correct responses are not down-weighted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vapo_pl.algorithms.utils import masked_sum


def positive_example_nll(
    logp: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Token-mean NLL over the tokens of correct responses.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy, with grad.
        mask: (B, T) bool, real response tokens (padding may hold NaN; it never reaches the
            loss nor the gradient).
        correct: (B,) bool, True for responses the verifier accepted (reward 1). Must be bool:
            a float reward is refused rather than guessed at.
        num_tokens: optional divisor replacing the local count of correct tokens, so that a
            trainer accumulating gradients over micro-batches (or ranks) can normalise by the
            global count, as ``aggregate(..., num_tokens=...)`` does for the policy loss.
            Extension to the paper's formula, which is written for one batch.

    Returns:
        () loss. With no correct token it is exactly 0 yet still attached to ``logp``'s graph, so
        ``backward()`` works and gives zero gradients.
    """
    if mask.shape != logp.shape:
        raise ValueError(f"mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    if correct.shape != logp.shape[:1]:
        raise ValueError(
            f"correct must have shape (B,) = {tuple(logp.shape[:1])}, got {tuple(correct.shape)}"
        )
    # a tensor count is used as given (checking one on an accelerator would wait for it)
    if num_tokens is not None and not isinstance(num_tokens, Tensor) and not float(num_tokens) > 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens!r}")

    selected = mask.bool() & correct[:, None]  # (B, T)
    # masked_sum zeroes the unselected tokens with torch.where, so an empty selection still
    # yields a graph-connected 0 (not a detached constant) and NaN padding stays out.
    total = masked_sum(logp, selected)
    if num_tokens is None:
        num_tokens = selected.sum().clamp(min=1).to(logp.dtype)
    return -total / num_tokens
