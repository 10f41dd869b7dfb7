"""``model.attn_implementation``: checked at construction, ``auto`` decided per machine, and passed to every model
the module builds (actor, critic, reference), whole or built empty for FSDP2."""

from __future__ import annotations

import pytest
import torch

from vapo_pl.module import VAPOModule, resolve_attn_implementation


def test_unknown_attention_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"model.attn_implementation must be one of auto, sdpa"):
        VAPOModule(model_path="x", attn_implementation="flash")


def test_auto_is_sdpa_without_cuda_and_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"


def test_auto_is_flash_attention_2_on_cuda_with_flash_attn(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    assert resolve_attn_implementation("auto") == "flash_attention_2"


@pytest.mark.parametrize("empty", [False, True])
def test_every_model_gets_the_configured_kernel(tiny_model_dir, empty):
    m = VAPOModule(model_path=str(tiny_model_dir), attn_implementation="eager",
                   algorithm={"kl_loss_coef": 0.01})
    m._build_empty = empty
    m._build_models()
    kernels = {m.actor.config._attn_implementation, m.critic.backbone.config._attn_implementation,
               m.ref_model.config._attn_implementation}
    assert kernels == {"eager"}
