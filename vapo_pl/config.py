"""Typed configuration of the module: the single source of truth for every algorithm switch.

Each field has a one-line doc; invalid values raise ``ValueError`` naming ``algorithm.<field>`` or
``optim.<field>`` when the CLI instantiates the config, before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vapo_pl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageParams
from vapo_pl.algorithms.aggregation import AGG_MODES
from vapo_pl.algorithms.kl import KL_ESTIMATORS
from vapo_pl.algorithms.policy_losses import POLICY_LOSSES, PolicyLossParams
from vapo_pl.algorithms.rollout_correction import ROLLOUT_CORRECTIONS, CorrectionParams


@dataclass
class AlgorithmConfig:
    """What is computed in one RL step. Defaults are VAPO's (arXiv 2504.05118, section 4)."""

    estimator: str = "gae"  # advantage estimator: gae | grpo | dr_grpo | rloo | remax | reinforce_pp
    gamma: float = 1.0  # discount
    lambda_policy: float = 0.95  # GAE lambda of the actor's advantages (fixed; see length_adaptive_alpha)
    lambda_critic: float = 1.0  # Decoupled-GAE: GAE lambda of the critic's targets (1.0 = Monte-Carlo)
    length_adaptive_alpha: float | None = 0.05  # Length-adaptive GAE: lambda = 1 - 1/(alpha*l); None = off
    norm_by_std: bool = True  # grpo: divide by the group std
    whiten_advantages: bool = False  # gae: whiten advantages over the global batch
    policy_loss: str = "ppo"  # ppo | gspo | cispo | aspo
    eps_low: float = 0.2  # lower clip 1 - eps_low
    eps_high: float = 0.28  # Clip-Higher: upper clip 1 + eps_high (= eps_low for vanilla PPO)
    dual_clip_c: float | None = None  # dual-clip bound c (> 1) for negative advantages; None = off
    loss_agg_mode: str = "token-mean"  # Token-level loss: token-mean; vanilla PPO: seq-mean-token-mean
    norm_length: int | None = None  # seq-mean-token-sum-norm divisor (Dr.GRPO); default: data.max_response_length
    adv_eps: float = 1e-6  # added to the std in GRPO's group normalisation and in advantage whitening
    nll_coef: float = 0.1  # mu: weight of the positive-example NLL (0 = off)
    ptx_coef: float = 0.0  # PPO-ptx (InstructGPT): weight of a language-modelling NLL on data.ptx_files (0 = off)
    value_clip: float | None = 0.5  # clip range of the value loss around the old values; None = unclipped
    kl_reward_coef: float = 0.0  # beta of the per-token KL penalty in the reward (loads a reference model)
    kl_reward_estimator: str = "k1"  # k1 | k2 | k3 for the reward penalty
    kl_target: float | None = None  # adaptive KL controller target; None = fixed kl_reward_coef
    kl_horizon: int = 10000  # adaptive KL controller horizon (samples)
    kl_loss_coef: float = 0.0  # weight of a KL(pi || pi_ref) loss term (GRPO style; loads a reference model)
    kl_loss_estimator: str = "k3"  # k1 | k2 | k3 for the loss term
    mask_truncated: bool = False  # DAPO: drop truncated samples from the policy loss
    # sampler/trainer mismatch correction of the policy loss: none | token_tis | seq_tis | token_mis | seq_mis
    rollout_correction: str = "none"
    tis_cap: float = 2.0  # C of the TIS weights min(pi_old / mu, C) (Yao et al. 2025: 2)
    mis_low: float = 0.5  # MIS keeps tokens (or sequences) whose pi_old / mu lies in [mis_low, mis_high]
    mis_high: float = 2.0
    max_abs_reward: float = 1e4  # a token reward beyond this (or non-finite) skips the RL step's update
    max_skipped_steps: int = 3  # this many skipped RL steps in a row stop the run
    ppo_epochs: int = 1  # passes over each rollout batch
    critic_epochs: int | None = None  # passes of the critic (>= ppo_epochs; the extra ones train it alone); None = ppo_epochs
    minibatch_size: int = 64  # samples per optimizer step, over all ranks (the paper: 512)
    # samples per optimizer step of the critic-only passes (value pretraining, the extra critic_epochs); None =
    # minibatch_size. Small minibatches teach the critic more per sample (benchmarks/critic_fit.py)
    critic_minibatch_size: int | None = None
    # the critic-only passes of an RL step (critic_epochs beyond ppo_epochs) draw len(batch) rows per pass from this
    # many earlier RL batches and the current one, not the current one alone; off-policy (earlier policies' returns)
    critic_replay_batches: int = 0
    micro_batch_size: int = 8  # samples per forward/backward on one rank (gradient accumulation)

    def __post_init__(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"algorithm.estimator: unknown {self.estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS.names())}"
            )
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(
                f"algorithm.policy_loss: unknown {self.policy_loss!r}; valid: {', '.join(POLICY_LOSSES.names())}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"algorithm.loss_agg_mode: unknown {self.loss_agg_mode!r}; valid: {', '.join(AGG_MODES)}")
        for name in ("kl_reward_estimator", "kl_loss_estimator"):
            if getattr(self, name) not in KL_ESTIMATORS:
                raise ValueError(f"algorithm.{name}: unknown {getattr(self, name)!r}; valid: {', '.join(KL_ESTIMATORS)}")
        if not (isinstance(self.adv_eps, (int, float)) and 0 < self.adv_eps < math.inf):
            raise ValueError(f"algorithm.adv_eps must be a finite number > 0, got {self.adv_eps!r}")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"algorithm.rollout_correction: unknown {self.rollout_correction!r}; valid: "
                             f"{', '.join(ROLLOUT_CORRECTIONS.names())}")
        try:
            self.advantage_params()
            self.policy_loss_params()
            self.correction_params()
        except ValueError as e:
            raise ValueError(f"algorithm.{e}") from None
        if not self.eps_low <= 1:  # the lower clip bound 1 - eps_low is a ratio: >= 0 (CISPO's 1.0 = no lower bound)
            raise ValueError(f"algorithm.eps_low must be in [0, 1], got {self.eps_low}")
        for name in ("nll_coef", "ptx_coef", "kl_reward_coef", "kl_loss_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"algorithm.{name} must be >= 0, got {v}")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"algorithm.value_clip must be > 0 or null, got {self.value_clip}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"algorithm.kl_target must be > 0 or null, got {self.kl_target}")
        if self.kl_target is not None and self.kl_reward_coef == 0:
            # the adaptive controller scales beta multiplicatively: starting at 0 it would stay 0
            raise ValueError("algorithm.kl_target needs kl_reward_coef > 0 (the adaptive controller's initial beta)")
        if not (isinstance(self.max_abs_reward, (int, float)) and 0 < self.max_abs_reward < math.inf):
            raise ValueError(f"algorithm.max_abs_reward must be a finite number > 0, got {self.max_abs_reward!r}")
        for name in ("ppo_epochs", "minibatch_size", "micro_batch_size", "kl_horizon", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {getattr(self, name)}")
        if self.critic_minibatch_size is not None and self.critic_minibatch_size < 1:
            raise ValueError(f"algorithm.critic_minibatch_size must be >= 1 or null, got {self.critic_minibatch_size}")
        if self.critic_epochs is not None and self.critic_epochs < self.ppo_epochs:
            raise ValueError(
                f"algorithm.critic_epochs must be >= ppo_epochs ({self.ppo_epochs}) or null, got {self.critic_epochs}"
            )
        if self.critic_replay_batches < 0:
            raise ValueError(f"algorithm.critic_replay_batches must be >= 0, got {self.critic_replay_batches}")
        if self.critic_replay_batches and (self.critic_epochs or self.ppo_epochs) <= self.ppo_epochs:
            raise ValueError("algorithm.critic_replay_batches needs critic_epochs > ppo_epochs (the replay trains the "
                             "critic-only passes)")
        if self.critic_replay_batches and self.kl_reward_coef > 0:
            raise ValueError("algorithm.critic_replay_batches needs kl_reward_coef 0 (the KL penalty of an earlier "
                             "batch's rewards is not kept)")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"algorithm.norm_length must be >= 1, got {self.norm_length}")
        if self.policy_loss == "aspo" and self.dual_clip_c is None:
            raise ValueError("algorithm.dual_clip_c must be set for policy_loss 'aspo' (its soft dual clip)")

    @property
    def estimator_needs(self) -> frozenset[str]:
        """What the estimator reads besides rewards and mask (its registration's ``needs``)."""
        return ADVANTAGE_ESTIMATORS.needs(self.estimator)

    @property
    def uses_critic(self) -> bool:
        return "values" in self.estimator_needs

    @property
    def uses_reference(self) -> bool:
        return self.kl_reward_coef > 0 or self.kl_loss_coef > 0

    def advantage_params(self) -> AdvantageParams:
        return AdvantageParams(
            gamma=self.gamma, lambda_policy=self.lambda_policy, lambda_critic=self.lambda_critic,
            length_adaptive_alpha=self.length_adaptive_alpha, norm_by_std=self.norm_by_std,
            whiten_advantages=self.whiten_advantages, eps=self.adv_eps,
        )

    def policy_loss_params(self) -> PolicyLossParams:
        return PolicyLossParams(eps_low=self.eps_low, eps_high=self.eps_high, dual_clip_c=self.dual_clip_c)

    def correction_params(self) -> CorrectionParams:
        return CorrectionParams(tis_cap=self.tis_cap, mis_low=self.mis_low, mis_high=self.mis_high)


@dataclass
class OptimConfig:
    """AdamW for actor and critic (the paper: lr 1e-6 / 2e-6, warm-up then constant)."""

    actor_lr: float = 1e-6  # actor learning rate
    critic_lr: float = 2e-6  # critic learning rate
    weight_decay: float = 0.01  # AdamW weight decay (both models)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warm-up over this many optimizer steps, then constant
    actor_grad_clip: float | None = 1.0  # max grad norm of the actor; None = off
    critic_grad_clip: float | None = 1.0  # max grad norm of the critic; None = off

    def __post_init__(self) -> None:
        for name in ("actor_lr", "critic_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        # AdamW would reject these only in configure_optimizers, after the models are loaded.
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {tuple(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        for name in ("actor_grad_clip", "critic_grad_clip"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"optim.{name} must be > 0 or null, got {v}")
        self.betas = tuple(self.betas)


# Checkpoints store the module's hyper-parameters (these dataclasses); let `torch.load(weights_only=True)`,
# which Lightning uses on resume, reconstruct them.
import torch  # noqa: E402

torch.serialization.add_safe_globals([AlgorithmConfig, OptimConfig])
