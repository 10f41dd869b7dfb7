"""Sharded construction (``vapo_pl.loading``): models built with their parameters on the meta device, sharded by
FSDP2, then filled from the safetensors files, equal the models ``from_pretrained`` builds, the critic's seeded head
included. One process with a real gloo group of size 1 (two ranks run in ``tests/launch`` and
``benchmarks/load_memory.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


def _full(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _built(model_path: str, empty: bool, mesh, **kwargs):
    from vapo_pl import VAPOModule
    from vapo_pl.loading import has_meta_parameters, materialize
    from vapo_pl.parallel import fully_shard_model

    module = VAPOModule(model_path=model_path, **kwargs)
    module._build_empty = empty
    module._build_models()
    reads: list[int] = []
    for m in (module.actor, module.critic):
        assert has_meta_parameters(m) == empty
        fully_shard_model(m, mesh)
        materialize(m, torch.device("cpu"), on_read=lambda key, n: reads.append(n))
        assert not has_meta_parameters(m)
    return module, sum(reads)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_then_shards_equals_from_pretrained(mesh, tiny_model_dir, tiny_tied_model_dir, tied):
    path = str(tiny_tied_model_dir if tied else tiny_model_dir)
    whole, _ = _built(path, False, mesh)
    empty, read = _built(path, True, mesh)
    for name in ("actor", "critic"):
        a, b = _full(getattr(whole, name)), _full(getattr(empty, name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # the critic's value head is not read from the checkpoint: it is drawn from the seed, as in a whole build
    n_head = sum(p.numel() for p in empty.critic.value_head.parameters())
    n_all = sum(p.numel() for m in (empty.actor, empty.critic) for p in m.parameters())
    assert read == (n_all - n_head) * 4  # float32 files: every other parameter was read exactly once
    ids = torch.randint(2, 20, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(empty.actor(input_ids=ids).logits, whole.actor(input_ids=ids).logits)
        torch.testing.assert_close(empty.critic(ids, None), whole.critic(ids, None))


def test_reward_model_critic_without_a_bias_gets_a_zero_bias(mesh, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(tiny_model_dir), num_labels=1)
    torch.manual_seed(5)
    rm = AutoModelForSequenceClassification.from_config(config)
    assert rm.score.bias is None
    rm.save_pretrained(tmp_path / "rm")
    kwargs = {"critic_path": str(tmp_path / "rm"), "critic_init": "reward_model"}
    whole, _ = _built(str(tiny_model_dir), False, mesh, **kwargs)
    empty, _ = _built(str(tiny_model_dir), True, mesh, **kwargs)
    a, b = _full(whole.critic), _full(empty.critic)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(b["value_head.weight"], rm.score.weight.detach())
    assert (b["value_head.bias"] == 0).all()


def test_a_parameter_missing_from_the_checkpoint_is_named(mesh, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.norm.weight"):
        _built(str(broken), True, mesh)


def test_bf16_mixed_gathers_decoder_layers_in_bf16_and_keeps_the_head_in_fp32(mesh, tiny_model_dir):
    """``fully_shard_model(bf16=True)`` (``trainer.precision: bf16-mixed`` under FSDP2): inside the forward a decoder
    layer's weights are the bf16 all-gathered ones, the output head's stay float32, and the sharded master weights
    stay float32."""
    from vapo_pl import VAPOModule
    from vapo_pl.loading import materialize
    from vapo_pl.parallel import fully_shard_model

    module = VAPOModule(model_path=str(tiny_model_dir))
    module._build_empty = True
    module._build_models()
    actor = module.actor
    fully_shard_model(actor, mesh, bf16=True)
    materialize(actor, torch.device("cpu"))
    seen = {}
    layer_proj = actor.model.layers[0].self_attn.q_proj
    layer_proj.register_forward_pre_hook(lambda m, a: seen.update(layer=m.weight.dtype))
    actor.lm_head.register_forward_pre_hook(lambda m, a: seen.update(head=m.weight.dtype))
    actor(input_ids=torch.randint(2, 20, (2, 6)))
    assert seen == {"layer": torch.bfloat16, "head": torch.float32}
    assert {p.dtype for p in actor.parameters()} == {torch.float32}
