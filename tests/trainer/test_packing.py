"""The padding-free forward gives what the padded one gives: log-probs, entropies, values, losses and gradients."""

from __future__ import annotations

import random

import pytest
import torch

from vapo_pl.batch import RolloutBatch
from vapo_pl.packing import pack, place


@pytest.mark.parametrize("row_tokens", [4, 16, 64])
def test_place_fills_rows_without_overlap(row_tokens):
    rng = random.Random(row_tokens)
    lengths = [rng.randint(1, 40) for _ in range(57)]
    row, start, n_rows = place(lengths, row_tokens)
    spans: dict[int, list[tuple[int, int]]] = {}
    for r, s, n in zip(row, start, lengths):
        spans.setdefault(r, []).append((s, s + n))
    assert set(spans) == set(range(n_rows))
    for r, sp in spans.items():
        sp.sort()
        assert sp[0][0] == 0 and all(a[1] == b[0] for a, b in zip(sp, sp[1:]))  # contiguous, no overlap
        assert sp[-1][1] <= row_tokens or len(sp) == 1  # within the budget, or one long sequence alone
    # best-fit decreasing wastes little: at most one partly empty row per distinct remaining capacity
    assert n_rows <= sum(lengths) / row_tokens + len(set(lengths)) + 1


def _batch(tokenizer_vocab: int, seed: int = 0) -> RolloutBatch:
    """12 sequences with prompts of 3-9 and responses of 1-14 tokens, left/right padded as the DataModule does."""
    g = torch.Generator().manual_seed(seed)
    b, p, t = 12, 9, 14
    prompt_len = torch.randint(3, p + 1, (b,), generator=g)
    resp_len = torch.randint(1, t + 1, (b,), generator=g)
    resp_len[0] = t  # one full-width response
    ids = torch.randint(3, tokenizer_vocab, (b, p + t), generator=g)
    am = torch.zeros(b, p + t, dtype=torch.long)
    for i in range(b):
        am[i, p - prompt_len[i] : p + resp_len[i]] = 1
    ids = ids.masked_fill(am == 0, 0)
    rm = torch.arange(t)[None, :] < resp_len[:, None]
    return RolloutBatch(input_ids=ids, attention_mask=am, response_mask=rm,
                        rollout_logprobs=torch.zeros(b, t), scores=torch.rand(b, generator=g),
                        correct=torch.rand(b, generator=g) > 0.5, lengths=resp_len, truncated=resp_len == t,
                        group_index=torch.arange(b) // 3, weight_version=0)


@pytest.fixture
def modules(tiny_model_dir):
    """Two identical modules (actor + critic from the tiny model), one packed and one padded."""
    from vapo_pl import VAPOModule

    out = []
    for packing in (True, False):
        m = VAPOModule(model_path=str(tiny_model_dir), packing=packing, pack_row_tokens=24)
        m.configure_model()
        out.append(m)
    out[1].actor.load_state_dict(out[0].actor.state_dict())
    out[1].critic.load_state_dict(out[0].critic.state_dict())
    return out


def test_packed_forward_equals_padded(modules):
    packed, padded = modules
    batch = _batch(packed.actor.config.vocab_size)
    p = pack(batch.input_ids, batch.attention_mask, batch.response_mask, 24, pad_id=0)
    assert p.input_ids.numel() < batch.input_ids.numel()  # less work than the padded layout
    assert p.input_ids.shape[0] < len(batch)  # several sequences share a row
    mask = batch.response_mask
    lp_a, ent_a = packed.policy_logprobs(packed.actor, batch, with_entropy=True)
    lp_b, ent_b = padded.policy_logprobs(padded.actor, batch, with_entropy=True)
    torch.testing.assert_close(lp_a[mask], lp_b[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_a[mask], ent_b[mask], atol=1e-5, rtol=0)
    v_a, v_b = packed.critic_values(batch), padded.critic_values(batch)
    torch.testing.assert_close(v_a[mask], v_b[mask], atol=1e-5, rtol=0)


def test_packed_losses_and_gradients_equal_padded(modules):
    """A token-mean PPO loss + value loss through both paths: equal losses and equal gradients on every weight."""
    from vapo_pl.algorithms.aggregation import aggregate
    from vapo_pl.algorithms.policy_losses import POLICY_LOSSES
    from vapo_pl.config import AlgorithmConfig

    cfg = AlgorithmConfig()
    batch = _batch(modules[0].actor.config.vocab_size, seed=1)
    mask = batch.response_mask
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(mask.shape, generator=g)
    adv = torch.randn(mask.shape, generator=g)
    returns = torch.randn(mask.shape, generator=g)
    losses, grads = [], []
    for m in modules:
        m.actor.zero_grad()
        m.critic.zero_grad()
        logp, _ = m.policy_logprobs(m.actor, batch)
        pg = POLICY_LOSSES.get("ppo")(logp, old, adv, mask, cfg.policy_loss_params())
        loss = aggregate(pg.loss, mask, "token-mean", num_tokens=mask.sum().float())
        v = m.critic_values(batch)
        loss = loss + (((v - returns) ** 2) * mask).sum() / mask.sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in [*m.actor.named_parameters(), *m.critic.named_parameters()]
                      if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packing", [True, False])
def test_packing_switch_chooses_the_forward(make_run, monkeypatch, packing):
    """``packing: false`` keeps the padded forward: no batch is packed in a whole RL step; ``true`` packs each
    forward (old values, update) of the step."""
    import vapo_pl.forward

    packed = []
    real = vapo_pl.forward.pack
    monkeypatch.setattr(vapo_pl.forward, "pack", lambda *a, **k: packed.append(1) or real(*a, **k))
    module, dm, trainer = make_run(trainer={"max_steps": 1})
    module.packing = packing
    trainer.fit(module, datamodule=dm)
    assert module.rl_step == 1
    assert (len(packed) > 0) is packing


class _Recorder:
    def __init__(self):
        self.metrics = []

    def __call__(self):  # a Lightning callback built on the fly
        import lightning.pytorch as pl

        rec = self

        class CB(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                rec.metrics.append(dict(outputs["metrics"]))
                rec.entropy = outputs["entropy"]

        return CB()


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_one_update_per_batch_reuses_the_update_forward(make_run, estimator):
    """One PPO epoch over one minibatch: the old log-probs are the update pass's own (ratio exactly 1), the separate
    actor forward is skipped (half the actor forwards), and the weights after the step are those of the two-pass
    path. With a critic on Monte-Carlo targets (gae, lambda_critic 1) the same holds for its old values: half the
    critic forwards, the same critic weights, value loss and explained variance."""
    results = []
    for reuse in (True, False):
        rec = _Recorder()
        module, dm, trainer = make_run(algorithm={"estimator": estimator, "minibatch_size": 16, "micro_batch_size": 4},
                                       trainer={"max_steps": 1, "callbacks": [rec()]})
        module.reuse_update_forward = reuse
        calls = []
        critic_calls = []
        real = module.policy_logprobs
        real_values = module.critic_values

        def counting(model, *args, **kwargs):
            calls.append(model is module.actor)
            return real(model, *args, **kwargs)

        def counting_values(*args, **kwargs):
            critic_calls.append(1)
            return real_values(*args, **kwargs)

        module.policy_logprobs = counting
        module.critic_values = counting_values
        trainer.fit(module, datamodule=dm)
        calls = [c for c in calls if c]
        assert module.one_update_per_batch(16) is reuse
        assert module.values_from_update(16) is (reuse and estimator == "gae")
        critic = {k: v.clone() for k, v in module.critic.state_dict().items()} if module.critic is not None else {}
        results.append((len(calls), rec.metrics[0], {k: v.clone() for k, v in module.actor.state_dict().items()},
                        rec.entropy, len(critic_calls), critic))
    (n_reuse, m_reuse, w_reuse, ent_reuse, nc_reuse, c_reuse), (n_two, m_two, w_two, ent_two, nc_two, c_two) = results
    assert n_reuse == 4 and n_two == 8  # 4 micro-batches: one forward each instead of two
    if estimator == "gae":
        assert nc_reuse == 4 and nc_two == 8
        for name in ("critic/value_loss", "critic/explained_var", "critic/values_mean", "actor/advantages_mean"):
            assert m_reuse[name] == pytest.approx(m_two[name], abs=1e-6), name
        # the separate forward's values differ from the update's in the last bits (other micro-batches), and Adam's
        # first step (about lr x sign of the gradient) magnifies that for gradients near 0: 1e-5 with lr 1e-3
        for name in c_reuse:
            torch.testing.assert_close(c_reuse[name], c_two[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    else:
        assert nc_reuse == nc_two == 0
    assert m_reuse["actor/ratio_mean"] == 1.0 and m_reuse["actor/ratio_max"] == 1.0
    assert m_reuse["actor/pg_clipfrac_low"] == 0.0 and m_reuse["actor/pg_clipfrac_high"] == 0.0
    assert ent_reuse is not None and torch.allclose(ent_reuse, ent_two, atol=1e-6)
    assert m_reuse["actor/entropy"] == pytest.approx(m_two["actor/entropy"], abs=1e-6)
    for name in w_reuse:
        torch.testing.assert_close(w_reuse[name], w_two[name], atol=1e-6, rtol=0, msg=name)


def test_several_minibatches_keep_the_separate_forward(make_run):
    module, dm, trainer = make_run(algorithm={"minibatch_size": 8}, trainer={"max_steps": 1})
    module.configure_model()
    assert not module.one_update_per_batch(16) and not module.values_from_update(16)
    module2, _, _ = make_run(algorithm={"minibatch_size": 16, "ppo_epochs": 2})
    assert not module2.one_update_per_batch(16)


def test_critic_targets_that_need_values_keep_the_separate_critic_forward(make_run):
    """lambda_critic < 1: the critic's targets are built from its old values, so they need their own forward; the
    actor's old log-probs still come from the update."""
    module, _, _ = make_run(algorithm={"minibatch_size": 16, "lambda_critic": 0.95})
    module.configure_model()
    assert module.one_update_per_batch(16) and not module.values_from_update(16)
    module2, _, _ = make_run(algorithm={"minibatch_size": 16})
    module2.configure_model()
    assert module2.values_from_update(16)
