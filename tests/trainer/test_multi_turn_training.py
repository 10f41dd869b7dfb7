"""Training on multi-turn episodes (real vLLM rollouts, the CLI-free Trainer of ``make_run``): observation tokens get
zero gradient from every loss term, turn rewards reach the advantages, and the packed and unpacked forwards agree on
episodes with observation holes."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.test_multi_turn import Countdown  # noqa: F401 - the environment, by import path below
from vapo_pl import VAPOModule
from vapo_pl.batch import RolloutBatch

pytestmark = pytest.mark.vllm

DATA = {"environment": {"name": "tests.rollout.test_multi_turn.Countdown"}, "reward": [], "max_response_length": 64,
            "episode": {"max_turns": 4, "max_total_tokens": 96, "max_turn_tokens": 5}}


class GradientProbe(VAPOModule):
    """Records, for every training forward, the largest |d loss / d output| at observation and at policy positions."""

    seen: list[tuple[str, float, float]]

    def _watch(self, name: str, out: torch.Tensor, batch: RolloutBatch) -> None:
        if torch.is_grad_enabled() and out.requires_grad:
            obs, pol = batch.observation_mask, batch.response_mask
            out.register_hook(lambda g: self.seen.append((name, float(g[obs].abs().max()) if obs.any() else 0.0,
                                                          float(g[pol].abs().max()))))

    def policy_logprobs(self, model, batch, with_entropy=False):
        logp, ent = super().policy_logprobs(model, batch, with_entropy)
        self._watch("actor", logp, batch)
        return logp, ent

    def critic_values(self, batch):
        values = super().critic_values(batch)
        self._watch("critic", values, batch)
        return values


def test_observation_tokens_get_no_gradient_from_any_loss_term(make_run):
    """Policy loss, positive-example NLL, KL loss to the reference, value loss: all on, and every one reads
    ``response_mask`` only. The gradient at the observation positions is exactly zero, at policy positions not."""
    module, dm, trainer = make_run(
        algorithm={"estimator": "gae", "nll_coef": 0.5, "kl_loss_coef": 0.1, "minibatch_size": 8, "micro_batch_size": 4},
        data=dict(DATA, samples_per_prompt=2), engine="vllm", module_cls=GradientProbe)
    module.seen = []
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    names = {n for n, _, _ in module.seen}
    assert names == {"actor", "critic"}
    assert all(obs == 0.0 for _, obs, _ in module.seen), module.seen
    assert all(pol > 0.0 for _, _, pol in module.seen)


def test_turn_rewards_are_placed_on_each_turns_last_policy_token(make_run):
    module, dm, _ = make_run(data=dict(DATA, samples_per_prompt=2), engine="vllm")
    dm.connect(module)
    dm.setup("fit")
    batch = dm.next_batch()
    rewards = module.token_rewards(batch)
    assert torch.allclose(rewards.sum(1), batch.scores)  # the episode's return, whatever the split
    turn_ends = batch.turn_rewards != 0
    assert (batch.response_mask[turn_ends]).all()
    assert torch.equal(rewards[turn_ends], batch.turn_rewards[turn_ends])
    multi = [j for j, m in enumerate(batch.metadata) if m["turns"] > 1]
    assert multi and all(turn_ends[j].sum() == batch.metadata[j]["turns"] for j in multi)


def test_packed_and_padded_forwards_agree_on_episodes_with_observation_holes(make_run):
    """Packing places every real token (observations included) so that the policy tokens' log-probs and values equal
    the padded forward's."""
    module, dm, _trainer = make_run(data=dict(DATA, samples_per_prompt=2), engine="vllm")
    dm.connect(module)
    dm.setup("fit")
    batch = dm.next_batch()
    module.configure_model()
    from vapo_pl import forward

    for row_tokens in (None, 64):
        logp, _ = forward.policy_logprobs(module.actor, batch, 1.0, 1024, row_tokens)
        values = forward.critic_values(module.critic, batch, row_tokens)
        if row_tokens is None:
            ref_logp, ref_values = logp, values
    mask = batch.token_mask
    assert torch.allclose(logp[mask], ref_logp[mask], atol=1e-5)
    assert torch.allclose(values[mask], ref_values[mask], atol=1e-5)
    assert batch.observation_mask.any()
