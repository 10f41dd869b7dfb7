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
    layers = [m for m in module.actor.modules() if hasattr(m, "lora_A")]
    with adapters_disabled(module.actor):
        assert layers and all(m.disable_adapters for m in layers)
    assert not any(m.disable_adapters for m in layers)  # switched back on after the block


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


def test_resume_is_bit_identical_with_lora(make_run, tmp_path):
    """4 steps straight against 2 steps, a checkpoint, and 2 more after resuming: the same losses and the same adapter
    and optimizer state, bit for bit (the engine gets the restored adapter)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.trainer.test_module import Recorder
    from tests.trainer.test_resume import _losses

    def run(steps, callbacks, ckpt_path=None, **trainer):
        module, dm, tr = make_run(engine="vllm", algorithm={"kl_loss_coef": 0.1},
                                  trainer=dict(max_steps=steps, callbacks=callbacks, **trainer))
        module.lora = LoRAConfig(**LORA)
        tr.fit(module, dm, ckpt_path=ckpt_path)
        return module, tr

    straight = Recorder()
    m_straight, _ = run(4, [straight])
    first, second = Recorder(), Recorder()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_last=True)
    run(2, [first, ckpt], enable_checkpointing=True)
    m_resumed, tr = run(4, [second], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert tr.global_step == 4
    assert _losses(first) + _losses(second) == _losses(straight)
    a, b = m_straight.actor.state_dict(), m_resumed.actor.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_the_adapter_and_the_merged_model(make_run, tmp_path):
    """The adapter in peft's format loads with peft onto the base model; the merged model loads in transformers and
    vLLM; all three give the trained actor's logits / greedy output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.rollout import hf_greedy
    from vapo_pl.rollout.base import Sampling
    from vapo_pl.rollout.vllm_engine import VLLMEngine

    module, dm, trainer = make_run(engine="vllm")
    module.lora = LoRAConfig(**LORA)
    trainer.fit(module, dm)
    out = tmp_path / "export"
    module.export_actor(str(out), merged=True)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    ids = torch.tensor([dm.train_prompt_ids[0]])
    module.actor.eval()
    with torch.no_grad():
        want = module.actor(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(module.model_path, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    prompts = dm.train_prompt_ids[:3]
    engine = VLLMEngine(out / "merged", dtype="float32", max_model_len=64, enforce_eager=True)
    greedy = Sampling(n=1, temperature=0.0, max_tokens=10)
    assert [c[0].token_ids for c in engine.generate(prompts, greedy)] == [hf_greedy(module.actor, p, 10)
                                                                           for p in prompts]
