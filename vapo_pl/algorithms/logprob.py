"""Token log-probabilities and entropies from logits, with memory bounded by a row chunk.

The naive ``torch.log_softmax(logits / T, -1).gather(-1, labels)`` materialises a full (B, T, V)
copy for the division, another for the log-softmax, and autograd keeps the latter for backward:
with V = 150k (Qwen2.5) and 16k tokens that is ~10 GB per copy in float32. Here rows (tokens) are
processed ``chunk_size`` at a time, in the forward *and* the backward pass:

    log pi(y) = z_y - logsumexp(z),   z = logits / T
    d log pi(y) / d logits = (onehot(y) - softmax(z)) / T

A custom autograd function saves only the logits themselves (no copy), the labels and one
logsumexp per row; the backward recomputes ``softmax(z)`` chunk by chunk. Peak extra memory is a few
``chunk_size x V`` buffers (plus, in backward, the gradient of the logits, which autograd needs in
full anyway). The Python loop runs over chunks of rows, not over tokens or sequences.

Deliberate choices:
- Half/bfloat16 logits are computed in float32 and the results returned as float32 (a bf16
  log-prob has ~3 significant digits, too few for PPO ratios); float32/float64 stay as they are.
- Double backward is not supported (PPO does not need it).
- ``entropy_from_logits`` runs under ``torch.no_grad``: it is a metric here. An entropy *bonus*
  would need a differentiable version.
- Logits that cannot be flattened to (N, V) without a copy (e.g. the slice ``logits[:, :-1]`` of a
  model output) are read chunk by chunk through indexing, so no full copy is made either.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_reader(logits: Tensor) -> tuple[int, Callable[[int, int], Tensor]]:
    """(N, read) where ``read(s, e)`` gives rows s..e-1 of ``logits`` seen as (N, V), without a full copy."""
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    num_rows = math.prod(lead)
    try:
        flat = logits.view(num_rows, vocab)
    except RuntimeError:  # non-mergeable strides: gather each chunk's rows by index instead

        def read(start: int, end: int) -> Tensor:
            index = torch.unravel_index(torch.arange(start, end, device=logits.device), lead)
            return logits[index]

        return num_rows, read
    return num_rows, lambda start, end: flat[start:end]


def _scaled(rows: Tensor, temperature: float) -> Tensor:
    z = rows.to(_compute_dtype(rows.dtype))
    return z if temperature == 1.0 else z / temperature


def _check_common(logits: Tensor, chunk_size: int, temperature: float) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")


class _ChunkedLogProbs(torch.autograd.Function):
    """log_softmax(logits / T).gather(labels), chunked over rows in forward and backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, chunk_size: int) -> Tensor:
        num_rows, read = _row_reader(logits)
        labels = labels.reshape(num_rows)  # (N,)
        out_dtype = _compute_dtype(logits.dtype)
        logp = torch.empty(num_rows, dtype=out_dtype, device=logits.device)  # (N,)
        lse = torch.empty(num_rows, dtype=out_dtype, device=logits.device)  # (N,)
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            z = _scaled(read(start, end), temperature)  # (c, V)
            lse_chunk = torch.logsumexp(z, dim=-1)  # (c,)
            logp[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - lse_chunk
            lse[start:end] = lse_chunk
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logp.view(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Tensor):
        logits, labels, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        num_rows, read = _row_reader(logits)
        grad_logp = grad_logp.reshape(num_rows).to(lse.dtype)  # (N,)
        grad_logits = torch.empty((num_rows, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            z = _scaled(read(start, end), temperature)  # (c, V)
            g = (grad_logp[start:end] / temperature)[:, None]  # (c, 1); dz/dlogits = 1/T
            grad = torch.exp(z - lse[start:end, None])  # softmax(z), recomputed: (c, V)
            grad.mul_(-g)
            grad.scatter_add_(-1, labels[start:end, None], g)  # + onehot(y) * g
            grad_logits[start:end] = grad
        return grad_logits.view(logits.shape), None, None, None


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, labels)``, row-chunked, differentiable.

    Args:
        logits: (B, T, V) (any leading shape (..., V) works) raw logits, float/bf16/half.
        labels: (B, T) integer token ids in [0, V) (padding must hold valid ids too, e.g. pad id).
        temperature: T > 0; the sampling distribution is softmax(logits / T), so training log-probs
            must use the rollout temperature.
        chunk_size: rows (tokens) per chunk; extra memory ~ a few x chunk_size x V x 4 bytes.

    Returns:
        (B, T) log-probs; float64 for float64 logits, else float32. Differentiable w.r.t.
        ``logits`` with the same gradient as the unchunked expression (up to rounding).
    """
    _check_common(logits, chunk_size, temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    # One cheap check here turns an opaque gather / device-assert failure into a clear error.
    vocab = logits.shape[-1]
    if labels.numel() and bool(((labels < 0) | (labels >= vocab)).any()):
        raise ValueError(f"labels must lie in [0, {vocab}) (the vocabulary size)")
    return _ChunkedLogProbs.apply(logits, labels.long(), float(temperature), chunk_size)


@torch.no_grad()
def entropy_from_logits(logits: Tensor, chunk_size: int = 1024, *, temperature: float = 1.0) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` per row, row-chunked.

    Args:
        logits: (B, T, V) (any leading shape (..., V) works).
        chunk_size: rows (tokens) per chunk.
        temperature: T > 0 (keyword; extension of the contract so the metric matches the
            sampling distribution without the caller making a full scaled copy).

    Returns:
        (B, T) entropies in nats, no grad (computed under ``torch.no_grad``: a metric). float64 for
        float64 logits, else float32. Tokens with logit -inf (probability 0) contribute 0.
    """
    _check_common(logits, chunk_size, temperature)
    num_rows, read = _row_reader(logits)
    entropy = torch.empty(num_rows, dtype=_compute_dtype(logits.dtype), device=logits.device)  # (N,)
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        z = _scaled(read(start, end), temperature)  # (c, V)
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # (c, V)
        plogp = logp.exp().mul_(logp)
        # 0 * log 0 is 0 in the limit; without this a -inf logit gives 0 * -inf = NaN.
        plogp.masked_fill_(logp == float("-inf"), 0.0)
        entropy[start:end] = -plogp.sum(dim=-1)
    return entropy.view(logits.shape[:-1])
