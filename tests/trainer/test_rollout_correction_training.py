"""The rollout correction in the RL step: the trainer's gradient at each policy token is the TIS/MIS weight times the
uncorrected one, and every step logs the sampler/trainer mismatch metrics (real vLLM rollouts)."""

from __future__ import annotations

import pytest
import torch

from vapo_pl import VAPOModule
from vapo_pl.algorithms.rollout_correction import ROLLOUT_CORRECTIONS
from vapo_pl.batch import PreparedBatch


class MetricsProbe(VAPOModule):
    logged: list[dict[str, float]]

    def log_metrics(self, metrics, batch=None):
        self.logged.append(dict(metrics))
        super().log_metrics(metrics, batch)


@pytest.mark.vllm
def test_every_step_logs_the_mismatch_and_the_correction(make_run):
    module, dm, trainer = make_run(algorithm={"estimator": "grpo", "rollout_correction": "token_tis"},
                                   engine="vllm", module_cls=MetricsProbe)
    module.logged = []
    trainer.fit(module, dm)
    assert len(module.logged) == 2
    for m in module.logged:
        # fp32 engine and fp32 trainer: the same distribution up to kernels, so the figures are small but there
        assert 0 <= m["mismatch/logp_abs_diff_mean"] <= m["mismatch/logp_abs_diff_max"] < 0.05
        assert 0 <= m["mismatch/kl_k3"] < 1e-3 and m["mismatch/ratio_outside_share"] == 0
        assert m["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=0.05)
        assert "rollout_correction/truncated_share" in m


@pytest.mark.parametrize("name", ["token_tis", "seq_mis"])
def test_the_update_scales_each_tokens_gradient_by_its_weight(make_run, name):
    """One micro-batch of a real rollout, its sampler log-probs moved by known amounts: the gradient of the actor
    loss at the policy log-probs is exactly the correction's weight times the gradient with the correction off."""
    module, dm, _ = make_run(algorithm={"estimator": "grpo", "nll_coef": 0.0, "rollout_correction": name,
                                        "mis_low": 0.8, "mis_high": 1.25})
    dm.connect(module)
    dm.setup("fit")
    module.configure_model()
    batch = dm.next_batch()
    prep = module.prepare(batch)
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(batch.rollout_logprobs.shape, generator=g) * (0.5 if name == "token_tis" else 0.05)
    batch.rollout_logprobs = torch.where(batch.response_mask, prep.old_logp + shift, batch.rollout_logprobs)
    adv = module.compute_advantages(batch, module.token_rewards(batch), None)
    grads = {}

    def capture(key):
        def policy_logprobs(model, mb, with_entropy=False):
            logp, ent = VAPOModule.policy_logprobs(module, model, mb, with_entropy)
            logp.register_hook(lambda gr: grads.__setitem__(key, gr.clone()))
            return logp, ent
        return policy_logprobs

    idx = torch.arange(len(batch))
    n_tok = batch.response_mask.sum().float()
    for key in (name, "none"):
        module.algorithm.rollout_correction = key
        module.policy_logprobs = capture(key)
        loss, _, stats = module.updater.actor_loss(batch, PreparedBatch(old_logp=prep.old_logp), adv, idx,
                                                   batch.response_mask, n_tok, n_tok, len(batch))
        loss.backward()
        assert ("rollout_correction/weight_mean" in stats) == (key != "none")
    weights = ROLLOUT_CORRECTIONS.get(name)(prep.old_logp, batch.rollout_logprobs, batch.response_mask,
                                            module.algorithm.correction_params()).weights
    assert torch.allclose(grads[name], weights * grads["none"], atol=1e-9)
    on = weights[batch.response_mask]
    assert (on != 1).any() and (grads["none"][batch.response_mask] != 0).any()
