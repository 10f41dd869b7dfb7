"""LoRA (``model.lora``): only the adapters train, the base weights stay as loaded, the reference policy is the
actor with its adapters off, the engine serves what the trainer trained (as an adapter, or merged), and resume is
exact. Real vLLM (the CPU build), real peft."""

from __future__ import annotations

import pytest
import torch

from vapo_pl.lora import LoRAConfig, adapters_disabled, has_adapters

LORA = {"rank": 4, "alpha": 8.0}


def _base_state(module):
    return {k: v.detach().clone() for k, v in module.actor.state_dict().items() if ".lora_" not in k}


def test_only_adapters_train_base_weights_stay_and_no_reference_copy(make_run):
    module, dm, trainer = make_run(algorithm={"kl_loss_coef": 0.1}, engine="vllm")
    module.lora = LoRAConfig(**LORA)
    module.configure_model()
    assert has_adapters(module.actor) and has_adapters(module.critic) and module.ref_model is None
    base = _base_state(module)
    lora0 = {k: v.detach().clone() for k, v in module.actor.state_dict().items() if ".lora_" in k}
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    after = module.actor.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # every base weight exactly as loaded
    assert any(not torch.equal(after[k], v) for k, v in lora0.items())  # the adapters trained
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for m in (module.actor, module.critic) for p in m.parameters() if p.requires_grad}
    assert in_opt == trainable
    names = {n for n, p in module.critic.named_parameters() if p.requires_grad}
    assert any(n.startswith("value_head.") for n in names) and all(
        ".lora_" in n or n.startswith(("value_head.", "logprob_head.")) for n in names)
    assert "actor/kl_ref" in trainer.callback_metrics  # the KL term ran against the adapter-free actor


def test_reference_logprobs_are_the_base_models(make_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from vapo_pl import forward

    module, dm, trainer = make_run(algorithm={"kl_loss_coef": 0.1}, engine="vllm")
    module.lora = LoRAConfig(**LORA)
    trainer.fit(module, dm)
    dm.setup("fit")
    batch = dm.next_batch()
    with torch.no_grad():
        ref = module.reference_logprobs(batch)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        want, _ = forward.policy_logprobs(base, batch, module.temperature, 1024, None)
        trained, _ = forward.policy_logprobs(module.actor, batch, module.temperature, 1024, None)
    mask = batch.response_mask
    assert (ref - want)[mask].abs().max() < 1e-6
    assert (trained - want)[mask].abs().max() > 1e-3  # the adapters do change the policy
    with adapters_disabled(module.actor):
        pass
    assert all(m.active_adapters for m in module.actor.modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_engine_generates_what_the_trained_actor_generates(make_run, sync):
    """After training and a sync, vLLM's greedy output equals the trained actor's (transformers) greedy output."""
    from tests.rollout import hf_greedy

    module, dm, trainer = make_run(engine="vllm")
    module.lora = LoRAConfig(**LORA, sync=sync)
    trainer.fit(module, dm)
    from vapo_pl.rollout.base import Sampling

    prompts = dm.train_prompt_ids[:4]
    greedy = Sampling(n=1, temperature=0.0, max_tokens=12)
    got = [c[0].token_ids for c in dm.engine.generate(prompts, greedy)]
    module.actor.eval()
    want = [hf_greedy(module.actor, p, 12) for p in prompts]
    assert got == want
    assert dm.engine.config.enable_lora == (sync == "adapter")
