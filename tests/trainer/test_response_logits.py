"""The training forward computes logits only where a response token is predicted: never over prompt tokens or
padding, packed or padded, and with ``checkpoint_head`` at most one chunk of them at a time. Log-probs, entropies and
gradients equal a naive full-logits reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.trainer.test_packing import _batch
from vapo_pl.forward import policy_logprobs


@pytest.fixture
def actor(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def _reference(model, batch, temperature):
    """Full logits over the padded batch, log-softmax, gather: the textbook computation."""
    from vapo_pl.forward import position_ids

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask), use_cache=False).logits
    p = batch.prompt_width
    logp_all = torch.log_softmax(logits[:, p - 1 : -1].float() / temperature, -1)
    logp = logp_all.gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    mask = batch.response_mask
    return logp.masked_fill(~mask, 0), ent.masked_fill(~mask, 0)


class _VocabWideTensors(TorchDispatchMode):
    """Records the leading size of every tensor an op produces whose last dimension is the vocabulary, except the
    output head's weight seen transposed ((hidden, vocab))."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):
                self.rows.append(t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("row_tokens", [24, 8, None], ids=["packed", "packed_long_alone", "padded"])
@pytest.mark.parametrize("checkpoint_head", [False, True])
def test_log_probs_entropies_and_gradients_equal_full_logits(actor, row_tokens, checkpoint_head):
    batch = _batch(actor.config.vocab_size, seed=3)
    mask = batch.response_mask
    ref_lp, ref_ent = _reference(actor, batch, 0.7)
    (ref_lp * torch.linspace(-1, 1, ref_lp.numel()).view_as(ref_lp)).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in actor.named_parameters()}
    actor.zero_grad()
    lp, ent = policy_logprobs(actor, batch, 0.7, chunk_size=5, row_tokens=row_tokens, with_entropy=True,
                              checkpoint_head=checkpoint_head)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
    for n, p in actor.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("row_tokens", [24, None], ids=["packed", "padded"])
@pytest.mark.parametrize("checkpoint_head", [False, True])
def test_no_logits_for_prompt_tokens_forward_or_backward(actor, row_tokens, checkpoint_head):
    vocab = actor.config.vocab_size
    cfg = actor.config
    assert vocab not in {cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, 9, 14, 23, 24}
    batch = _batch(vocab, seed=4)
    n_resp = int(batch.response_mask.sum())
    n_prompt = int(batch.attention_mask.sum()) - n_resp
    assert n_prompt > n_resp // 2  # a forward over prompts would show
    chunk = 4
    with _VocabWideTensors(vocab, cfg.hidden_size) as seen:
        lp, _ = policy_logprobs(actor, batch, 1.0, chunk_size=chunk, row_tokens=row_tokens,
                                checkpoint_head=checkpoint_head)
        lp.sum().backward()
    assert seen.rows, "the spy saw no vocabulary-wide tensor"
    assert max(seen.rows) <= (chunk if checkpoint_head else n_resp)
    assert sum(1 for r in seen.rows if r > n_resp) == 0


def test_sdpa_never_gets_a_mask_wider_than_a_row(actor, tiny_model_dir, monkeypatch):
    """Sequences longer than ``row_tokens`` run alone, unpadded: SDPA gets no mask for them (causal), and every mask
    it gets is at most ``row_tokens`` wide, so mask memory does not grow with the square of a long sequence. Values
    and log-probs still equal the padded forward's."""
    from vapo_pl.critic import ValueModel
    from vapo_pl.forward import critic_values

    assert actor.config._attn_implementation == "sdpa"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks: list[tuple | None] = []

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    batch = _batch(actor.config.vocab_size, seed=5)
    seq = [p + r for p, r in zip(batch.layout.prompt_lens, batch.layout.response_lens)]
    row_tokens = 12
    assert sum(n > row_tokens for n in seq) >= 3 and sum(n <= row_tokens for n in seq) >= 2
    ref, _ = policy_logprobs(actor, batch, 1.0, chunk_size=64, row_tokens=None)
    critic = ValueModel.from_pretrained(str(tiny_model_dir))
    ref_v = critic_values(critic, batch, None)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lp, _ = policy_logprobs(actor, batch, 1.0, chunk_size=64, row_tokens=row_tokens)
    v = critic_values(critic, batch, row_tokens)
    assert masks and any(m is None for m in masks)  # the long ones: causal, no mask
    assert all(m is None or m[-1] <= row_tokens for m in masks), masks
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    mask = batch.response_mask  # the padded forward leaves values at padding unset
    torch.testing.assert_close(v[mask], ref_v[mask], atol=1e-5, rtol=0)
