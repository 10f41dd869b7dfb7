"""What the launch tests read from inside a real ``vapo-pl fit``: a callback named in the run's YAML like any user
callback, so the run is started exactly as a user starts it (no harness prepares anything).

Importing this module (jsonargparse does, while it parses the config, before the Trainer exists) also wraps every
``torch.distributed`` collective with a check that its tensors are on a device the group's backend serves
(``Backend.backend_capability``: gloo serves CPU and CUDA, NCCL CUDA only). On this CPU machine every group is gloo,
so the check can fail only where a collective gets a tensor on a device gloo does not serve; on a GPU machine with
NCCL it catches any CPU tensor handed to a collective (the defect this guards against).
"""

from __future__ import annotations

import functools
import json
import os
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from tests.distributed.worker import digest  # SHA-1 over (name, bytes): equal only for bit-identical weights

VIOLATIONS: list[dict] = []
CALLS: dict[str, int] = {}
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce", "all_to_all_single", "gather", "scatter", "reduce_scatter")


def _tensors(args, kwargs) -> list[Tensor]:
    found = []
    for a in [*args, *kwargs.values()]:
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += [t for t in a if isinstance(t, Tensor)]
    return found


def served_devices(group=None) -> list[str]:
    backend = str(dist.get_backend(group))
    served: set[str] = set()
    for part in backend.split(","):  # "cpu:gloo,cuda:nccl" serves each named device with its backend
        device, _, name = part.rpartition(":")
        served |= {device} if device else set(dist.Backend.backend_capability.get(name, []))
    return sorted(served)


def _checked(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[name] = CALLS.get(name, 0) + 1
        group = kwargs.get("group")
        try:
            served = served_devices(group)
        except Exception:  # noqa: BLE001 - a group this rank is not part of: nothing to check
            served = None
        if served is not None:
            for t in _tensors(args, kwargs):
                if t.device.type not in served:
                    frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                              if "site-packages" not in f.filename][-3:]
                    VIOLATIONS.append({"collective": name, "device": str(t.device), "served": served,
                                       "where": frames})
        return fn(*args, **kwargs)

    wrapper._launch_probe = True
    return wrapper


def install_collective_check() -> None:
    import torch.distributed.distributed_c10d as c10d

    for name in _COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "_launch_probe", False):
            continue
        wrapped = _checked(name, fn)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapped)


install_collective_check()


class LaunchProbe(pl.Callback):
    """Records, on every rank, its ranks as the trainer sees them, the full actor and critic weights' digests after
    value pretraining and after every RL step, and the collective-device check; writes ``rank<r>.json`` into
    ``out`` at the end of fit, and rank 0 saves the final full actor weights as ``actor_final.pt``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.steps: list[dict] = []
        self.prompts: list[list[str]] = []
        self.start: dict = {}

    def _full(self, model, trainer) -> list:
        from vapo_pl.parallel import full_state_items

        return list(full_state_items(model, trainer.strategy))

    def _record(self, trainer, pl_module) -> dict:
        actor = self._full(pl_module.actor, trainer)
        critic = self._full(pl_module.critic, trainer) if pl_module.critic is not None else []
        return {"step": int(pl_module.rl_step), "actor": digest(actor), "critic": digest(critic),
                "policy_version": int(pl_module.policy_version)}

    def on_fit_start(self, trainer, pl_module) -> None:
        """Count gradient communications per ``manual_backward``: DDP's bucket all-reduces (a comm hook), FSDP2's
        reduce-scatters (``foreach_reduce``). Recorded as one count per backward of each RL step."""
        from torch.nn.parallel import DistributedDataParallel

        counter = {"n": 0}
        self.backward_comms: list[list[int]] = [[]]
        wrapped = trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def counting_allreduce(state, bucket):
                counter["n"] += 1
                return default_hooks.allreduce_hook(state, bucket)

            wrapped.register_comm_hook(None, counting_allreduce)
        else:
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_mod

            reduce = group_mod.foreach_reduce

            def counting_reduce(*args, **kwargs):
                counter["n"] += 1
                return reduce(*args, **kwargs)

            group_mod.foreach_reduce = counting_reduce
        backward = pl_module.manual_backward

        def recorded_backward(*args, **kwargs):
            before = counter["n"]
            out = backward(*args, **kwargs)
            self.backward_comms[-1].append(counter["n"] - before)
            return out

        pl_module.manual_backward = recorded_backward

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self._record(trainer, pl_module)  # after ValuePretraining's on_train_start (listed first)
        self.backward_comms = [[]]  # from the first RL step on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = self._record(trainer, pl_module)
        rollout = outputs["rollout"]
        self.prompts.append(sorted({m["prompt"] for m in rollout.metadata}))  # what this rank trained on
        record["backward_comms"] = self.backward_comms[-1]
        self.backward_comms.append([])
        self.steps.append(record)

    def on_train_end(self, trainer, pl_module) -> None:
        from vapo_pl.parallel import full_state_on_rank0

        final = full_state_on_rank0(pl_module.actor, trainer.strategy)
        self.out.mkdir(parents=True, exist_ok=True)
        if final is not None:
            torch.save(final, self.out / "actor_final.pt")
        dm = trainer.datamodule
        record = {
            "pid": os.getpid(), "global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
            "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "root_device": str(trainer.strategy.root_device),
            "backend": str(dist.get_backend()) if dist.is_initialized() else None,
            "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_PROCID")},
            "engine": type(dm._engine).__name__ if dm._engine is not None else None,
            "tensor_parallel_size": dm.tensor_parallel_size,
            "holds_full_actor": final is not None,  # full_state_on_rank0 keeps the gathered weights on rank 0 only
            "start": self.start, "steps": self.steps, "prompts": self.prompts,
            "collectives": dict(CALLS), "violations": VIOLATIONS,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))
