"""One reducer from a per-token loss ``(B, T)`` to the scalar that is back-propagated.

Every policy-side loss term goes through :func:`aggregate`, so the choice of normaliser is one config
value rather than a branch in each loss. The modes differ only in how tokens of sequences of unequal
length are weighted:

* ``token-mean`` (DAPO, arXiv 2503.14476, Sec. 3.3; VAPO's "token-level policy loss"): every response
  token of the batch has weight ``1 / N_tokens``, so a long response contributes in proportion to its
  length.
* ``seq-mean-token-mean`` (GRPO's sample-level loss, PPO as in the VAPO paper's baseline, and the
  normaliser GSPO's sequence objective needs): each sequence's token mean, then the mean over
  sequences; a token of a sequence of length ``l`` has weight ``1 / (B * l)``.
* ``seq-mean-token-sum``: each sequence's token sum, then the mean over sequences.
* ``seq-mean-token-sum-norm`` (Dr.GRPO, arXiv 2503.20783, Sec. 3.1): the token sum divided by
  ``num_seqs * norm_length`` with ``norm_length`` a constant (e.g. the maximum response length), so
  no length normalisation depends on the sample itself.

``num_tokens`` / ``num_seqs`` let the trainer divide by the counts of the whole (global, all
micro-batches and ranks) batch, so that accumulating micro-batches gives the full-batch loss.
Padding may hold NaN or garbage: it is selected away with ``torch.where`` before any reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

Count = Tensor | float | int


def _denominator(value: Count | None, default: Tensor, name: str) -> Tensor:
    """``value`` as a tensor, or ``default`` clamped to >= 1 so an empty batch reduces to 0, not NaN."""
    if value is None:
        return default.clamp(min=1)
    if isinstance(value, Tensor):
        return value.to(default.dtype)  # a device tensor is used as given: checking it would sync
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return torch.as_tensor(float(value), dtype=default.dtype, device=default.device)


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    norm_length: int | None = None,
    num_tokens: Tensor | float | None = None,
    num_seqs: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Args:
        loss: (B, T) per-token loss over response tokens; padded entries are never read.
        mask: (B, T) bool, True on real response tokens.
        mode: one of :data:`AGG_MODES` (see the module docstring for the weights each gives).
        norm_length: ``seq-mean-token-sum-norm`` only: the constant length divisor (default ``T``).
        num_tokens: ``token-mean`` only: the token count to divide by (default ``mask.sum()``), e.g.
            the global count over all micro-batches and ranks. Ignored by the other modes.
        num_seqs: ``seq-*`` modes only: the sequence count to divide by (default: rows of ``mask``
            with at least one token). Ignored by ``token-mean``.

    Returns:
        0-d tensor. An empty mask gives 0 (the default counts are clamped to >= 1).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss.dim() != 2 or mask.shape != loss.shape:
        raise ValueError(
            f"loss and mask must both be (B, T); got loss {tuple(loss.shape)}, mask {tuple(mask.shape)}"
        )
    if norm_length is None:
        norm_length = max(loss.shape[-1], 1)
    elif isinstance(norm_length, bool) or not isinstance(norm_length, int) or norm_length <= 0:
        raise ValueError(f"norm_length must be a positive int, got {norm_length!r}")
    mask = mask.bool()
    token_loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))  # (B, T)
    if mode == "token-mean":
        return token_loss.sum() / _denominator(num_tokens, mask.sum().to(loss.dtype), "num_tokens")
    # Rows without a response token (e.g. dummy rows filling a rank's micro-batch) are not sequences.
    seqs = _denominator(num_seqs, mask.any(dim=-1).sum().to(loss.dtype), "num_seqs")
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).to(loss.dtype).clamp(min=1)  # (B,)
        return (token_loss.sum(dim=-1) / lengths).sum() / seqs
    if mode == "seq-mean-token-sum":
        return token_loss.sum() / seqs
    return token_loss.sum() / (seqs * norm_length)  # seq-mean-token-sum-norm
