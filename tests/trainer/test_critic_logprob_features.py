"""The critic's log-prob head (``model.critic_logprob_features``): the state features, their placement in the packed
and padded layouts, causality (the value of s_t never reads token t's log-prob), and a training run that uses it."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.trainer.test_packing import _batch
from vapo_pl.critic import logprob_state_features


def _loop_features(logprobs, mask):
    b, t = logprobs.shape
    out = torch.zeros(b, t, 3)
    for i in range(b):
        seen = []
        for j in range(t):
            if not mask[i, j]:
                continue
            if seen:
                out[i, j] = torch.tensor([min(seen), sum(seen) / len(seen), seen[-1]]) / 5
            seen.append(max(float(logprobs[i, j]), -20.0))
    return out


def test_state_features_match_a_loop():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(5, 9, generator=g) * 30  # some below the -20 floor
    mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 4, 7, 2])[:, None]
    torch.testing.assert_close(logprob_state_features(lp, mask), _loop_features(lp, mask), atol=1e-6, rtol=0)


@pytest.fixture
def feature_modules(tiny_model_dir):
    """Packed and padded modules with the same critic, log-prob head included."""
    from vapo_pl import VAPOModule

    out = []
    for packing in (True, False):
        m = VAPOModule(model_path=str(tiny_model_dir), packing=packing, pack_row_tokens=24,
                       critic_logprob_features=True)
        m.configure_model()
        out.append(m)
    out[1].critic.load_state_dict(out[0].critic.state_dict())
    return out


def _with_logprobs(batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    batch.rollout_logprobs = (-torch.rand(batch.response_mask.shape, generator=g) * 6).masked_fill(
        ~batch.response_mask, 0)
    return batch


def test_packed_and_padded_values_and_gradients_agree(feature_modules):
    batch = _with_logprobs(_batch(feature_modules[0].actor.config.vocab_size))
    mask = batch.response_mask
    values, grads = [], []
    for m in feature_modules:
        assert m.critic.uses_logprob_features
        m.critic.zero_grad()
        v = m.critic_values(batch)
        ((v * mask) ** 2).sum().backward()
        values.append(v.detach())
        grads.append({n: p.grad.clone() for n, p in m.critic.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[0][mask], values[1][mask], atol=1e-5, rtol=0)
    assert any(n.startswith("logprob_head") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packing", [0, 1])
def test_value_of_a_state_does_not_read_its_own_tokens_logprob(feature_modules, packing):
    m = feature_modules[packing]
    batch = _with_logprobs(_batch(m.actor.config.vocab_size, seed=4))
    row, k = 0, 5  # row 0 has a full-width response
    before = m.critic_values(batch).detach()
    batch.rollout_logprobs[row, k] -= 7.0
    after = m.critic_values(batch).detach()
    torch.testing.assert_close(after[row, : k + 1], before[row, : k + 1], atol=0, rtol=0)  # s_0 .. s_k
    assert (after[row, k + 1 :] - before[row, k + 1 :]).abs().max() > 1e-4  # s_{k+1} on read it
    others = torch.arange(len(batch)) != row
    torch.testing.assert_close(after[others], before[others], atol=0, rtol=0)


def test_a_run_trains_the_logprob_head(make_run):
    from vapo_pl import VAPOModule

    module, dm, trainer = make_run(module_cls=functools.partial(VAPOModule, critic_logprob_features=True),
                                   algorithm=dict(estimator="gae"))
    module.configure_model()
    start = {n: p.detach().clone() for n, p in module.critic.logprob_head.named_parameters()}
    trainer.fit(module, dm)
    assert module.rl_step == 2
    moved = [n for n, p in module.critic.logprob_head.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert moved == list(start)


def test_a_critic_without_the_head_is_refused(tiny_model_dir):
    from vapo_pl import VAPOModule
    from vapo_pl.critic import ValueModel

    class Plain(VAPOModule):
        def build_critic(self):
            return ValueModel.from_pretrained(self.model_path)

    with pytest.raises(ValueError, match="critic_logprob_features"):
        Plain(model_path=str(tiny_model_dir), critic_logprob_features=True).configure_model()
    with pytest.raises(ValueError, match="critic_logprob_features"):
        VAPOModule(model_path=str(tiny_model_dir), critic_logprob_features="yes")
