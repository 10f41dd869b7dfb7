"""VAPOModule: actor, critic and (optional) reference model, trained with manual optimization.

One ``training_step`` is one RL iteration and reads as the recipe:
rollout -> old log-probs and values -> rewards -> advantages -> K epochs of minibatch updates -> weight sync.
The mathematics lives in ``vapo_pl.algorithms`` (pure torch); this file only orchestrates.

Departures from a textbook Lightning module, and why:
- ``training_step(dataloader_iter)``: Lightning then does not prefetch, so the rollout for step ``k`` is
  generated inside step ``k`` with the weights of update ``k-1`` (strictly on-policy).
- One AdamW with two parameter groups (actor, critic) instead of two optimizers: Lightning's DeepSpeed
  strategy accepts only one, and one step per minibatch keeps ``global_step`` simple. Gradient clipping is
  still per model. Learning rates and warm-up are per group.
- ``trainer.global_step`` is pinned to the number of RL steps (Lightning would count optimizer steps), so
  ``max_steps``, logs and checkpoints all speak of RL steps, as the paper's "5,000 steps" does.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from vapo_pl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, AdvantageOutputs
from vapo_pl.algorithms.aggregation import aggregate
from vapo_pl.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalty_rewards
from vapo_pl.algorithms.logprob import entropy_from_logits, logprobs_from_logits
from vapo_pl.algorithms.nll import positive_example_nll
from vapo_pl.algorithms.policy_losses import POLICY_LOSSES
from vapo_pl.algorithms.utils import masked_mean
from vapo_pl.algorithms.value import explained_variance, value_loss
from vapo_pl.batch import PreparedBatch, RolloutBatch, StepOutput
from vapo_pl.checkpointing import PARTIAL_SUFFIX
from vapo_pl.common import fp32_forward, require_model_dir, sum_across_ranks, world
from vapo_pl.config import AlgorithmConfig, OptimConfig
from vapo_pl.critic import ValueModel, logprob_state_features
from vapo_pl.packing import Packed, pack, packed_targets
from vapo_pl.prompts import PromptRecord, render_prompt
from vapo_pl.rewards.base import RewardInput, RewardOutput

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. ``algorithm.max_skipped_steps`` updates in a row were skipped); ``vapo-pl`` prints
    it as one ``error:`` line and exits with code 1."""


def peak_rss_gb() -> float:
    """Peak resident memory of this (trainer) process in GB; verifier worker processes are not included."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def keep_output_head_in_fp32(model: nn.Module) -> None:
    """Compute ``model``'s output projection (the logits) in float32 even under bf16 autocast.

    With ``trainer.precision: bf16-mixed`` every matmul runs in bf16, and bf16 logits (3 significant digits) move
    log-probs by up to ~0.1 nat for logits around 10-30, which the PPO ratio ``exp(logp - old_logp)`` turns into
    10% noise. With the head in float32, log-probs (and so ratios, KL and entropy) come from float32 logits; the
    rest of the network stays in bf16.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        fp32_forward(head)


def _position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) positions counted from each row's first real token (left padding gets 0), as vLLM numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _drop_reference_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "ref_model.")]:
        del state_dict[k]


def _reference_keys_not_required(module: nn.Module, incompatible_keys: Any) -> None:
    """A strict load does not ask for the reference model's weights (no checkpoint holds them) and accepts them
    where an older checkpoint does."""
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if not k.startswith("ref_model.") and ".ref_model." not in k]


class VAPOModule(pl.LightningModule):
    """Owns the models and the optimisation of one RL run.

    Args:
        model_path: Hugging Face directory of the initial policy (the actor).
        critic_path: checkpoint for the critic; default ``model_path`` (the paper initialises from the
            base model, or from a reward model with ``critic_init: reward_model``).
        critic_init: ``base`` (backbone + new head) or ``reward_model`` (a sequence-classification
            checkpoint whose score head becomes the value head).
        critic_head_init: the new head of a ``base`` critic: ``random`` (``nn.Linear``'s uniform init, so the
            backbone gets gradient from the first step) or ``zero`` (values start at 0; learned 10x slower on
            the demo task, see ``benchmarks/critic_fit.py``).
        critic_logprob_features: give the critic the sampler's log-probs of the tokens already written (their
            running minimum, running mean and last, through a small MLP added to the value head): a slip the
            policy itself found unlikely then shows in the value where it is written. Off by default (not in the
            paper); see ``vapo_pl.critic.logprob_state_features`` and ``docs/decisions.md``.
        algorithm: every switch of VAPO and its siblings (see ``AlgorithmConfig``).
        optim: AdamW settings per model.
        gradient_checkpointing: recompute activations in backward (saves memory on long responses).
        logprob_chunk_size: tokens per chunk when turning logits into log-probs and entropies.
        packing: run actor, critic and reference forwards padding-free: each micro-batch's sequences packed into
            rows with position ids restarting per sequence (``vapo_pl.packing``); ``False`` = padded rows.
        pack_row_tokens: row length of the packed forward (a longer sequence gets a row of its own). Attention is
            computed over whole rows, so short rows suit CPU and SDPA (128 was fastest here); with
            flash-attention's varlen kernel on GPU longer rows cost nothing extra.
        reuse_update_forward: when a batch gets exactly one optimizer step (one PPO epoch, one minibatch, no KL
            penalty in the reward), take the old log-probs and entropies from the update's own forward, detached,
            instead of a separate forward: they are the same numbers (the ratio is exactly 1). With a critic whose
            targets do not depend on its values (``gae`` with ``lambda_critic`` 1, VAPO's Decoupled-GAE) and a
            strategy other than DeepSpeed, the critic's old values come from its update pass too: its micro-batches
            run (forward and backward) before the actor's, and GAE gets their detached values.
        seed: seed of the minibatch shuffling.

    Subclass hooks (small on purpose): ``build_prompt``, ``compute_reward``, ``build_actor``,
    ``build_critic``, ``token_rewards``.
    """

    def __init__(
        self,
        model_path: str,
        critic_path: str | None = None,
        critic_init: str = "base",
        critic_head_init: str = "random",
        critic_logprob_features: bool = False,
        algorithm: AlgorithmConfig | None = None,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        packing: bool = True,
        pack_row_tokens: int = 128,
        reuse_update_forward: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if critic_init not in ("base", "reward_model"):
            raise ValueError(f"model.critic_init must be 'base' or 'reward_model', got {critic_init!r}")
        if critic_head_init not in ("zero", "random"):
            raise ValueError(f"model.critic_head_init must be 'zero' or 'random', got {critic_head_init!r}")
        if not isinstance(critic_logprob_features, bool):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors here
                f"model.critic_logprob_features must be true or false, got {critic_logprob_features!r}")
        if logprob_chunk_size < 1:
            raise ValueError(f"model.logprob_chunk_size must be >= 1, got {logprob_chunk_size}")
        if isinstance(pack_row_tokens, bool) or not isinstance(pack_row_tokens, int) or pack_row_tokens < 1:
            raise ValueError(f"model.pack_row_tokens must be an integer >= 1, got {pack_row_tokens!r}")
        self.model_path = model_path
        self.critic_path = critic_path
        self.critic_init = critic_init
        self.critic_head_init = critic_head_init
        self.critic_logprob_features = critic_logprob_features
        # plain dicts are accepted too, for Python users (the CLI builds the dataclasses itself)
        self.algorithm = AlgorithmConfig(**algorithm) if isinstance(algorithm, dict) else algorithm or AlgorithmConfig()
        self.optim = OptimConfig(**optim) if isinstance(optim, dict) else optim or OptimConfig()
        self.gradient_checkpointing = gradient_checkpointing
        self.logprob_chunk_size = logprob_chunk_size
        self.packing = packing
        self.pack_row_tokens = pack_row_tokens
        self.reuse_update_forward = reuse_update_forward
        self.seed = seed
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.actor: nn.Module | None = None
        self.critic: ValueModel | None = None
        self.ref_model: nn.Module | None = None
        self.rl_step = 0  # completed RL iterations
        self.skipped_steps = 0  # RL steps whose update was skipped for a non-finite or absurd value
        self.skipped_in_a_row = 0
        # earlier RL batches (on CPU) the critic-only passes draw from (algorithm.critic_replay_batches)
        self.critic_replay: deque[RolloutBatch] = deque(maxlen=max(1, self.algorithm.critic_replay_batches))
        self.policy_version = 0  # weight syncs sent to the engine; rollouts must carry this version
        self.temperature = 1.0  # set from the DataModule: training log-probs use the sampler's temperature
        self.max_response_length: int | None = None  # set from the DataModule: Dr.GRPO's constant divisor
        # The reference model is frozen and rebuilt from model_path: it is no part of any checkpoint, under every
        # strategy (Lightning's, DeepSpeed's and FSDP2's sharded DCP save and load all go through these hooks).
        self.register_state_dict_post_hook(_drop_reference_keys)
        self.register_load_state_dict_post_hook(_reference_keys_not_required)
        if self.algorithm.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(self.algorithm.kl_reward_coef, self.algorithm.kl_target,
                                               self.algorithm.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.algorithm.kl_reward_coef)

    # ------------------------------------------------------------------ hooks for subclasses
    def build_prompt(self, record: PromptRecord, tokenizer: Any, template: str) -> str:
        """The text the policy sees for one problem. Default: the DataModule's template."""
        return render_prompt(tokenizer, record.prompt, template)

    def compute_reward(self, inputs: RewardInput, default: Any) -> RewardOutput:
        """Score a batch of responses; the same ``RewardOutput`` a registered reward function returns (``correct``
        defaults to ``scores > 0``, ``terms`` to one term). Default: the DataModule's reward terms (``default``)."""
        return default(inputs)

    def build_actor(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(require_model_dir(self.model_path, "model.model_path"),
                                                    dtype=torch.float32)

    def build_critic(self) -> nn.Module:
        """A module mapping (input_ids, attention_mask, position_ids) to (B, L) values; with
        ``critic_logprob_features`` it also takes ``logprob_features=`` and has ``uses_logprob_features`` true."""
        path = require_model_dir(self.critic_path or self.model_path, "model.critic_path")
        return ValueModel.from_pretrained(path, init=self.critic_init, torch_dtype=torch.float32,
                                          head_init=self.critic_head_init, seed=self.seed,
                                          logprob_features=self.critic_logprob_features)

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """(B, T) rewards per response token: the sequence score on its last token (sparse reward)."""
        rewards = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.scores.device)
        last = (batch.lengths - 1).clamp(min=0).unsqueeze(1)
        return rewards.scatter_(1, last, batch.scores.float().unsqueeze(1))

    # ------------------------------------------------------------------ models
    @property
    def uses_critic(self) -> bool:
        return self.algorithm.uses_critic

    @property
    def needs_greedy_baseline(self) -> bool:
        return "baseline_scores" in self.algorithm.estimator_needs

    def configure_model(self) -> None:
        if self.actor is not None:
            return
        self.actor = self.build_actor().train()
        keep_output_head_in_fp32(self.actor)
        if self._evaluating:  # vapo-pl validate / test: the policy alone
            self.actor.eval()
        elif self.uses_critic:
            self.critic = self.build_critic()
            if self.critic_logprob_features and not getattr(self.critic, "uses_logprob_features", False):
                raise ValueError("model.critic_logprob_features is on, but build_critic() returned a critic without a "
                                 "log-prob head (build it with ValueModel.from_pretrained(..., logprob_features=True))")
        if self.algorithm.uses_reference and not self._evaluating:
            self.ref_model = self.build_actor().eval().requires_grad_(False)
            keep_output_head_in_fp32(self.ref_model)
        if self.gradient_checkpointing:
            self.actor.gradient_checkpointing_enable()
            if self.critic is not None:
                self.critic.gradient_checkpointing_enable()
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            from vapo_pl.parallel import fully_shard_model

            for m in (self.actor, self.critic, self.ref_model):
                if m is not None:
                    fully_shard_model(m, mesh)

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.actor.parameters() if p.requires_grad],
                   "lr": self.optim.actor_lr, "name": "actor"}]
        if self.critic is not None:
            groups.append({"params": [p for p in self.critic.parameters() if p.requires_grad],
                           "lr": self.optim.critic_lr, "name": "critic"})
        opt = torch.optim.AdamW(groups, betas=self.optim.betas, eps=self.optim.eps,
                                weight_decay=self.optim.weight_decay)
        warm = self.optim.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ wiring with the DataModule
    @property
    def rollout_data(self):
        """The RolloutDataModule this module trains from."""
        return self.trainer.datamodule

    def on_fit_start(self) -> None:
        dm = self.rollout_data
        if dm is None or not hasattr(dm, "sync_weights"):
            raise RuntimeError("VAPOModule trains from a RolloutDataModule: pass datamodule=... to fit")
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("trainer.precision=16-mixed: fp16 loss scaling is not supported (each model's gradients "
                             "are clipped before the optimizer step, while a GradScaler still has them scaled); use "
                             "bf16-mixed or 32")
        if self.algorithm.ptx_coef > 0 and not getattr(dm, "ptx_ids", None):
            raise ValueError("model.algorithm.ptx_coef > 0 needs PPO-ptx data: set data.ptx_files")
        self._connect(dm)

    def _connect(self, dm) -> None:
        """Take the sampler's settings from the DataModule and hand it the hooks. The engine loaded model_path; after
        a resume (or for a checkpoint's evaluation) the actor differs, so the engine gets the actor's weights before
        it first generates (the DataModule pulls them if a callback generates before ``on_train_start``)."""
        self.temperature = dm.temperature
        self.max_response_length = dm.max_response_length
        dm.connect(self, actor=self.actor)
        dm.expect_weights(lambda: self.sync_weights(bump=False))

    @property
    def _evaluating(self) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return self._trainer is not None and self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)

    # --------------------------------------------------------------- evaluation-only runs (vapo-pl validate / test)
    def on_validation_start(self) -> None:
        if not self._evaluating:
            return
        dm = self.rollout_data
        if dm is None or not hasattr(dm, "sync_weights"):
            raise RuntimeError("VAPOModule evaluates through a RolloutDataModule: pass datamodule=...")
        self._connect(dm)
        dm.ensure_weights()

    on_test_start = on_validation_start

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the ``Evaluation`` callbacks generate and score the held-out prompts."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """As ``validation_step``."""

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            print(f"RL steps: {self.rl_step}; peak memory (trainer process): {peak_rss_gb():.2f} GB", flush=True)

    def on_train_start(self) -> None:
        self.rollout_data.ensure_weights()

    # ------------------------------------------------------------------ distributed helpers
    def _sum_across_ranks(self, x: Tensor) -> Tensor:
        return sum_across_ranks(x)

    @property
    def _world(self) -> int:
        return world()[1]

    # ------------------------------------------------------------------ forward passes
    def policy_logprobs(self, model: nn.Module, batch: RolloutBatch, with_entropy: bool = False
                        ) -> tuple[Tensor, Tensor | None]:
        """(B, T) log-probs of the response tokens under ``model`` at the sampler's temperature (0 at padding)."""
        if self.packing:
            packed = self._pack(batch)
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
            logp = packed.gather(logprobs_from_logits(logits, packed_targets(packed), self.temperature,
                                                      self.logprob_chunk_size))
            ent = packed.gather(entropy_from_logits(logits.detach(), self.logprob_chunk_size,
                                                    temperature=self.temperature)) if with_entropy else None
            return logp, ent
        width = batch.response_mask.shape[1]
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=_position_ids(batch.attention_mask), use_cache=False, logits_to_keep=width + 1)
        logits = out.logits[:, :-1]  # (B, T, V): position P-1+t predicts response token t
        logp = logprobs_from_logits(logits, batch.responses, self.temperature, self.logprob_chunk_size)
        ent = entropy_from_logits(logits.detach(), self.logprob_chunk_size, temperature=self.temperature) \
            if with_entropy else None
        return logp, ent

    def critic_values(self, batch: RolloutBatch) -> Tensor:
        """(B, T) values V(s_t), s_t = prompt + response[:t], read at the last token of s_t (0 at padding)."""
        feats = None  # (B, T, 3), placed below where each state's value is read; only for a critic that reads them
        if getattr(self.critic, "uses_logprob_features", False):
            feats = logprob_state_features(batch.rollout_logprobs, batch.response_mask)
        if self.packing:
            packed = self._pack(batch)
            extra = {} if feats is None else {"logprob_features": packed.scatter(feats)}
            return packed.gather(self.critic(packed.input_ids, None, packed.position_ids, **extra))
        width = batch.response_mask.shape[1]
        start = batch.prompt_width - 1  # the value of s_t is read at column start + t
        extra = {} if feats is None else {"logprob_features": torch.nn.functional.pad(
            feats, (0, 0, start, batch.input_ids.shape[1] - start - width))}
        values = self.critic(batch.input_ids, batch.attention_mask, _position_ids(batch.attention_mask), **extra)
        return values[:, start : start + width]

    def _pack(self, batch: RolloutBatch) -> Packed:
        # Pad slots hold token 0: they come after every real token of their row, so causal attention keeps them
        # out of every output that is read.
        return pack(batch.input_ids, batch.attention_mask, batch.response_mask, self.pack_row_tokens, pad_id=0)

    def _micro_batches(self, index: Tensor) -> list[Tensor]:
        return list(index.split(self.algorithm.micro_batch_size))

    def one_update_per_batch(self, n: int) -> bool:
        """Whether the actor's old log-probs can come from the update pass: one PPO epoch over one minibatch, and no
        KL penalty in the reward (which needs them before the update)."""
        cfg = self.algorithm
        return (self.reuse_update_forward and cfg.ppo_epochs == 1 and len(self._minibatches(n)) == 1
                and cfg.kl_reward_coef == 0)

    def values_from_update(self, n: int) -> bool:
        """Whether the critic's old values can come from its own update pass: ``one_update_per_batch``, targets that
        do not depend on the values (``gae`` with ``lambda_critic`` 1: Monte-Carlo returns), and not DeepSpeed (whose
        engine counts backward calls toward its gradient accumulation)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return (self.critic is not None and self.one_update_per_batch(n) and self.algorithm.estimator == "gae"
                and self.algorithm.lambda_critic == 1.0
                and not isinstance(getattr(self._trainer, "strategy", None), DeepSpeedStrategy))

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch, critic_only: bool = False) -> PreparedBatch:
        """Old log-probs, entropies, values and reference log-probs, in micro-batches, without grad. The actor's
        forward is left to the update when ``one_update_per_batch``, the critic's when ``values_from_update``."""
        parts: dict[str, list[Tensor]] = defaultdict(list)
        actor_here = not critic_only and not self.one_update_per_batch(len(batch))
        values = critic_only or not self.values_from_update(len(batch))
        for idx in self._micro_batches(torch.arange(len(batch), device=batch.scores.device)):
            mb = batch.select(idx)
            if actor_here:
                logp, ent = self.policy_logprobs(self.actor, mb, with_entropy=True)
                parts["old_logp"].append(logp)
                parts["entropy"].append(ent)
            if not critic_only and self.ref_model is not None:
                parts["ref_logp"].append(self.policy_logprobs(self.ref_model, mb)[0])
            if self.critic is not None and values:
                parts["old_values"].append(self.critic_values(mb))
        return PreparedBatch(**{k: torch.cat(v) for k, v in parts.items()})

    def critic_pass_first(self, batch: RolloutBatch, returns: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic's share of the single joint update when ``values_from_update``: forward and backward of the
        value loss on the update's own micro-batches, with these values (detached) as the old values, so value
        clipping does nothing, as on any first pass. The gradients wait for the joint optimizer step; actor and
        critic are separate models, so running all critic micro-batches before the actor's gives the same
        gradients. Returns the (B, T) values and the loss statistics ``update`` logs."""
        device = batch.scores.device
        world = self._world
        n_val_tok = self._sum_across_ranks(batch.response_mask.sum().float()) / world
        values = torch.zeros(batch.response_mask.shape, device=device)
        total = torch.zeros((), device=device)
        clipfrac = []
        for idx in self._micro_batches(self._minibatches(len(batch))[0].to(device)):
            mb = batch.select(idx)
            v = self.critic_values(mb)
            values[idx] = v.detach()
            loss, vstats = self._value_loss(mb, v, values[idx], returns[idx], n_val_tok)
            self.manual_backward(loss)
            total = total + loss.detach()
            clipfrac.append(vstats["vf_clipfrac"])
        return values, {"critic/value_loss": total, "critic/vf_clipfrac": torch.stack(clipfrac)}

    # ------------------------------------------------------------------ the RL step
    def training_step(self, dataloader_iter) -> StepOutput:
        t0 = time.perf_counter()
        batch, _, _ = next(dataloader_iter)
        timings = {"perf/rollout_s": time.perf_counter() - t0}
        out = self.rl_step_on(batch, timings)
        self.rl_step += 1
        self._pin_global_step()
        return out

    def rl_step_on(self, batch: RolloutBatch, timings: dict[str, float]) -> StepOutput:
        """rollout -> rewards -> values -> advantages -> PPO epochs -> sync -> log."""
        self.check_on_policy(batch)
        batch = batch.to(self.device)
        t = time.perf_counter()
        critic_first = self.values_from_update(len(batch))
        prep = self.prepare(batch)
        timings["perf/forward_s"] = time.perf_counter() - t
        mask = batch.response_mask
        rewards = self.token_rewards(batch)
        metrics: dict[str, float] = {}
        if self.ref_model is not None and prep.old_logp is not None:
            kl_mean = self._kl_ref(prep, mask)
            metrics["actor/kl_ref"] = float(kl_mean)
            if self.algorithm.kl_reward_coef > 0:
                rewards = kl_penalty_rewards(rewards, prep.old_logp, prep.ref_logp, mask,
                                             self.kl_ctl.value, self.algorithm.kl_reward_estimator)
                metrics["actor/kl_coef"] = self.kl_ctl.value
                self.kl_ctl.update(float(kl_mean), n_steps=len(batch) * self._world)
        t = time.perf_counter()
        critic_done = None
        if critic_first:  # Monte-Carlo returns need no values: the critic's pass runs first and gives them to GAE
            returns = self.compute_advantages(batch, rewards, torch.zeros_like(rewards)).returns
            bad = self.first_bad_tensor({"token rewards": rewards, "returns": returns}, batch.response_mask,
                                        bound={"token rewards": self.algorithm.max_abs_reward})
            if bad is None:
                prep.old_values, critic_done = self.critic_pass_first(batch, returns)
            else:
                prep.old_values = torch.zeros_like(rewards)
        adv = self.compute_advantages(batch, rewards, prep.old_values)
        bad = self.first_bad_tensor({"token rewards": rewards, "advantages": adv.advantages, "returns": adv.returns},
                                    batch.response_mask, bound={"token rewards": self.algorithm.max_abs_reward})
        if bad is not None and critic_done is not None:
            self.optimizers().zero_grad(set_to_none=True)  # the critic's gradients of a skipped update
        replay = self.critic is not None and self.algorithm.critic_replay_batches > 0
        if bad is None:
            metrics.update(self.update(batch, prep, adv, epochs=self.algorithm.ppo_epochs if replay else None,
                                       critic_done=critic_done))
            bad = metrics.pop("_bad", None)
        if replay and bad is None:
            metrics.update(self.replay_critic_passes(batch))
            bad = metrics.pop("_bad", None)
        if replay and bad is None:
            self.critic_replay.append(batch.to("cpu"))
        if self.ref_model is not None and "actor/kl_ref" not in metrics and prep.old_logp is not None:
            metrics["actor/kl_ref"] = float(self._kl_ref(prep, mask))  # old log-probs came from the update pass
        skipped = bad is not None
        self.record_skip(bad)
        metrics["train/step_skipped"] = float(skipped)
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        timings["perf/update_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.sync_weights()
        timings["perf/sync_s"] = time.perf_counter() - t
        metrics.update(self.rollout_metrics(batch, prep, adv))
        if prep.old_values is not None:  # against Monte-Carlo returns, whatever lambda_critic the targets use
            mc = adv if self.algorithm.lambda_critic == 1.0 else self.compute_advantages(
                batch, rewards, prep.old_values, monte_carlo_critic=True)
            metrics["critic/explained_var_mc"] = float(explained_variance(prep.old_values, mc.returns, mask))
        metrics.update(timings)
        self.log_metrics(metrics, batch)
        return StepOutput(rollout=batch, entropy=prep.entropy, metrics=metrics)

    def _kl_ref(self, prep: PreparedBatch, mask: Tensor) -> Tensor:
        kl = kl_estimate(prep.old_logp, prep.ref_logp, self.algorithm.kl_reward_estimator)
        return masked_mean(kl, mask, reduce=self._sum_across_ranks)

    def first_bad_tensor(self, tensors: dict[str, Tensor], mask: Tensor, bound: dict[str, float] | None = None
                         ) -> str | None:
        """The name (and what is wrong) of the first tensor with a non-finite value on ``mask``, or with a value
        beyond its ``bound``; ``None`` if all are fine. Decided on every rank alike (one all-reduce)."""
        bound = bound or {}
        flags = []
        for name, t in tensors.items():
            v = t[mask] if t.shape == mask.shape else t
            flags.append(torch.stack([(~torch.isfinite(v)).any(), (v.abs() > bound.get(name, math.inf)).any()]))
        flags = self._sum_across_ranks(torch.stack(flags).float()) > 0
        for (name, _), (nonfinite, too_big) in zip(tensors.items(), flags.tolist()):
            if nonfinite:
                return f"{name} (non-finite)"
            if too_big:
                return f"{name} (|value| > {bound[name]:g})"
        return None

    def record_skip(self, bad: str | None) -> None:
        """Count a skipped update (or reset the run of them); warn once per skip, stop after too many in a row."""
        if bad is None:
            self.skipped_in_a_row = 0
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        step = self.rl_step + 1
        if self.trainer.is_global_zero:
            log.warning("RL step %d: update skipped, %s (%d skipped in a row)", step, bad, self.skipped_in_a_row)
        limit = self.algorithm.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise RunStopped(f"stopping: {limit} RL steps in a row skipped their update (step {step}: {bad}); "
                               "see algorithm.max_abs_reward and the reward hooks")

    def check_on_policy(self, batch: RolloutBatch) -> None:
        if batch.weight_version != self.policy_version:
            raise RuntimeError(
                f"off-policy rollout: generated by weight version {batch.weight_version}, the policy is at "
                f"{self.policy_version} (was the batch prefetched?)"
            )

    def compute_advantages(self, batch: RolloutBatch, rewards: Tensor, values: Tensor | None,
                           monte_carlo_critic: bool = False) -> AdvantageOutputs:
        params = self.algorithm.advantage_params()
        if monte_carlo_critic:  # value pretraining trains on Monte-Carlo returns (lambda = 1)
            params = replace(params, lambda_critic=1.0)
        inputs = AdvantageInputs(token_rewards=rewards, mask=batch.response_mask, values=values,
                                 group_index=batch.group_index, baseline_scores=batch.baseline_scores,
                                 reduce=self._sum_across_ranks)
        return ADVANTAGE_ESTIMATORS.get(self.algorithm.estimator)(inputs, params)

    def _minibatches(self, n: int, epoch: int = 0, critic_only: bool = False) -> list[Tensor]:
        """Shuffled local row indices, one tensor per optimizer step; critic-only passes use
        ``critic_minibatch_size`` when it is set."""
        cfg = self.algorithm
        world = self._world
        name, size = "minibatch_size", cfg.minibatch_size
        if critic_only and cfg.critic_minibatch_size is not None:
            name, size = "critic_minibatch_size", cfg.critic_minibatch_size
        if size % world:
            raise ValueError(f"algorithm.{name}={size} is not divisible by {world} ranks")
        local = size // world
        if n % local:
            raise ValueError(
                f"algorithm.{name}={size} does not divide the rollout batch of {n * world} "
                "samples (prompts_per_step x samples_per_prompt)"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rl_step + epoch * 7_919_000_003)
        return list(torch.randperm(n, generator=g).split(local))

    def update(self, batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs,
               critic_only: bool = False, epochs: int | None = None,
               critic_done: dict[str, Tensor] | None = None) -> dict[str, float]:
        """K epochs over minibatches (``epochs`` overrides K); one optimizer step per minibatch, micro-batches
        accumulate. ``critic_done``: the first pass's critic gradients are in place already
        (``critic_pass_first``), with these statistics.

        Each micro-batch's loss is divided by its minibatch's *global* counts (tokens, correct tokens,
        sequences; summed over ranks and divided by the world size, since DDP averages gradients), so the
        accumulated gradient is exactly that of the whole minibatch's loss, e.g. the Token-level loss."""
        cfg = self.algorithm
        opt = self.optimizers()
        sched = self.lr_schedulers()
        device = batch.scores.device
        world = self._world
        policy_mask = batch.response_mask
        if cfg.mask_truncated:
            policy_mask = policy_mask & ~batch.truncated.unsqueeze(1)
        positive_mask = policy_mask & batch.correct.unsqueeze(1)
        per_step: dict[str, list[Tensor]] = defaultdict(list)  # one entry per optimizer step
        bad: str | None = None  # the first minibatch whose loss or gradient was not finite
        # old log-probs left to this pass (one_update_per_batch): filled from each micro-batch's own forward
        fill = None if critic_only or prep.old_logp is not None else {
            "logp": torch.zeros(policy_mask.shape, device=device), "entropy": torch.zeros(policy_mask.shape, device=device)}
        # ppo_epochs passes train both models; the critic's extra passes (critic_epochs) train it alone
        n_epochs = cfg.ppo_epochs
        if self.critic is not None:
            n_epochs = cfg.critic_epochs or cfg.ppo_epochs
        if epochs is not None:
            n_epochs = epochs
        for epoch in range(n_epochs):
            critic_only_epoch = critic_only or epoch >= cfg.ppo_epochs
            for mb_idx in self._minibatches(len(batch), epoch, critic_only=critic_only_epoch):
                mb_idx = mb_idx.to(device)
                counts = torch.stack([policy_mask[mb_idx].sum(), batch.response_mask[mb_idx].sum(),
                                      positive_mask[mb_idx].sum()]).float()
                n_tok, n_val_tok, n_pos = self._sum_across_ranks(counts) / world
                summed: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
                averaged: dict[str, list[Tensor]] = defaultdict(list)
                total = torch.zeros((), device=device)  # this minibatch's loss, for the finite check
                critic_here = self.critic is not None and (critic_done is None or critic_only_epoch)
                if self.critic is not None and not critic_here:
                    summed["critic/value_loss"] += critic_done["critic/value_loss"]
                    averaged["critic/vf_clipfrac"].extend(critic_done["critic/vf_clipfrac"].unbind())
                    total = total + critic_done["critic/value_loss"]
                for idx in self._micro_batches(mb_idx):
                    loss = torch.zeros((), device=device)
                    if not critic_only_epoch:
                        actor_loss, terms, ratios = self.actor_loss(batch, prep, adv, idx, policy_mask, n_tok,
                                                                    n_pos, len(mb_idx) / world, fill=fill)
                        loss = loss + actor_loss
                        for k, v in terms.items():
                            summed[k] += v
                        for k, v in ratios.items():
                            averaged[k].append(v)
                    if critic_here:
                        critic_loss, vstats = self.critic_loss(batch, prep, adv, idx, n_val_tok)
                        loss = loss + critic_loss
                        summed["critic/value_loss"] += critic_loss.detach()
                        averaged["critic/vf_clipfrac"].append(vstats["vf_clipfrac"])
                    self.manual_backward(loss)
                    total = total + loss.detach()
                if cfg.ptx_coef > 0 and not critic_only_epoch:
                    ptx = self.ptx_backward()
                    summed["actor/ptx_loss"] += ptx
                    total = total + cfg.ptx_coef * ptx
                for k, v in summed.items():
                    per_step[k].append(v)
                for k, v in averaged.items():
                    per_step[k].append(torch.stack(v).mean())
                norms, bad_here = self._clip_and_step(opt, critic_only_epoch, total)
                for k, v in norms.items():
                    per_step[k].append(v)
                if bad_here is None:
                    sched.step()
                else:
                    bad = bad or bad_here
        if fill is not None:
            prep.old_logp, prep.entropy = fill["logp"], fill["entropy"]
        out = {k: torch.stack([t.float() for t in v]).mean().item() for k, v in per_step.items()}
        for group in opt.param_groups:
            out[f"{group['name']}/lr"] = group["lr"]
        if bad is not None:
            out["_bad"] = bad  # read (and removed) by rl_step_on
        return out

    def ptx_nll(self, ids: Tensor, attention: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(summed NLL, token count) of ``loss_mask``'s tokens under the actor (temperature 1): PPO-ptx's term."""
        logits = self.actor(input_ids=ids, attention_mask=attention, position_ids=_position_ids(attention),
                            use_cache=False).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:], 1.0, self.logprob_chunk_size)
        mask = loss_mask[:, 1:]
        return -(logp * mask).sum(), mask.sum()

    def ptx_backward(self) -> Tensor:
        """Add ``ptx_coef`` x the token-mean NLL of one PPO-ptx batch to the gradients (its own micro-batches; the
        mean is over the batch's tokens on all ranks, as the RL loss's). Returns the NLL, detached."""
        ids, attention, loss_mask = (t.to(self.device) for t in self.rollout_data.next_ptx_batch())
        world = self._world
        n_tok = (self._sum_across_ranks(loss_mask[:, 1:].sum().float()) / world).clamp(min=1)
        nll_total = torch.zeros((), device=self.device)
        for idx in torch.arange(len(ids), device=self.device).split(self.algorithm.micro_batch_size):
            nll, _ = self.ptx_nll(ids[idx], attention[idx], loss_mask[idx])
            self.manual_backward(self.algorithm.ptx_coef * nll / n_tok)
            nll_total = nll_total + nll.detach() / n_tok
        return nll_total

    def actor_loss(self, batch, prep, adv, idx, policy_mask, n_tok, n_pos, n_seqs, fill=None
                   ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Policy loss + mu * positive-example NLL + KL loss for micro-batch ``idx``; returns the loss, its
        detached terms (to be summed over micro-batches) and ratio statistics (to be averaged). With ``fill`` the
        old log-probs are this forward's own, detached (and written into ``fill`` with the entropies)."""
        cfg = self.algorithm
        mb = batch.select(idx)
        mask = policy_mask[idx]
        logp, ent = self.policy_logprobs(self.actor, mb, with_entropy=fill is not None)
        if fill is not None:
            old = logp.detach()
            fill["logp"][idx] = old
            fill["entropy"][idx] = ent
        else:
            old = prep.old_logp[idx]
        pg = POLICY_LOSSES.get(cfg.policy_loss)(logp, old, adv.advantages[idx], mask, cfg.policy_loss_params())
        # a constant divisor (Dr.GRPO): data.max_response_length, not this batch's padded width
        norm_length = cfg.norm_length or self.max_response_length or mask.shape[1]
        loss = aggregate(pg.loss, mask, cfg.loss_agg_mode, norm_length=norm_length, num_tokens=n_tok,
                         num_seqs=n_seqs)
        terms = {"actor/pg_loss": loss.detach()}
        if cfg.nll_coef > 0:
            nll = positive_example_nll(logp, mask, mb.correct, num_tokens=n_pos.clamp(min=1))
            loss = loss + cfg.nll_coef * nll
            terms["actor/nll_loss"] = nll.detach()
        if cfg.kl_loss_coef > 0:
            kl = aggregate(kl_estimate(logp, prep.ref_logp[idx], cfg.kl_loss_estimator), mask,
                           cfg.loss_agg_mode, norm_length=norm_length, num_tokens=n_tok, num_seqs=n_seqs)
            loss = loss + cfg.kl_loss_coef * kl
            terms["actor/kl_loss"] = kl.detach()
        return loss, terms, {f"actor/{k}": v for k, v in pg.stats.items()}

    def critic_loss(self, batch, prep, adv, idx, n_tok) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss toward the ``lambda_critic`` returns for micro-batch ``idx`` (token mean over the
        minibatch)."""
        mb = batch.select(idx)
        return self._value_loss(mb, self.critic_values(mb), prep.old_values[idx], adv.returns[idx], n_tok)

    def _value_loss(self, mb: RolloutBatch, values: Tensor, old: Tensor, returns: Tensor, n_tok: Tensor
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        vl, vstats = value_loss(values, old, returns, mb.response_mask, self.algorithm.value_clip)
        return aggregate(vl, mb.response_mask, "token-mean", num_tokens=n_tok), vstats

    def _clip_and_step(self, opt, critic_only: bool, loss: Tensor) -> tuple[dict[str, Tensor], str | None]:
        """Clip each model's gradient norm separately, then step, unless the loss or a gradient norm is not
        finite: then the gradients are dropped and nothing moves (under DeepSpeed only the loss is checked, its
        config clips, and the skip path is untested there). Returns the pre-clip norms and what was wrong
        (``None`` when the step was taken)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        norms = {}
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):  # DeepSpeed clips in its own config
            clips = {"actor": self.optim.actor_grad_clip, "critic": self.optim.critic_grad_clip}
            for group in opt.param_groups:
                if critic_only and group["name"] == "actor":
                    continue
                norm = torch.nn.utils.clip_grad_norm_(group["params"], clips[group["name"]] or math.inf)
                norms[f"{group['name']}/grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        checks = {"loss": loss.reshape(1)} | {k: v.reshape(1) for k, v in norms.items()}
        bad = self.first_bad_tensor(checks, torch.ones(1, dtype=torch.bool, device=loss.device))
        if bad is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norms, bad

    def replay_critic_passes(self, batch: RolloutBatch) -> dict[str, float]:
        """The critic-only passes of an RL step with ``algorithm.critic_replay_batches``: as many rows as those passes
        would train on (``len(batch)`` x (``critic_epochs`` - ``ppo_epochs``)), drawn without repeats (while the
        pool lasts) from the current batch and the earlier RL batches kept in ``critic_replay``; targets are the
        returns under the configured ``lambda_critic``, from the critic as it is now. Rows of earlier batches carry
        their own policy's returns: off-policy, which is the trade for seeing more prompts per update. Logged as
        ``critic/replay_*``."""
        cfg = self.algorithm
        n = len(batch) * ((cfg.critic_epochs or cfg.ppo_epochs) - cfg.ppo_epochs)
        pool = self.rollout_data.concat([*self.critic_replay, batch.to("cpu")])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rl_step + 7_777_777)
        rows = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(-(-n // len(pool)))])[:n]
        metrics = self._critic_pass_on_rows(pool, rows)
        out = {"critic/replay_" + k.removeprefix("critic/"): v for k, v in metrics.items() if k.startswith("critic/")}
        out["critic/replay_rows_from_earlier_batches"] = float((rows < len(pool) - len(batch)).float().mean())
        if "_bad" in metrics:
            out["_bad"] = metrics["_bad"]
        return out

    def _critic_pass_on_rows(self, pool: RolloutBatch, rows: Tensor, monte_carlo_critic: bool = False
                             ) -> dict[str, float]:
        """One critic-only pass over rows ``rows`` of ``pool`` (replay during pretraining and RL), with targets from
        the critic as it is now."""
        sub = pool.select(rows).to(self.device)
        prep = self.prepare(sub, critic_only=True)
        adv = self.compute_advantages(sub, self.token_rewards(sub), prep.old_values, monte_carlo_critic)
        return self.update(sub, prep, adv, critic_only=True, epochs=1)

    def value_pretrain_step(self, batch: RolloutBatch, replay: Sequence[RolloutBatch] = (), draw: int = 0
                            ) -> dict[str, float]:
        """One critic-only update on Monte-Carlo returns, in the trainer's precision context (it runs from a callback,
        outside ``training_step``, which is all Lightning wraps); see ``_value_pretrain_step``."""
        with self.trainer.precision_plugin.train_step_context():
            return self._value_pretrain_step(batch, replay, draw)

    def _value_pretrain_step(self, batch: RolloutBatch, replay: Sequence[RolloutBatch] = (), draw: int = 0
                             ) -> dict[str, float]:
        """One critic-only update on Monte-Carlo returns; the policy and the engine stay unchanged.

        With ``replay`` (earlier pretraining batches of the same frozen policy, so still on-policy) the update trains
        on ``len(batch)`` x ``critic_epochs`` rows drawn at random from ``replay`` and ``batch`` together, in one pass:
        its minibatches then mix the prompts of many batches instead of a few prompts' samples in a row (``draw``
        seeds the choice). Explained variance is measured on ``batch`` alone, before the update, either way."""
        self.check_on_policy(batch)
        for old in replay:
            self.check_on_policy(old)
        batch = batch.to(self.device)
        prep = self.prepare(batch, critic_only=True)
        rewards = self.token_rewards(batch)
        adv = self.compute_advantages(batch, rewards, prep.old_values, monte_carlo_critic=True)
        bad = self.first_bad_tensor({"token rewards": rewards, "returns": adv.returns}, batch.response_mask,
                                    bound={"token rewards": self.algorithm.max_abs_reward})
        ev = float(explained_variance(prep.old_values, adv.returns, batch.response_mask))
        reward_mean = float(batch.scores.mean())
        if bad is not None:
            metrics = {"critic/value_loss": math.nan}
        elif replay:
            pool = self.rollout_data.concat([*(b.to("cpu") for b in replay), batch.to("cpu")])
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
            n = min(len(pool), len(batch) * (self.algorithm.critic_epochs or self.algorithm.ppo_epochs))
            rows = torch.randperm(len(pool), generator=g)[:n].sort().values
            metrics = self._critic_pass_on_rows(pool, rows, monte_carlo_critic=True)
        else:
            metrics = self.update(batch, prep, adv, critic_only=True)
        self.record_skip(bad or metrics.pop("_bad", None))
        metrics["critic/explained_var"] = ev  # both of the newest batch, whatever the update trained on
        metrics["rollout/reward_mean"] = reward_mean
        self._pin_global_step()
        return {k: v for k, v in metrics.items() if not k.startswith("actor/")}

    def critic_state(self) -> dict[str, Tensor] | None:
        """The critic's full weights on CPU on global rank 0 (gathered if sharded, a bucket at a time), None on the
        other ranks, e.g. to save a pretrained critic. Every rank must call it."""
        from vapo_pl.parallel import full_state_on_rank0

        return full_state_on_rank0(self.critic, self.trainer.strategy)

    def load_critic_state(self, state: dict[str, Tensor]) -> None:
        from vapo_pl.parallel import load_full_state

        load_full_state(self.critic, state, self.trainer.strategy)

    # ------------------------------------------------------------------ weight sync and step counting
    def sync_weights(self, bump: bool = True) -> None:
        """Stream the actor to the engine, never the whole model at once: sharded weights (FSDP2/ZeRO-3) gathered
        and cast to the engine's dtype one bucket at a time (``data.engine.weight_sync_bucket_mb``), weights held
        whole as views that the engine casts while it copies (``stream_state_items``)."""
        from vapo_pl.parallel import stream_state_items

        self.check_finite_weights()
        dm = self.rollout_data
        if bump:
            self.policy_version += 1
        dm.sync_weights(stream_state_items(self.actor, self.trainer.strategy, dtype=dm.weight_dtype,
                                           bucket_bytes=dm.weight_sync_bucket_bytes), version=self.policy_version)

    def check_finite_weights(self) -> None:
        """Refuse to hand the engine an actor with a non-finite weight (each rank checks what it holds)."""
        flag = torch.zeros((), device=self.device)
        with torch.no_grad():
            for p in self.actor.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                if local.numel() and not bool(torch.isfinite(local).all()):
                    flag = flag + 1
                    break
        if float(self._sum_across_ranks(flag)) > 0:
            raise RuntimeError(f"the actor has non-finite weights after RL step {self.rl_step}: not syncing them "
                               "to the engine")

    def _pin_global_step(self) -> None:
        """Make ``trainer.global_step`` count RL steps instead of optimizer steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.total.ready = progress.total.completed = self.rl_step

    # ------------------------------------------------------------------ metrics
    def rollout_metrics(self, batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs
                        ) -> dict[str, float]:
        mask = batch.response_mask
        lengths = batch.lengths.float()
        correct = batch.correct
        m: dict[str, float] = {
            "rollout/reward_mean": float(batch.scores.mean()),
            "rollout/acc": float(correct.float().mean()),
            "rollout/response_length_mean": float(lengths.mean()),
            "rollout/response_length_min": float(lengths.min()),
            "rollout/response_length_max": float(lengths.max()),
            "rollout/response_length_p50": float(lengths.quantile(0.5)),
            "rollout/response_length_p90": float(lengths.quantile(0.9)),
            "rollout/clip_ratio": float(batch.truncated.float().mean()),
            "actor/advantages_mean": float(masked_mean(adv.advantages, mask)),
            "actor/advantages_max": float(adv.advantages[mask].max()) if mask.any() else 0.0,
            "actor/advantages_min": float(adv.advantages[mask].min()) if mask.any() else 0.0,
            "critic/returns_mean": float(masked_mean(adv.returns, mask)),
        }
        if prep.entropy is not None:
            m["actor/entropy"] = float(masked_mean(prep.entropy, mask))
        if prep.old_values is not None:
            m["critic/values_mean"] = float(masked_mean(prep.old_values, mask))
            m["critic/explained_var"] = float(explained_variance(prep.old_values, adv.returns, mask))
        if adv.lambda_policy is not None:
            lam = adv.lambda_policy.float()
            m.update({"actor/lambda_policy_mean": float(lam.mean()), "actor/lambda_policy_min": float(lam.min()),
                      "actor/lambda_policy_max": float(lam.max())})
        for name, term in batch.reward_terms.items():
            m[f"reward/{name}"] = float(term.float().mean())
        m["perf/peak_rss_gb"] = peak_rss_gb()
        m.update(batch.stats)
        return m

    def log_metrics(self, metrics: dict[str, float], batch: RolloutBatch | None = None) -> None:
        """Average over ranks with one all-reduce, then write every RL step to the loggers (x axis = RL step,
        whatever ``log_every_n_steps`` says) and expose the values as callback metrics and in the progress bar."""
        keys = sorted(metrics)
        if self._world > 1:
            t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            t = self._sum_across_ranks(t) / self._world
            metrics = dict(zip(keys, t.tolist()))
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.rl_step + 1)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, logger=False)
        bar = {"reward": "rollout/reward_mean", "acc": "rollout/acc", "len": "rollout/response_length_mean"}
        for short, key in bar.items():
            if key in metrics:
                self.log(short, metrics[key], prog_bar=True, logger=False, on_step=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vapo"] = {
            "rl_step": self.rl_step,
            "policy_version": self.policy_version,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "kl_coef": self.kl_ctl.value,
            # which log directory (TensorBoard version) this run writes, so a resume continues it
            "log_versions": [getattr(lg, "version", None) for lg in self.trainer.loggers],
            # what differs between ranks, one entry per global rank: the file is written by rank 0 alone
            "ranks": self._gather_rank_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._evaluating and "state_dict" in checkpoint:  # an evaluation builds the actor alone
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("actor.")}
        state = checkpoint["vapo"]
        self.rl_step = state["rl_step"]
        self.policy_version = state["policy_version"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
        self.kl_ctl.value = state["kl_coef"]
        ranks = state.get("ranks") or [state]  # older checkpoints kept rank 0's state alone, at the top level
        mine = ranks[self.global_rank] if self.global_rank < len(ranks) else ranks[0]
        self.critic_replay.clear()
        self.critic_replay.extend(RolloutBatch(**b) for b in mine.get("critic_replay", []))
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["rng"]["cuda"])

    def _gather_rank_states(self) -> list[dict[str, Any]]:
        """Every rank's critic-replay pool and RNG states, in rank order (a collective: checkpoints are dumped on
        every rank). Plain dicts of CPU tensors and primitives: checkpoints load with ``weights_only=True``."""
        import torch.distributed as dist

        mine = {
            "critic_replay": [{f.name: getattr(b, f.name) for f in fields(b)} for b in self.critic_replay],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        if self._world == 1:
            return [mine]
        states: list[Any] = [None] * self._world
        dist.all_gather_object(states, mine)
        return [_to_cpu(s) for s in states]

    def export_actor(self, path: str) -> None:
        """Save the actor in Hugging Face format (with the tokenizer), loadable by vLLM and transformers.

        Every rank takes part (sharded weights are gathered); rank 0 writes into a temporary directory next to
        ``path`` and renames it into place, so ``path`` is either complete or absent, and an existing ``path`` is
        replaced."""
        from vapo_pl.parallel import full_state_on_rank0

        state = full_state_on_rank0(self.actor, self.trainer.strategy)  # host copies on rank 0 only
        if self.global_rank == 0:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
            old = target.with_name(f".{target.name}.old")
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            self.actor.save_pretrained(tmp, state_dict=state)
            self.rollout_data.load_tokenizer().save_pretrained(tmp)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            if old.exists():
                shutil.rmtree(old)
