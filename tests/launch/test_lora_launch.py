"""LoRA under the strategies, started as a user starts them: the README's one-node command (Lightning's launcher,
2 CPU processes, gloo, real vLLM serving the adapter) with ``model.lora`` in the overlay, for DDP, FSDP2 and DeepSpeed ZeRO-2 (FSDP2
with a KL loss, so the reference policy is the actor with its adapters off). The ranks stay bit-identical, the
adapters train, and every base weight ends exactly as the checkpoint holds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch.test_launch import STEPS, _assert_ranks_agree, _overlay, _readme_args, launch

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_zero2"])
def test_lora_trains_under_the_strategy_from_the_cli(tiny_model_dir, tmp_path, strategy):
    run = tmp_path / strategy
    run.mkdir()
    overlay = _overlay(run, tiny_model_dir, strategy, tmp_path / "critic.pt")
    cfg = json.loads(overlay.read_text())
    cfg["model"]["init_args"]["lora"] = {"rank": 4, "alpha": 8.0}
    cfg["model"]["init_args"]["optim"] = {"actor_lr": 1e-2}
    overlay.write_text(json.dumps(cfg))
    result = launch(f"{strategy}/lora", run, "lightning", _readme_args(strategy, overlay))
    ranks = result.ranks()
    for r in ranks:  # each rank's engine deleted the adapters it served at exit
        assert not list(Path("/dev/shm").glob(f"vapo_lora_{r['pid']}_*")), r["global_rank"]
    _assert_ranks_agree(ranks, STEPS)
    digests = [ranks[0]["start"]["actor"]] + [s["actor"] for s in ranks[0]["steps"]]
    assert len(set(digests)) == STEPS + 1  # every step changed the (adapted) actor
    final = torch.load(run / "probe" / "actor_final.pt")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    adapted = [k for k in final if ".base_layer." in k]
    assert adapted and any(".lora_B." in k and final[k].abs().max() > 0 for k in final)
    for k, v in final.items():
        if ".lora_" in k:
            continue
        # the base model never moved (DeepSpeed's bf16 mode holds the module in bf16: the checkpoint cast to it)
        assert torch.equal(v, base[k.replace(".base_layer.", ".")].to(v.dtype)), k
