"""Worker for the multi-process tests: run under ``torchrun --nproc_per_node 2``; one JSON file per rank
and scenario in ``--out`` (``<scenario>.rank<r>.json``), which the pytest process asserts on.

All scenarios of one invocation share the process group and one real vLLM engine per rank (starting an
engine costs ~20-30 s here; the engine is built once by ``RolloutDataModule.engine`` and handed to the
DataModules of the later scenarios). The gloo process group is initialised here, before any Trainer, as
vLLM's ``external_launcher`` expects; Lightning's strategies find it initialised and reuse it.

Scenarios:
- ``rollout``: a RolloutDataModule alone: two epochs of prompts through the dataloader, the same prompt
  sampled with the same seed on both ranks, and dynamic sampling where only rank 0 wants more rounds.
- ``ddp``, ``fsdp2``, ``deepspeed2``, ``deepspeed3`` (and ``ddp_noclip``, ``deepspeed2_noclip`` without
  gradient clipping, for exact comparisons): ``Trainer.fit`` of a VAPOModule for 3 steps: two RL steps, then
  a third that generates one rollout batch and runs ``FIXED_PASSES`` full-batch updates on it. A callback
  records after every step the ranks' full weights (all-gathered and compared), what the engine received,
  and the optimizer's parameter groups; rank 0 saves the actor weights per step for cross-strategy checks.
- ``deepspeed_stock``: Lightning's own DeepSpeedStrategy on CPU; records the error it raises.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from vapo_pl.callbacks import ExportActor

from vapo_pl import RolloutDataModule, VAPOModule
from vapo_pl.config import AlgorithmConfig, OptimConfig
from vapo_pl.parallel import HFDeepSpeedStrategy, full_state_items
from vapo_pl.rewards.base import RewardTerm
from vapo_pl.rollout.config import EngineConfig

FIXED_PASSES = 4
RL_STEPS = 2
ENGINE = None  # this rank's vLLM engine, shared by every scenario
RECEIVED: list[dict] = []  # what the engine's update_weights got, one entry per call


# ---------------------------------------------------------------------------------------------- helpers
def rank() -> int:
    return dist.get_rank()


def digest(items) -> str:
    """SHA-1 over (name, bytes) in name order: equal only for bit-identical weights."""
    h = hashlib.sha1()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def flat(items) -> torch.Tensor:
    return torch.cat([t.detach().cpu().float().reshape(-1) for _, t in sorted(items, key=lambda kv: kv[0])])


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores for parameter ``p``: FSDP2's DTensor shard, ZeRO-3's partition, or all."""
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.numel()


def spy_on(engine) -> None:
    """Record every weight update the engine receives (names, shapes, tensor types, digest), then load it."""
    real = engine.update_weights

    def update_weights(weights):
        items = list(weights)
        RECEIVED.append({
            "shapes": {k: list(v.shape) for k, v in items},
            "types": sorted({type(v).__name__ for _, v in items}),
            "digest": digest(items),
        })
        return real(items)

    engine.update_weights = update_weights


def attach_engine(dm: RolloutDataModule) -> None:
    """Build this rank's engine through the DataModule the first time; later DataModules reuse it."""
    global ENGINE
    if ENGINE is None:
        ENGINE = dm.engine
        spy_on(ENGINE)
    dm.attach_engine(ENGINE)


# ---------------------------------------------------------------------------------------------- rollout
def scenario_rollout(args) -> dict:
    def make(**kw):
        base = {"train_files": args.small_prompts, "model_path": args.model, "max_prompt_length": 32,
                "max_response_length": 12, "prompts_per_step": 4, "samples_per_prompt": 2,
                "engine": EngineConfig(kind="vllm", dtype="float32"), "seed": 0,
                "reward": [RewardTerm(name="tests.distributed._rewards.coin")]}
        dm = RolloutDataModule(**{**base, **kw})
        dm.setup("fit")
        attach_engine(dm)
        return dm

    dm = make()
    epochs = []
    for _ in range(2):
        served, responses = [], []
        for batch in dm.train_dataloader():  # the stream ends when this rank's shard is used up
            served.append(sorted({m["prompt"] for m in batch.metadata}))
            responses += [batch.responses[i, : batch.lengths[i]].tolist() for i in range(len(batch))]
        epochs.append({"served": served, "responses": responses})
    # the same prompt with the same sampling seed on both ranks: the engine's per-rank seed must differ
    same = [dm._generate([0], dm.training_sampling(seed=1234), dm.train_records, dm.train_prompt_ids, False)
            for _ in range(2)]
    same_tokens = [[b.responses[i, : b.lengths[i]].tolist() for i in range(len(b))] for b in same]

    ds = make(dynamic_sampling=True, max_sampling_rounds=3,
              reward=[RewardTerm(name="tests.distributed._rewards.flat_on_rank0")])
    ds_batch = ds.next_batch()
    return {
        "all_prompts": [r.prompt for r in dm.train_records],
        "epochs": epochs,
        "epoch_after": dm.epoch,
        "same_prompt_tokens": same_tokens,
        "dynamic": {"rounds": ds_batch.stats["rollout/sampling_rounds"], "cursor": ds.cursor,
                    "n_samples": len(ds_batch), "groups": int(ds_batch.group_index.max()) + 1,
                    "kept_share": ds_batch.stats["rollout/dynamic_sampling_kept_share"],
                    "filled": ds_batch.stats["rollout/dynamic_sampling_filled"]},
    }


# ---------------------------------------------------------------------------------------------- training
class ProbedModule(VAPOModule):
    """VAPOModule plus records: the rollout/trainer log-prob gap per step, and a final fixed-batch phase."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.logp_checks: list[dict] = []
        self.fixed_losses: list[float] = []
        self.values_from_update_seen: list[bool] = []

    def prepare(self, batch, critic_only=False):
        if not critic_only:
            self.values_from_update_seen.append(self.values_from_update(len(batch)))
        prep = super().prepare(batch, critic_only)
        if not critic_only and prep.old_logp is not None:  # None: the update pass gives them
            m = batch.response_mask
            self.logp_checks.append({
                # engine log-probs vs the trainer's under the weights the engine was synced to
                "engine_vs_actor": float((prep.old_logp - batch.rollout_logprobs).abs()[m].max()),
                # the actor vs the frozen initial weights: how far training moved the log-probs
                "actor_vs_initial": float((prep.old_logp - prep.ref_logp).abs()[m].max()),
            })
        return prep

    def training_step(self, dataloader_iter):
        if self.rl_step < RL_STEPS:
            return super().training_step(dataloader_iter)
        # Fixed batch: one fresh on-policy rollout, old log-probs/values/advantages computed once, then
        # FIXED_PASSES updates on the whole batch as ONE minibatch, so pass k's loss is the loss at the
        # weights after k optimizer steps.
        batch, _, _ = next(dataloader_iter)
        self.check_on_policy(batch)
        batch = batch.to(self.device)
        prep = self.prepare(batch)
        adv = self.compute_advantages(batch, self.token_rewards(batch), prep.old_values)
        self.algorithm = replace(self.algorithm, minibatch_size=len(batch) * self._world)
        for _ in range(FIXED_PASSES):
            stats = self.update(batch, prep, adv)
            # update() sums the micro-batch losses of a minibatch: this rank's share of the global token mean
            # times the world size (each rank normalises by global tokens / world), hence the / world
            local = torch.tensor([stats["actor/pg_loss"]], dtype=torch.float64)
            self.fixed_losses.append(float(self._sum_across_ranks(local)) / self._world)
        self.sync_weights()
        self.rl_step += 1
        self._pin_global_step()
        return {"rollout": batch, "metrics": {"actor/pg_loss": self.fixed_losses[-1]}}


class Probe(pl.Callback):
    """Per step: full weights on every rank (gathered and compared), the engine's last update, metrics."""

    def __init__(self):
        self.steps: list[dict] = []
        self.start: dict = {}

    def _full(self, pl_module, model):
        return list(full_state_items(model, pl_module.trainer.strategy))

    def on_train_start(self, trainer, pl_module):
        full = {name: self._full(pl_module, getattr(pl_module, name)) for name in ("actor", "critic")}
        self.init_items = {name: {k: v.detach().cpu().clone() for k, v in items}
                           for name, items in full.items()}
        self.init = {name: flat(items) for name, items in full.items()}
        self.weights = [self.init["actor"]]
        self.critic_weights = [self.init["critic"]]
        self.prev = dict(self.init)
        opts = trainer.optimizers
        inner = getattr(opts[0], "optimizer", opts[0])
        p = next(pl_module.actor.parameters())
        self.start = {
            "n_optimizers": len(opts),
            "optimizer": type(opts[0]).__name__,
            "inner_optimizer": type(inner).__name__,
            "groups": [{"name": g["name"], "lr": g["lr"], "n_params": len(g["params"])}
                       for g in opts[0].param_groups],
            "n_actor_params": len([q for q in pl_module.actor.parameters() if q.requires_grad]),
            "n_critic_params": len([q for q in pl_module.critic.parameters() if q.requires_grad]),
            "actor_param_type": type(p).__name__,
            "actor_param_local_numel": sum(local_numel(q) for q in pl_module.actor.parameters()),
            "critic_param_local_numel": sum(local_numel(q) for q in pl_module.critic.parameters()),
            "critic_full_numel": int(self.init["critic"].numel()),
            # the critic's head starts at zero (values 0 at first): must hold however the params are stored
            "critic_head_init_abs_max": max(float(v.abs().max()) for k, v in full["critic"]
                                            if k.startswith("value_head.")),
            "actor_full_numel": int(self.init["actor"].numel()),
            "received_at_start": len(RECEIVED),
        }

    def on_train_end(self, trainer, pl_module):
        """The actor's full weights at the end (after ``ExportActor``'s last export, which runs first)."""
        self.final_actor = {k: v.detach().cpu().clone() for k, v in self._full(pl_module, pl_module.actor)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = {"metrics": {k: v for k, v in outputs["metrics"].items() if isinstance(v, float)},
               "prompts": sorted({m["prompt"] for m in outputs["rollout"].metadata})}
        for name in ("actor", "critic"):
            items = self._full(pl_module, getattr(pl_module, name))
            now = flat(items)
            ranks = gather(now)
            rec[name] = {
                "ranks_identical": all(torch.equal(ranks[0], r) for r in ranks[1:]),
                "max_change_from_init": float((now - self.init[name]).abs().max()),
                "max_change_this_step": float((now - self.prev[name]).abs().max()),
                "digest": digest(items),
            }
            self.prev[name] = now
            if name == "actor":
                self.weights.append(now)
            else:
                self.critic_weights.append(now)
        rec["engine_last_digest"] = RECEIVED[-1]["digest"]
        rec["policy_version"] = pl_module.policy_version
        self.steps.append(rec)


def make_strategy(name: str):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    if name in ("ddp", "ddp_noclip"):
        return DDPStrategy(find_unused_parameters=True, process_group_backend="gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     process_group_backend="gloo")
    # configs/strategies/deepspeed_zero{2,3}.yaml without their bf16 section (fp32 on CPU); DeepSpeed clips
    # the gradient norm over both models together
    zero = ({"stage": 3, "stage3_gather_16bit_weights_on_model_save": True} if name.startswith("deepspeed3")
            else {"stage": 2, "overlap_comm": True, "contiguous_gradients": True})
    config = {"zero_optimization": zero, "gradient_clipping": 0.0 if name.endswith("_noclip") else 1.0,
              "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True}
    if name == "deepspeed_stock":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=config, process_group_backend="gloo")
    return HFDeepSpeedStrategy(config=config, process_group_backend="gloo")


def scenario_fit(args, name: str) -> dict:
    """``<strategy>[_noclip]``: RL_STEPS RL steps in two minibatches each, then the fixed-batch phase.
    ``<strategy>_onebatch[_separate]``: RL_STEPS RL steps in one minibatch each (one update per batch), the old
    log-probs and values taken from the update pass, or (``_separate``) from their own forwards."""
    from transformers import AutoModelForCausalLM

    no_clip = {"actor_grad_clip": None, "critic_grad_clip": None} if name.endswith("_noclip") else {}
    one_batch = "_onebatch" in name
    module = ProbedModule(
        model_path=args.model,
        critic_head_init="zero",  # the checks below compare with the exactly-zero head of one process
        critic_logprob_features=one_batch,  # the critic's log-prob head, sharded (FSDP2) and replicated (DDP)
        # kl_loss_coef > 0 adds the frozen reference model (sharded/partitioned like the others)
        algorithm=AlgorithmConfig(minibatch_size=16 if one_batch else 8, micro_batch_size=2, kl_loss_coef=1e-3),
        optim=OptimConfig(actor_lr=1e-3, critic_lr=2e-3, **no_clip),
        reuse_update_forward=not name.endswith("_separate"),
    )
    dm = RolloutDataModule(train_files=args.big_prompts, model_path=args.model, max_prompt_length=32,
                           max_response_length=12, prompts_per_step=4, samples_per_prompt=4,
                           engine=EngineConfig(kind="vllm", dtype="float32"), seed=0,
                           reward=[RewardTerm(name="tests.distributed._rewards.coin")])
    attach_engine(dm)
    probe = Probe()
    # the one-batch runs also export the actor (every rank gathers, rank 0 writes) after the last step
    exports = Path(args.out) / f"{name}_exports"
    callbacks = [ExportActor(str(exports)), probe] if one_batch else [probe]
    trainer = pl.Trainer(strategy=make_strategy(name.split("_onebatch")[0]), accelerator="cpu", devices=2,
                         max_steps=RL_STEPS if one_batch else RL_STEPS + 1,
                         callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out)
    n_received = len(RECEIVED)
    trainer.fit(module, dm)
    if rank() == 0:  # actor weights at start and after every step, for comparisons across strategies
        torch.save(torch.stack(probe.weights), Path(args.out) / f"{name}.actor_weights.pt")
        torch.save(torch.stack(probe.critic_weights), Path(args.out) / f"{name}.critic_weights.pt")
    # after fit: the strategy's teardown has unregistered ZeRO-3 from transformers, this is a plain load
    ckpt = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).state_dict()
    actor0, critic0 = probe.init_items["actor"], probe.init_items["critic"]
    init_vs_ckpt = {
        "actor": max(float((actor0[k] - ckpt[k]).abs().max()) for k in ckpt),
        "critic_backbone": max(float((v - ckpt["model." + k.removeprefix("backbone.")]).abs().max())
                               for k, v in critic0.items() if k.startswith("backbone.")),
    }
    export_diff = None
    if one_batch and rank() == 0:  # the exported model loads in transformers with the actor's final weights
        exported = AutoModelForCausalLM.from_pretrained(exports / f"step_{RL_STEPS:06d}", dtype=torch.float32)
        state = exported.state_dict()
        export_diff = {"same_keys": set(state) >= set(probe.final_actor),
                       "max_abs_diff": max(float((state[k] - v).abs().max()) for k, v in probe.final_actor.items())}
    return {
        "export": export_diff,
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "start": probe.start,
        "steps": probe.steps,
        "logp_checks": module.logp_checks,
        "fixed_losses": module.fixed_losses,
        "values_from_update": module.values_from_update_seen,
        "received": RECEIVED[n_received:],
        "hf_shapes": {k: list(v.shape) for k, v in ckpt.items()},
        "init_vs_checkpoint": init_vs_ckpt,
    }


def scenario_deepspeed_stock(args) -> dict:
    """Lightning's DeepSpeedStrategy as shipped, on CPU: record the error it raises."""
    try:
        scenario_fit(args, "deepspeed_stock")
    except Exception as e:  # noqa: BLE001 - the error message is the result
        return {"error_type": type(e).__name__, "error": str(e)}
    return {"error_type": None, "error": None}


SCENARIOS = {
    "rollout": scenario_rollout,
    "ddp": lambda a: scenario_fit(a, "ddp"),
    "ddp_noclip": lambda a: scenario_fit(a, "ddp_noclip"),
    "fsdp2": lambda a: scenario_fit(a, "fsdp2"),
    "ddp_onebatch": lambda a: scenario_fit(a, "ddp_onebatch"),
    "ddp_onebatch_separate": lambda a: scenario_fit(a, "ddp_onebatch_separate"),
    "fsdp2_onebatch": lambda a: scenario_fit(a, "fsdp2_onebatch"),
    "deepspeed_stock": scenario_deepspeed_stock,
    "deepspeed2": lambda a: scenario_fit(a, "deepspeed2"),
    "deepspeed3": lambda a: scenario_fit(a, "deepspeed3"),
    "deepspeed2_noclip": lambda a: scenario_fit(a, "deepspeed2_noclip"),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--small-prompts", required=True)
    p.add_argument("--big-prompts", required=True)
    p.add_argument("--scenarios", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=240))
    out = Path(args.out)
    for name in args.scenarios.split(","):
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **SCENARIOS[name](args)}
        except Exception:  # noqa: BLE001 - recorded for the test to show; the next scenario still runs
            result = {"ok": False, "traceback": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - t0
        (out / f"{name}.rank{rank()}.json").write_text(json.dumps(result))
        print(f"[rank {rank()}] {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s",
              flush=True)
    # vLLM destroys its own groups at exit; leave the default group to it (destroying it first fails)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
