"""What a checkpoint holds of ``VAPOModule`` besides its weights, and the exported actor.

- ``module_state`` / ``restore_module_state``: the RL step counters, the KL controller, the TensorBoard version, and
  per-rank state (RNG states, the critic's replay pool) gathered from every rank, since rank 0 alone writes the file.
- ``drop_reference_keys`` / ``reference_keys_not_required``: state-dict hooks that keep the frozen reference model
  (rebuilt from ``model_path``) out of every checkpoint, under every strategy.
- ``export_actor``: the actor in Hugging Face format, written atomically by rank 0.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vapo_pl.batch import RolloutBatch
from vapo_pl.checkpointing import PARTIAL_SUFFIX

if TYPE_CHECKING:
    from vapo_pl.module import VAPOModule


def module_state(m: VAPOModule) -> dict[str, Any]:
    """``checkpoint["vapo"]``; every rank must call it (the per-rank part is gathered)."""
    return {
        "rl_step": m.rl_step,
        "policy_version": m.policy_version,
        "skipped_steps": m.skipped_steps,
        "skipped_in_a_row": m.skipped_in_a_row,
        "kl_coef": m.kl_ctl.value,
        # which log directory (TensorBoard version) this run writes, so a resume continues it
        "log_versions": [getattr(lg, "version", None) for lg in m.trainer.loggers],
        # what differs between ranks, one entry per global rank: the file is written by rank 0 alone
        "ranks": gather_rank_states(m),
    }


def restore_module_state(m: VAPOModule, checkpoint: dict[str, Any]) -> None:
    if m._evaluating and "state_dict" in checkpoint:  # an evaluation builds the actor alone
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("actor.")}
    state = checkpoint["vapo"]
    m.rl_step = state["rl_step"]
    m.policy_version = state["policy_version"]
    m.skipped_steps = state.get("skipped_steps", 0)
    m.skipped_in_a_row = state.get("skipped_in_a_row", 0)
    m.kl_ctl.value = state["kl_coef"]
    ranks = state.get("ranks") or [state]  # older checkpoints kept rank 0's state alone, at the top level
    mine = ranks[m.global_rank] if m.global_rank < len(ranks) else ranks[0]
    m.critic_replay.clear()
    m.critic_replay.extend(RolloutBatch(**b) for b in mine.get("critic_replay", []))
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(mine["rng"]["python"])
    if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])


def gather_rank_states(m: VAPOModule) -> list[dict[str, Any]]:
    """Every rank's critic-replay pool and RNG states, in rank order (a collective: checkpoints are dumped on
    every rank). Plain dicts of CPU tensors and primitives: checkpoints load with ``weights_only=True``."""
    import torch.distributed as dist

    mine = {
        # the host layout is derived (rebuilt on load), and a plain dict of tensors loads with weights_only
        "critic_replay": [{f.name: getattr(b, f.name) for f in fields(b) if f.name != "host"}
                          for b in m.critic_replay],
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    if m._world == 1:
        return [mine]
    states: list[Any] = [None] * m._world
    dist.all_gather_object(states, mine)
    return [_to_cpu(s) for s in states]


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def drop_reference_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "ref_model.")]:
        del state_dict[k]


def reference_keys_not_required(module: nn.Module, incompatible_keys: Any) -> None:
    """A strict load does not ask for the reference model's weights (no checkpoint holds them) and accepts them
    where an older checkpoint does."""
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if not k.startswith("ref_model.") and ".ref_model." not in k]


def export_actor(m: VAPOModule, path: str, merged: bool = False) -> None:
        """Save the actor in Hugging Face format (with the tokenizer), loadable by vLLM and transformers. A LoRA
        actor is saved as its peft adapter (``adapter_model.safetensors``, ``adapter_config.json``), and with
        ``merged`` also as the merged model in ``<path>/merged``.

        Every rank takes part (sharded weights are gathered); rank 0 writes into a temporary directory next to
        ``path`` and renames it into place, so ``path`` is either complete or absent, and an existing ``path`` is
        replaced."""
        from vapo_pl.parallel import full_state_on_rank0

        keep = m.global_rank == 0
        adapter = merged_state = None
        if m.lora is not None:
            from vapo_pl.lora import adapter_items, full_tensors, merged_items

            adapter = {k: t.detach().to("cpu", copy=True) for k, t in full_tensors(adapter_items(m.actor))}
            if merged:
                merged_state = {k: t.detach().to("cpu", copy=True) for k, t in full_tensors(merged_items(m.actor))}
            state = None
        else:
            state = full_state_on_rank0(m.actor, m.trainer.strategy)  # host copies on rank 0 only
        if keep:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
            old = target.with_name(f".{target.name}.old")
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            tokenizer = m.rollout_data.load_tokenizer()
            if adapter is not None:
                from safetensors.torch import save_file

                from vapo_pl.lora import peft_config_dict

                tmp.mkdir()
                save_file(adapter, str(tmp / "adapter_model.safetensors"))
                (tmp / "adapter_config.json").write_text(
                    json.dumps(peft_config_dict(m.lora, m.model_path), indent=2) + "\n")
                if merged_state is not None:
                    m.actor.save_pretrained(tmp / "merged", state_dict=merged_state)
                    tokenizer.save_pretrained(tmp / "merged")
            else:
                m.actor.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            if old.exists():
                shutil.rmtree(old)
