"""Tests for vapo_pl/algorithms/logprob.py: chunked log-probs (with autograd) and entropies."""

from __future__ import annotations

import math

import pytest
import torch

from vapo_pl.algorithms.logprob import entropy_from_logits, logprobs_from_logits

# (B, T, V, chunk_size): chunk sizes that divide B*T, that don't, of 1 row, and larger than B*T.
SHAPES = [(2, 3, 5, 4), (3, 7, 11, 5), (4, 6, 50, 8), (2, 5, 13, 100), (1, 9, 3, 1), (2, 4, 1, 3)]


def _reference_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def _reference_entropy(logits):
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_hand_worked_values():
    # Row 0: logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4) = -0.28768...
    # Row 1: same logits at T = 2 -> [0, ln 3 / 2] = [0, ln sqrt(3)] -> softmax [1, sqrt3] / (1 + sqrt3);
    #        label 0 -> -ln(1 + sqrt 3) = -1.00505...
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(
        math.log(0.75), abs=1e-14
    )
    got = logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0).item()
    assert got == pytest.approx(-math.log(1 + math.sqrt(3.0)), abs=1e-14)
    # Entropy of [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.34657 + 0.21576 = 0.56233
    expected_h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(expected_h, abs=1e-14)
    # At T = 2 the distribution is flatter, so the entropy is higher; p0 = 1 / (1 + sqrt 3)
    p0 = 1 / (1 + math.sqrt(3.0))
    expected_h2 = -(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0))
    assert entropy_from_logits(logits, temperature=2.0).item() == pytest.approx(expected_h2, abs=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_match_log_softmax_reference(seed, shape, temperature):
    b, t, v, chunk = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, v, (b, t), generator=g)
    got = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk)
    assert got.shape == (b, t) and got.dtype == torch.float64
    torch.testing.assert_close(got, _reference_logprobs(logits, labels, temperature), rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_match_unchunked(seed, shape, temperature):
    b, t, v, chunk = shape
    g = torch.Generator().manual_seed(100 + seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    upstream = torch.randn(b, t, generator=g, dtype=torch.float64)  # arbitrary dL/dlogp
    got = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=chunk)
    (grad_got,) = torch.autograd.grad(got, logits, upstream)
    ref = _reference_logprobs(logits, labels, temperature)
    (grad_ref,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(grad_got, grad_ref, rtol=0, atol=1e-12)


def test_gradcheck_against_finite_differences():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, labels, 1.3, 4), (logits,))


def test_non_contiguous_slice_of_model_output():
    # Trainers take logits[:, prompt_len - 1 : -1]: strides that cannot be flattened to (N, V).
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 8, 9, generator=g, dtype=torch.float64, requires_grad=True)
    logits = full[:, 2:-1]
    assert not logits.is_contiguous()
    labels = torch.randint(0, 9, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = logprobs_from_logits(logits, labels, temperature=0.9, chunk_size=4)
    ref = _reference_logprobs(logits, labels, 0.9)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    (grad_got,) = torch.autograd.grad(got, full, upstream)
    (grad_ref,) = torch.autograd.grad(ref, full, upstream)
    torch.testing.assert_close(grad_got, grad_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=4), _reference_entropy(logits.detach()), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("vocab", [1, 2, 7, 1000])
def test_uniform_logits_give_log_vocab(vocab):
    # softmax of equal logits is 1/V everywhere: log-prob -ln V, entropy ln V (the maximum).
    logits = torch.full((2, 3, vocab), 2.5, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(0))
    expected = torch.full((2, 3), math.log(vocab), dtype=torch.float64)
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels, chunk_size=4), -expected, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_matches_reference(seed, shape):
    b, t, v, chunk = shape
    logits = torch.randn(b, t, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    got = entropy_from_logits(logits, chunk_size=chunk)
    assert got.shape == (b, t)
    torch.testing.assert_close(got, _reference_entropy(logits), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=chunk, temperature=1.7),
        _reference_entropy(logits / 1.7),
        rtol=0,
        atol=1e-10,
    )
    # Property: 0 <= H <= ln V.
    assert bool((got >= -1e-12).all()) and bool((got <= math.log(v) + 1e-12).all())


def test_minus_inf_logits_are_zero_probability():
    # [0, 0, -inf] is uniform over two tokens: H = ln 2, log-prob of token 1 = -ln 2.
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]], dtype=torch.float64, requires_grad=True)
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(2.0), abs=1e-14)
    logp = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(-math.log(2.0), abs=1e-14)
    # d logp_1 / d z = onehot(1) - p = [-1/2, 1/2, 0]; the -inf entry gets a finite 0.
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    torch.testing.assert_close(
        grad, torch.tensor([[[-0.5, 0.5, 0.0]]], dtype=torch.float64), rtol=0, atol=1e-14
    )


def test_garbage_row_changes_no_other_row():
    # Rows are independent: NaN / huge logits at a padded position (row 4 of 6, inside the second
    # chunk of size 3) leave every other row, and every other row's gradient, untouched.
    g = torch.Generator().manual_seed(11)
    clean = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    dirty = clean.clone()
    dirty[1, 1] = torch.tensor([math.nan, 1e300, -1e300, math.inf, 0.0, 3.0], dtype=torch.float64)
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 1] = False
    out = {}
    for name, x in (("clean", clean), ("dirty", dirty)):
        x = x.clone().requires_grad_()
        logp = logprobs_from_logits(x, labels, chunk_size=3)
        (grad,) = torch.autograd.grad(torch.where(keep, logp, 0).sum(), x)
        out[name] = (logp.detach(), grad, entropy_from_logits(x, chunk_size=3))
    for a, b in zip(out["clean"], out["dirty"]):
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 5, 40, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 5), generator=g)
    got = logprobs_from_logits(logits, labels, temperature=0.8, chunk_size=3)
    assert got.dtype == torch.float32
    # Reference: the same (rounded) logit values, upcast before any arithmetic.
    ref = _reference_logprobs(logits.detach().double(), labels, 0.8)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    got.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == dtype
    h = entropy_from_logits(logits, chunk_size=3)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), _reference_entropy(logits.detach().double()), rtol=0, atol=1e-5)


def _saved_bytes_besides(x, fn):
    """Bytes of the tensors autograd saves for backward, excluding those sharing x's storage."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    own = x.untyped_storage().data_ptr()
    return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() != own)


def test_autograd_saves_no_full_vocab_copy():
    # The memory claim, checked on the graph: besides the logits themselves only O(N) tensors are
    # kept for backward, even with temperature != 1. The naive expression keeps an (N, V) copy,
    # which shows the measurement can fail.
    b, t, v = 2, 16, 4096
    logits = torch.randn(b, t, v, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    full_copy = b * t * v * 4
    chunked = _saved_bytes_besides(logits, lambda x: logprobs_from_logits(x, labels, 0.7, chunk_size=8))
    naive = _saved_bytes_besides(logits, lambda x: _reference_logprobs(x, labels, 0.7))
    assert chunked <= 3 * b * t * 8  # labels (int64) + one logsumexp and one output per row
    assert naive >= full_copy


def test_entropy_has_no_grad_and_logprobs_do():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert not entropy_from_logits(logits).requires_grad
    assert logprobs_from_logits(logits, labels).requires_grad
    assert not logprobs_from_logits(logits.detach(), labels).requires_grad


def test_invalid_arguments_raise_naming_the_parameter():
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_from_logits(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=-3)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels[:, :2])
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels - 100)  # e.g. an HF ignore index left in place
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels + 5)
    with pytest.raises(ValueError, match="logits"):
        logprobs_from_logits(torch.zeros(2, 3, 5, dtype=torch.long), labels)
