"""Tests for vapo_pl/algorithms/aggregation.py: hand cases, a loop reference, and DAPO / Dr.GRPO weights."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.aggregation import AGG_MODES, aggregate

NAN = float("nan")


def _hand_case():
    # Sequence 0 has 3 tokens, sequence 1 has 1 token; the padding holds NaN.
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return loss, mask


def test_modes_are_the_four_named_ones():
    assert AGG_MODES == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        # (1 + 2 + 3 + 4) / 4 tokens
        ("token-mean", {}, 2.5),
        # global token count 8: 10 / 8
        ("token-mean", {"num_tokens": 8}, 1.25),
        ("token-mean", {"num_tokens": torch.tensor(8.0)}, 1.25),
        # num_seqs does not apply to token-mean
        ("token-mean", {"num_seqs": 100}, 2.5),
        # sequence means 6/3 = 2 and 4/1 = 4, then (2 + 4) / 2
        ("seq-mean-token-mean", {}, 3.0),
        # (2 + 4) / 4 sequences
        ("seq-mean-token-mean", {"num_seqs": 4}, 1.5),
        # sequence sums 6 and 4, then (6 + 4) / 2
        ("seq-mean-token-sum", {}, 5.0),
        # norm_length defaults to T = 3: 10 / (2 * 3)
        ("seq-mean-token-sum-norm", {}, 10.0 / 6.0),
        # 10 / (2 * 5)
        ("seq-mean-token-sum-norm", {"norm_length": 5}, 1.0),
        # 10 / (4 * 5)
        ("seq-mean-token-sum-norm", {"norm_length": 5, "num_seqs": 4.0}, 0.5),
    ],
)
def test_hand_worked(mode, kwargs, expected):
    loss, mask = _hand_case()
    out = aggregate(loss, mask, mode, **kwargs)
    assert out.shape == ()
    assert out.item() == pytest.approx(expected, abs=1e-12)


def _loop_reference(loss, mask, mode, norm_length=None, num_tokens=None, num_seqs=None):
    """Per-sequence, per-token loops written straight from the definitions."""
    B, T = loss.shape
    norm_length = T if norm_length is None else norm_length
    seq_sums, seq_lens = [], []
    for b in range(B):
        s, n = loss.new_zeros(()), 0
        for t in range(T):
            if mask[b, t]:
                s = s + loss[b, t]
                n += 1
        seq_sums.append(s)
        seq_lens.append(n)
    total = sum(seq_sums, loss.new_zeros(()))
    n_tok = sum(seq_lens) if num_tokens is None else num_tokens
    n_seq = sum(1 for n in seq_lens if n > 0) if num_seqs is None else num_seqs
    if mode == "token-mean":
        return total / n_tok
    if mode == "seq-mean-token-mean":
        return sum((s / n for s, n in zip(seq_sums, seq_lens) if n > 0), loss.new_zeros(())) / n_seq
    if mode == "seq-mean-token-sum":
        return total / n_seq
    return total / (n_seq * norm_length)


def _random_case(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if B > 2:
        mask[1] = False  # an empty row: not a sequence, contributes nothing
    loss = torch.where(mask, loss, torch.full_like(loss, NAN))
    return loss, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed, B, T", [(0, 1, 1), (1, 3, 5), (2, 6, 9), (3, 8, 4)])
@pytest.mark.parametrize("counts", [{}, {"num_tokens": 37, "num_seqs": 11, "norm_length": 13}])
def test_matches_loop_reference(mode, seed, B, T, counts):
    loss, mask = _random_case(seed, B, T)
    leaf = loss.clone().requires_grad_(True)
    out = aggregate(leaf, mask, mode, **counts)
    (grad,) = torch.autograd.grad(out, leaf)

    ref_leaf = loss.clone().requires_grad_(True)
    ref = _loop_reference(ref_leaf, mask, mode, **counts)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, allow_unused=False)

    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)
    assert torch.all(grad[~mask] == 0)


def _token_weights(mode, lengths, T, **kwargs):
    """d aggregate / d loss[b, t]: the weight each token gets."""
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    loss = torch.zeros(len(lengths), T, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(aggregate(loss, mask, mode, **kwargs), loss)
    return grad, mask


def test_token_mean_gives_long_sequences_more_total_weight_dapo():
    """DAPO Sec. 3.3: with a sample-level mean, tokens of long responses are down-weighted.

    Lengths 2 and 8 (10 tokens). token-mean: every token 1/10, so the long sequence's tokens weigh
    8/10 in total and the short one's 2/10. seq-mean-token-mean: each sequence 1/2 in total, i.e. a
    short-sequence token 1/4 and a long-sequence token 1/16.
    """
    tok, mask = _token_weights("token-mean", [2, 8], 8)
    seq, _ = _token_weights("seq-mean-token-mean", [2, 8], 8)

    assert torch.allclose(tok[mask], torch.full((10,), 0.1, dtype=torch.float64))
    assert tok[1].sum().item() == pytest.approx(0.8)
    assert tok[0].sum().item() == pytest.approx(0.2)

    assert seq[0, :2].tolist() == pytest.approx([0.25, 0.25])
    assert seq[1].tolist() == pytest.approx([1 / 16] * 8)
    assert seq[0].sum().item() == pytest.approx(0.5) and seq[1].sum().item() == pytest.approx(0.5)

    assert tok[1].sum() > seq[1].sum()  # the long response counts for more under token-mean


def test_seq_mean_token_sum_norm_weight_does_not_depend_on_length_dr_grpo():
    """Dr.GRPO Sec. 3.1: divide by a constant, so every token weighs 1 / (num_seqs * norm_length)."""
    w, mask = _token_weights("seq-mean-token-sum-norm", [1, 3, 7], 7, norm_length=10)
    # 3 sequences x norm_length 10 -> 1/30 per token, whatever the sequence's length
    assert torch.allclose(w[mask], torch.full((11,), 1 / 30, dtype=torch.float64))
    assert torch.all(w[~mask] == 0)


def test_global_counts_make_micro_batches_add_up_to_the_full_batch():
    """Gradient accumulation: with the global counts, summing micro-batch losses = full-batch loss."""
    loss, mask = _random_case(7, 6, 5)
    halves = [(loss[:3], mask[:3]), (loss[3:], mask[3:])]
    n_tok, n_seq = mask.sum(), mask.any(-1).sum()
    for mode in AGG_MODES:
        full = aggregate(loss, mask, mode)
        parts = sum(aggregate(lo, m, mode, num_tokens=n_tok, num_seqs=n_seq) for lo, m in halves)
        torch.testing.assert_close(parts, full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_padding_garbage_changes_nothing(mode):
    loss, mask = _random_case(11, 4, 6)
    outs, grads = [], []
    for fill in (0.0, NAN, math.inf, -1e30):
        leaf = torch.where(mask, loss, torch.full_like(loss, fill)).requires_grad_(True)
        out = aggregate(leaf, mask, mode)
        outs.append(out)
        grads.append(torch.autograd.grad(out, leaf)[0])
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.equal(out, outs[0])
        assert torch.equal(grad, grads[0])
    assert torch.isfinite(outs[0])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_mask_gives_zero_not_nan(mode):
    loss = torch.full((2, 3), NAN, dtype=torch.float64)
    assert aggregate(loss, torch.zeros(2, 3, dtype=torch.bool), mode).item() == 0.0


def test_accepts_a_0_1_mask():
    loss, mask = _hand_case()
    assert aggregate(loss, mask.long(), "token-mean").item() == pytest.approx(2.5)


def test_unknown_mode_lists_the_valid_ones():
    loss, mask = _hand_case()
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean.*seq-mean-token-sum-norm"):
        aggregate(loss, mask, "sum")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"norm_length": 0}, "norm_length"),
        ({"norm_length": -4}, "norm_length"),
        ({"norm_length": 2.5}, "norm_length"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_seqs": -1.0}, "num_seqs"),
        ({"num_seqs": NAN}, "num_seqs"),
    ],
)
def test_invalid_counts_raise_naming_the_parameter(kwargs, name):
    loss, mask = _hand_case()
    mode = "token-mean" if name == "num_tokens" else "seq-mean-token-sum-norm"
    with pytest.raises(ValueError, match=name):
        aggregate(loss, mask, mode, **kwargs)


def test_shape_mismatch_raises():
    loss, mask = _hand_case()
    with pytest.raises(ValueError, match="mask"):
        aggregate(loss, mask[:, :2], "token-mean")
    with pytest.raises(ValueError, match="loss"):
        aggregate(loss[0], mask[0], "token-mean")
