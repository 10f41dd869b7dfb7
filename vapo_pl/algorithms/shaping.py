"""Reward shaping terms that depend on the response only, not on its correctness.

DAPO (Yu et al. 2025, arXiv 2503.14476), eq. 13, "soft overlong punishment":

    R_length(l) = 0                              if l <= L_max - L_cache
                = ((L_max - L_cache) - l) / L_cache   if L_max - L_cache < l <= L_max
                = -1                             if l > L_max

It is added to the verifier's score, so a truncated (or nearly truncated) response is pushed
towards shorter reasoning without the cliff of a hard length penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), one value per response.

    Args:
        lengths: (B,) response lengths in tokens (integer or float tensor, >= 0).
        max_length: L_max, the length at which the penalty reaches -1 (DAPO: 20480).
        cache_length: L_cache, the width of the linear ramp before L_max (DAPO: 4096);
            0 < cache_length <= max_length.

    Returns:
        (B,) penalty in [-1, 0]: float32 for integer ``lengths``, else ``lengths``' dtype.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if not isinstance(cache_length, int) or isinstance(cache_length, bool) or cache_length <= 0:
        raise ValueError(f"cache_length must be a positive int, got {cache_length!r}")
    if cache_length > max_length:
        raise ValueError(f"cache_length ({cache_length}) must be <= max_length ({max_length})")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"lengths must be an integer or float tensor, got {lengths.dtype}")
    if lengths.is_floating_point() and not bool(torch.isfinite(lengths).all()):
        raise ValueError("lengths must be finite")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")

    out_dtype = lengths.dtype if lengths.is_floating_point() else torch.float32
    # The numerator is formed before the division so integer lengths give exact ramp values
    # (e.g. -0.5 midway); the clamp covers both flat parts of the piecewise definition.
    excess = (max_length - cache_length) - lengths
    return (excess.to(out_dtype) / cache_length).clamp(min=-1.0, max=0.0)
