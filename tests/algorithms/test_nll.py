"""Tests for vapo_pl/algorithms/nll.py: VAPO's positive-example LM loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vapo_pl.algorithms.logprob import logprobs_from_logits
from vapo_pl.algorithms.nll import positive_example_nll

NAN = math.nan


def _hand_batch():
    # Lengths 2, 1, 3; responses 0 and 2 are correct, response 1 is wrong.
    logp = torch.tensor([[-1.0, -2.0, NAN], [-3.0, NAN, NAN], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    correct = torch.tensor([True, False, True])
    return logp, mask, correct


def test_hand_worked_value_and_gradient():
    # Tokens of correct responses: -1, -2 (row 0) and -0.5 x 3 (row 2): sum -4.5 over 5 tokens.
    # Loss = -(-4.5)/5 = 0.9. Gradient: -1/5 on each of those 5 tokens, 0 on the wrong response
    # and on padding (which holds NaN). A sequence-level mean would give (1.5 + 0.5)/2 = 1.0 instead.
    logp, mask, correct = _hand_batch()
    logp.requires_grad_()
    loss = positive_example_nll(logp, mask, correct)
    assert loss.item() == pytest.approx(0.9, abs=1e-12)
    loss.backward()
    expected = torch.tensor([[-0.2, -0.2, 0.0], [0.0, 0.0, 0.0], [-0.2, -0.2, -0.2]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


def test_no_correct_response_gives_zero_with_graph():
    logp, mask, _ = _hand_batch()
    logp.requires_grad_()
    loss = positive_example_nll(logp, mask, torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # must not raise "does not require grad"
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_num_tokens_overrides_the_local_count():
    # Same 5 tokens, summing to -4.5, but normalised by a global count of 9: 4.5/9 = 0.5.
    logp, mask, correct = _hand_batch()
    assert positive_example_nll(logp, mask, correct, num_tokens=9).item() == pytest.approx(0.5, abs=1e-12)
    assert positive_example_nll(logp, mask, correct, num_tokens=torch.tensor(9.0)).item() == pytest.approx(
        0.5
    )


@pytest.mark.parametrize("seed", range(5))
def test_matches_cross_entropy_on_correct_tokens(seed):
    # The loss is the mean cross-entropy of the correct responses' tokens; check it end to end
    # from logits against F.cross_entropy, and compare gradients w.r.t. the logits.
    g = torch.Generator().manual_seed(seed)
    b, t, v = 5, 6, 11
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.7
    correct = torch.rand(b, generator=g) < 0.5
    correct[seed % b] = True
    mask[seed % b, 0] = True
    loss = positive_example_nll(logprobs_from_logits(logits, labels, chunk_size=4), mask, correct)
    selected = mask & correct[:, None]
    ref = F.cross_entropy(logits[selected], labels[selected])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-10)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


def test_invalid_arguments():
    logp, mask, correct = _hand_batch()
    with pytest.raises(ValueError, match="correct"):
        positive_example_nll(logp, mask, correct.float())
    with pytest.raises(ValueError, match="correct"):
        positive_example_nll(logp, mask, correct[:2])
    with pytest.raises(ValueError, match="mask"):
        positive_example_nll(logp, mask[:, :2], correct)
    with pytest.raises(ValueError, match="num_tokens"):
        positive_example_nll(logp, mask, correct, num_tokens=0)
