"""VAPOModule: actor, critic and (optional) reference model, trained with manual optimization.

One ``training_step`` is one RL iteration and reads as the recipe:
rollout -> old log-probs and values -> rewards -> advantages -> K epochs of minibatch updates -> weight sync.
The mathematics lives in ``vapo_pl.algorithms`` (pure torch); the minibatch passes in ``vapo_pl.update``, the
critic's extra training in ``vapo_pl.critic_training``, checkpoint state in ``vapo_pl.run_state``
(``docs/architecture.md``). This file owns the models and orchestrates.

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
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from vapo_pl import forward, run_state
from vapo_pl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, AdvantageOutputs
from vapo_pl.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalty_rewards
from vapo_pl.algorithms.utils import masked_mean
from vapo_pl.batch import PreparedBatch, RolloutBatch, StepOutput
from vapo_pl.common import require_model_dir, sum_across_ranks, timed, world
from vapo_pl.config import AlgorithmConfig, OptimConfig
from vapo_pl.critic import ValueModel
from vapo_pl.critic_training import CriticTraining
from vapo_pl.forward import keep_output_head_in_fp32
from vapo_pl.lora import LoRAConfig, adapters_disabled, add_adapters
from vapo_pl.parallel import any_nonfinite
from vapo_pl.prompts import PromptRecord, render_prompt
from vapo_pl.rewards.base import RewardInput, RewardOutput
from vapo_pl.step_metrics import peak_rss_gb, step_metrics
from vapo_pl.update import CriticFirst, Updater, UpdateSkipped, make_optimizer

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def resolve_attn_implementation(choice: str) -> str:
    """``auto``: ``flash_attention_2`` when CUDA is available and ``flash_attn`` is installed, else ``sdpa``."""
    if choice != "auto":
        return choice
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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
        gradient_checkpointing: recompute activations in backward (saves memory on long responses); the output head then
            also runs ``logprob_chunk_size`` response tokens at a time and is recomputed in backward, so only one
            chunk's logits exist at once.
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
        attn_implementation: the attention kernel of actor, critic and reference model: ``auto`` (``flash_attention_2``
            on CUDA when the ``flash_attn`` package is installed, its varlen kernel then runs packed rows with no
            mask; ``sdpa`` otherwise), ``sdpa``, ``flash_attention_2`` or ``eager``.
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
        attn_implementation: str = "auto",
        lora: LoRAConfig | dict | None = None,
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
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got "
                             f"{attn_implementation!r}")
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
        self.attn_implementation = attn_implementation
        self.lora = LoRAConfig(**lora) if isinstance(lora, dict) else lora
        self._build_empty = False  # set while configure_model builds for FSDP2 (parameters on the meta device)
        self.seed = seed
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.actor: nn.Module | None = None
        self.critic: ValueModel | None = None
        self.ref_model: nn.Module | None = None
        self.rl_step = 0  # completed RL iterations
        self.skipped_steps = 0  # RL steps whose update was skipped for a non-finite or absurd value
        self.skipped_in_a_row = 0
        self.updater = Updater(self)  # minibatches, micro-batch accumulation, clipping, the optimizer step
        self.critic_training = CriticTraining(self)  # value pretraining, critic-only passes, the replay pool
        self.policy_version = 0  # weight syncs sent to the engine; rollouts must carry this version
        self._mismatch: dict[str, list[float]] = {}  # this fit's mismatch/* metrics, summarised at its end
        self.temperature = 1.0  # set from the DataModule: training log-probs use the sampler's temperature
        self.max_response_length: int | None = None  # set from the DataModule: Dr.GRPO's constant divisor
        # The reference model is frozen and rebuilt from model_path: it is no part of any checkpoint, under every
        # strategy (Lightning's, DeepSpeed's and FSDP2's sharded DCP save and load all go through these hooks).
        self.register_state_dict_post_hook(run_state.drop_reference_keys)
        self.register_load_state_dict_post_hook(run_state.reference_keys_not_required)
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
        """The policy in float32 (the master weights). Under FSDP2 (``self.builds_empty``) its parameters stay on the
        meta device, to be filled shard by shard after sharding (``vapo_pl.loading``); a subclass may return a real
        model instead, which is then sharded as it is."""
        from transformers import AutoModelForCausalLM

        from vapo_pl.loading import empty_from_pretrained

        path = require_model_dir(self.model_path, "model.model_path")
        attn = self.resolved_attn_implementation
        if self.builds_empty:
            return empty_from_pretrained(AutoModelForCausalLM, path, torch.float32, attn_implementation=attn)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)

    def build_critic(self) -> nn.Module:
        """A module mapping (input_ids, attention_mask, position_ids) to (B, L) values; with
        ``critic_logprob_features`` it also takes ``logprob_features=`` and has ``uses_logprob_features`` true."""
        path = require_model_dir(self.critic_path or self.model_path, "model.critic_path")
        return ValueModel.from_pretrained(path, init=self.critic_init, torch_dtype=torch.float32,
                                          head_init=self.critic_head_init, seed=self.seed,
                                          logprob_features=self.critic_logprob_features, empty=self.builds_empty,
                                          attn_implementation=self.resolved_attn_implementation)

    @property
    def builds_empty(self) -> bool:
        """Whether ``build_actor``/``build_critic`` are being called to build models for FSDP2, which are filled
        from the checkpoint after sharding (each rank reads its shard only)."""
        return self._build_empty

    @property
    def resolved_attn_implementation(self) -> str:
        """``attn_implementation`` with ``auto`` decided for this machine."""
        return resolve_attn_implementation(self.attn_implementation)

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """(B, T) rewards per response token: the sequence score on its last token (sparse reward). A multi-turn
        episode's turn rewards stay on each turn's last policy token and the rest of its return goes on its last
        token (a policy token), so a sequence's token rewards still sum to its score."""
        rewards = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.scores.device)
        last = (batch.lengths - 1).clamp(min=0).unsqueeze(1)
        if batch.turn_rewards is None:
            return rewards.scatter_(1, last, batch.scores.float().unsqueeze(1))
        outcome = batch.scores.float() - batch.turn_rewards.sum(1)
        return rewards.scatter_(1, last, outcome.unsqueeze(1)) + batch.turn_rewards.float()

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
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        self._build_empty = mesh is not None
        try:
            self._build_models()
        finally:
            self._build_empty = False
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh, then each rank's shards
            from vapo_pl.loading import materialize
            from vapo_pl.parallel import fully_shard_model

            strategy = self.trainer.strategy
            for m in (self.actor, self.critic, self.ref_model):
                if m is not None:
                    fully_shard_model(m, mesh, bf16=str(self.trainer.precision).startswith("bf16"),
                                      cpu_offload=getattr(strategy, "cpu_offload", False))
                    materialize(m, torch.device("cpu") if getattr(strategy, "cpu_offload", False)
                                else strategy.root_device)
                    if self.lora is not None:
                        from vapo_pl.lora import has_adapters, init_materialized_adapters

                        if has_adapters(m):
                            init_materialized_adapters(m, self.seed + (m is self.critic))

    def _build_models(self) -> None:
        self.actor = self.build_actor().train()
        if self.lora is not None:
            add_adapters(self.actor, self.lora, seed=self.seed)
        keep_output_head_in_fp32(self.actor)
        if self._evaluating:  # vapo-pl validate / test: the policy alone
            self.actor.eval()
        elif self.uses_critic:
            self.critic = self.build_critic().train()  # as the actor (Lightning warns about eval-mode modules)
            if self.critic_logprob_features and not getattr(self.critic, "uses_logprob_features", False):
                raise ValueError("model.critic_logprob_features is on, but build_critic() returned a critic without a "
                                 "log-prob head (build it with ValueModel.from_pretrained(..., logprob_features=True))")
            if self.lora is not None and self.lora.critic:
                add_adapters(self.critic, self.lora, trainable=("value_head.", "logprob_head."), seed=self.seed + 1)
        # with LoRA the reference policy is the actor with its adapters off (``reference_logprobs``): no copy
        if self.algorithm.uses_reference and not self._evaluating and self.lora is None:
            self.ref_model = self.build_actor().eval().requires_grad_(False)
            keep_output_head_in_fp32(self.ref_model)
        if self.gradient_checkpointing:
            self.actor.gradient_checkpointing_enable()
            if self.lora is not None:  # frozen embeddings: checkpointed blocks still need an input with grad
                self.actor.enable_input_require_grads()
            if self.critic is not None:
                self.critic.gradient_checkpointing_enable()

    def configure_optimizers(self):
        return make_optimizer(self.actor, self.critic, self.optim)

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
        if getattr(dm, "max_staleness", 0):
            from vapo_pl.config_checks import check_overlap

            check_overlap(self.algorithm, self.trainer.world_size, self.lora is not None)
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
            m = self._mismatch
            if m.get("mismatch/kl_k3"):
                mean = lambda k: sum(m[k]) / len(m[k])  # noqa: E731
                print(f"sampler/trainer mismatch over {len(m['mismatch/kl_k3'])} steps: mean |logp diff| "
                      f"{mean('mismatch/logp_abs_diff_mean'):.2e} (largest {max(m['mismatch/logp_abs_diff_max']):.2e}), "
                      f"KL k3 {mean('mismatch/kl_k3'):.2e}, ratio outside [0.5, 2] "
                      f"{mean('mismatch/ratio_outside_share'):.2e} of tokens", flush=True)

    def on_train_start(self) -> None:
        self.rollout_data.ensure_weights()

    @property
    def critic_replay(self) -> deque[RolloutBatch]:
        """The earlier RL batches (on CPU) the critic-only passes draw from (``algorithm.critic_replay_batches``)."""
        return self.critic_training.pool

    # ------------------------------------------------------------------ distributed helpers
    def _sum_across_ranks(self, x: Tensor) -> Tensor:
        return sum_across_ranks(x)

    @property
    def _world(self) -> int:
        return world()[1]

    # ------------------------------------------------------------------ forward passes
    def policy_logprobs(self, model: nn.Module, batch: RolloutBatch, with_entropy: bool = False
                        ) -> tuple[Tensor, Tensor | None]:
        """(B, T) log-probs (and entropies) of the response tokens under ``model`` at the sampler's temperature."""
        return forward.policy_logprobs(model, batch, self.temperature, self.logprob_chunk_size,
                                       self.pack_row_tokens if self.packing else None, with_entropy,
                                       checkpoint_head=self.gradient_checkpointing)

    @property
    def has_reference(self) -> bool:
        """Whether reference log-probs exist: a reference model, or (LoRA) the actor with its adapters off."""
        return self.ref_model is not None or (self.lora is not None and self.algorithm.uses_reference
                                              and self.actor is not None and not self._evaluating)

    def reference_logprobs(self, batch: RolloutBatch) -> Tensor:
        """(B, T) log-probs under the reference policy: the reference model, or the LoRA actor without adapters."""
        if self.ref_model is not None:
            return self.policy_logprobs(self.ref_model, batch)[0]
        with adapters_disabled(self.actor):
            return self.policy_logprobs(self.actor, batch)[0]

    def critic_values(self, batch: RolloutBatch) -> Tensor:
        """(B, T) values V(s_t), s_t = prompt + response[:t], read at the last token of s_t (0 at padding)."""
        return forward.critic_values(self.critic, batch, self.pack_row_tokens if self.packing else None)

    def one_update_per_batch(self, n: int) -> bool:
        """Whether the actor's old log-probs can come from the update pass: one PPO epoch over one minibatch, and no
        KL penalty in the reward (which needs them before the update)."""
        cfg = self.algorithm
        return (self.reuse_update_forward and cfg.ppo_epochs == 1 and len(self.updater.minibatches(n)) == 1
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
        for idx, host_idx in self.updater.micro_batches(torch.arange(len(batch)), batch.scores.device):
            mb = batch.select(idx, host_idx)
            if actor_here:
                logp, ent = self.policy_logprobs(self.actor, mb, with_entropy=True)
                parts["old_logp"].append(logp)
                parts["entropy"].append(ent)
            if not critic_only and self.has_reference:
                parts["ref_logp"].append(self.reference_logprobs(mb))
            if self.critic is not None and values:
                parts["old_values"].append(self.critic_values(mb))
        return PreparedBatch(**{k: torch.cat(v) for k, v in parts.items()})

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
        """rollout -> rewards -> values -> advantages -> update -> sync -> log."""
        staleness = self.check_on_policy(batch)
        batch = batch.to(self.device)
        with timed(timings, "perf/forward_s"):
            prep = self.prepare(batch)
        rewards, metrics = self.shaped_rewards(batch, prep)
        with timed(timings, "perf/update_s"):
            adv, critic_first = self.critic_training.values_and_advantages(batch, rewards, prep)
            try:
                self.updater.check({"token rewards": rewards, "advantages": adv.advantages, "returns": adv.returns},
                                   batch.response_mask, bound={"token rewards": self.algorithm.max_abs_reward})
                metrics.update(self.update(batch, prep, adv, epochs=self.critic_training.joint_epochs,
                                           critic_first=critic_first))
                metrics.update(self.critic_training.after_update(batch))
                skipped = None
            except UpdateSkipped as skip:
                if critic_first is not None:
                    self.optimizers().zero_grad(set_to_none=True)  # the critic's gradients of a skipped update
                metrics.update(skip.metrics)
                skipped = skip.reason
            self.updater.record_skip(skipped)
        wait = getattr(self.rollout_data, "wait_for_rollout", None)
        if getattr(self.rollout_data, "max_staleness", 0) and wait is not None:
            with timed(timings, "perf/rollout_wait_s"):  # the batch generated during this update, if still running
                wait()
        with timed(timings, "perf/sync_s"):
            self.sync_weights()
        metrics.update(step_metrics(self, batch, prep, adv, rewards, metrics, skipped))
        metrics["rollout/staleness"] = float(staleness)
        for k, v in metrics.items():
            if k.startswith("mismatch/"):
                self._mismatch.setdefault(k, []).append(v)
        metrics.update(timings)
        self.log_metrics(metrics, batch)
        return StepOutput(rollout=batch, entropy=prep.entropy, metrics=metrics)

    def shaped_rewards(self, batch: RolloutBatch, prep: PreparedBatch) -> tuple[Tensor, dict[str, float]]:
        """(B, T) token rewards (``token_rewards``) with the KL penalty against the reference model when
        ``kl_reward_coef`` > 0 (the adaptive controller steps here), and the KL metrics."""
        rewards = self.token_rewards(batch)
        metrics: dict[str, float] = {}
        if self.has_reference and prep.old_logp is not None:
            kl_mean = self._kl_ref(prep, batch.response_mask)
            metrics["actor/kl_ref"] = float(kl_mean)
            if self.algorithm.kl_reward_coef > 0:
                rewards = kl_penalty_rewards(rewards, prep.old_logp, prep.ref_logp, batch.response_mask,
                                             self.kl_ctl.value, self.algorithm.kl_reward_estimator)
                metrics["actor/kl_coef"] = self.kl_ctl.value
                self.kl_ctl.update(float(kl_mean), n_steps=len(batch) * self._world)
        return rewards, metrics

    def _kl_ref(self, prep: PreparedBatch, mask: Tensor) -> Tensor:
        kl = kl_estimate(prep.old_logp, prep.ref_logp, self.algorithm.kl_reward_estimator)
        return masked_mean(kl, mask, reduce=self._sum_across_ranks)

    def check_on_policy(self, batch: RolloutBatch) -> int:
        """How many weight versions old ``batch`` is; more than ``data.max_staleness`` (0: on-policy) is an error."""
        allowed = getattr(self.rollout_data, "max_staleness", 0)
        lag = self.policy_version - batch.weight_version
        if not 0 <= lag <= allowed:
            raise RuntimeError(
                f"off-policy rollout: generated by weight version {batch.weight_version}, the policy is at "
                f"{self.policy_version}; data.max_staleness={allowed} allows {allowed} version(s) of lag"
            )
        return lag

    def compute_advantages(self, batch: RolloutBatch, rewards: Tensor, values: Tensor | None,
                           monte_carlo_critic: bool = False) -> AdvantageOutputs:
        params = self.algorithm.advantage_params()
        if monte_carlo_critic:  # value pretraining trains on Monte-Carlo returns (lambda = 1)
            params = replace(params, lambda_critic=1.0)
        inputs = AdvantageInputs(token_rewards=rewards, mask=batch.response_mask, values=values,
                                 group_index=batch.group_index, baseline_scores=batch.baseline_scores,
                                 reduce=self._sum_across_ranks)
        return ADVANTAGE_ESTIMATORS.get(self.algorithm.estimator)(inputs, params)

    def update(self, batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs, critic_only: bool = False,
               epochs: int | None = None, critic_first: CriticFirst | None = None) -> dict[str, float]:
        """The minibatch passes over ``batch`` (``Updater.run``): the statistics, or ``UpdateSkipped``."""
        return self.updater.run(batch, prep, adv, critic_only, epochs, critic_first)

    def ptx_nll(self, ids: Tensor, attention: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(summed NLL, token count) of ``loss_mask``'s tokens under the actor: PPO-ptx's term (``Updater.ptx_nll``)."""
        return self.updater.ptx_nll(ids, attention, loss_mask)

    def _clip_and_step(self, opt, critic_only: bool, loss: Tensor) -> tuple[dict[str, Tensor], str | None]:
        """Clip each model's gradients and step (``Updater.clip_and_step``); a subclass may wrap it."""
        return self.updater.clip_and_step(opt, critic_only, loss)

    def value_pretrain_step(self, batch: RolloutBatch, replay: Sequence[RolloutBatch] = (), draw: int = 0
                            ) -> dict[str, float]:
        """One value-pretraining step (``CriticTraining.pretrain_step``); ``ValuePretraining`` calls this hook."""
        return self.critic_training.pretrain_step(batch, replay, draw)

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

        if any_nonfinite(self.actor, self._sum_across_ranks):
            raise RuntimeError(f"the actor has non-finite weights after RL step {self.rl_step}: not syncing them "
                               "to the engine")
        dm = self.rollout_data
        if bump:
            self.policy_version += 1
        if self.lora is not None:  # the adapter alone, or full weights with it folded in
            from vapo_pl.lora import adapter_items, full_tensors, merged_items, peft_config_dict

            if self.lora.sync == "adapter":
                dm.sync_adapter(full_tensors(adapter_items(self.actor)), peft_config_dict(self.lora, self.model_path),
                                version=self.policy_version)
            else:
                dm.sync_weights(full_tensors(merged_items(self.actor, dtype=dm.weight_dtype)),
                                version=self.policy_version)
            return
        dm.sync_weights(stream_state_items(self.actor, self.trainer.strategy, dtype=dm.weight_dtype,
                                           bucket_bytes=dm.weight_sync_bucket_bytes), version=self.policy_version)

    def _pin_global_step(self) -> None:
        """Make ``trainer.global_step`` count RL steps instead of optimizer steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.total.ready = progress.total.completed = self.rl_step

    # ------------------------------------------------------------------ metrics
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

    # ------------------------------------------------------------------ checkpoints and export (``run_state``)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vapo"] = run_state.module_state(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run_state.restore_module_state(self, checkpoint)

    def export_actor(self, path: str, merged: bool = False) -> None:
        """Save the actor in Hugging Face format with the tokenizer (``run_state.export_actor``): with LoRA, the peft
        adapter, and with ``merged`` the merged model in ``<path>/merged`` too; every rank calls it."""
        run_state.export_actor(self, path, merged=merged)
