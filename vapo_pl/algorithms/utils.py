"""Masked statistics shared by the algorithm modules. Shapes: ``x`` and ``mask`` are (B, T)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Sums a tensor across data-parallel ranks; identity on one process. The trainer passes one in so
# that "global batch" statistics really are global while this package stays torch-only.
SumReducer = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask``; padded entries may hold NaN or garbage and are never read."""
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(mask.bool(), x, zeros)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, reduce: SumReducer = _identity) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 where the mask is empty). ``reduce`` sums across ranks."""
    total = reduce(masked_sum(x, mask, dim))
    count = reduce(mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim))
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: SumReducer = _identity) -> Tensor:
    """Variance of ``x`` over ``mask`` (scalar); Bessel-corrected when ``unbiased``."""
    mean = masked_mean(x, mask, reduce=reduce)
    sq = reduce(masked_sum((x - mean) ** 2, mask))
    count = reduce(mask.to(x.dtype).sum())
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    return sq / denom


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: SumReducer = _identity
) -> Tensor:
    """``(x - mean) / std`` over the masked entries; padding is returned as 0."""
    mean = masked_mean(x, mask, reduce=reduce)
    std = masked_var(x, mask, reduce=reduce).clamp(min=0).sqrt()
    out = (x - mean) / (std + eps) if shift_mean else x / (std + eps)
    return torch.where(mask.bool(), out, torch.zeros((), dtype=x.dtype, device=x.device))
