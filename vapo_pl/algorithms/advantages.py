"""Advantage estimators: GAE (with VAPO's Decoupled and Length-adaptive lambdas) and the critic-free family.

Every estimator is registered in ``ADVANTAGE_ESTIMATORS`` under the name configs use and has one signature,
``fn(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs``, so the trainer never branches
on the name. All per-token tensors are (B, T) over response tokens; ``mask`` marks real tokens, and padded
positions may hold NaN or garbage: they are never read (``torch.where`` before any arithmetic, because
``NaN * 0`` is NaN) and are 0 in every output. Outputs carry no gradient.

Papers:
- ``gae``: Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (arXiv 1506.02438), eq. 16,
  with VAPO (arXiv 2504.05118) Decoupled-GAE (critic targets with ``lambda_critic``, advantages with
  ``lambda_policy``) and Length-adaptive GAE (``lambda_policy = 1 - 1/(alpha * l)`` per sequence).
- ``grpo``: DeepSeekMath (arXiv 2402.03300) outcome supervision, ``(r_i - mean(r)) / std(r)`` per group.
- ``dr_grpo``: Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv 2503.20783): no std division.
- ``rloo``: Ahmadian et al. 2024 (arXiv 2402.14740): the baseline is the mean of the *other* G-1 samples.
- ``remax``: Li et al. 2023 (arXiv 2310.10505): the baseline is the greedy response's score.
- ``reinforce_pp``: Hu 2025, REINFORCE++ (arXiv 2501.03262): discounted return-to-go of the token rewards
  (KL penalty included), whitened over the global batch.

Deliberate choices, where the papers are silent:
- Outcome estimators (grpo, dr_grpo, rloo, remax) score a sequence as the masked sum of its token rewards,
  so a per-token KL penalty folded into ``token_rewards`` enters the score; they ignore ``gamma``.
- Group std is the Bessel-corrected one (as ``torch.std``, which verl and TRL use); a group of one sample
  gets advantage 0 from grpo/dr_grpo (it has no baseline but itself) and is an error for rloo.
- Group statistics are taken on rewards shifted by the group minimum, so a group of identical rewards gives
  exactly 0 (no rounding residue amplified by ``1 / (std + eps)``).
- ``mask`` holes (e.g. tool-output tokens inside a multi-turn response) are skipped by the GAE scan, as verl
  does: the next value is that of the next *masked* token and discounting counts only masked tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vapo_pl.algorithms.utils import SumReducer, masked_sum, masked_whiten
from vapo_pl.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "AdvantageOutputs",
    "AdvantageParams",
    "compute_gae",
    "length_adaptive_lambda",
    "lengths_from_mask",
]

AdvantageFn = Callable[["AdvantageInputs", "AdvantageParams"], "AdvantageOutputs"]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")


def _check_unit_interval(name: str, value: float) -> None:
    # `not (0 <= v <= 1)` also rejects NaN
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class AdvantageParams:
    """Hyper-parameters of every estimator (each reads the ones it needs)."""

    gamma: float = 1.0  # discount, [0, 1]
    lambda_policy: float = 0.95  # actor's GAE lambda (Decoupled-GAE), [0, 1]
    lambda_critic: float = 1.0  # GAE lambda of the critic's targets, [0, 1]
    length_adaptive_alpha: float | None = None  # > 0; per-seq lambda_policy = clamp(1 - 1/(alpha*l), 0, 1)
    norm_by_std: bool = True  # grpo: divide by the group std
    whiten_advantages: bool = False  # gae: whiten advantages over the (global) batch
    eps: float = 1e-6  # > 0, added to std before dividing

    def __post_init__(self) -> None:
        _check_unit_interval("gamma", self.gamma)
        _check_unit_interval("lambda_policy", self.lambda_policy)
        _check_unit_interval("lambda_critic", self.lambda_critic)
        alpha = self.length_adaptive_alpha
        if alpha is not None and (
            not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0 < alpha < math.inf)
        ):
            raise ValueError(f"length_adaptive_alpha must be a finite number > 0 or None, got {alpha!r}")
        for name in ("norm_by_std", "whiten_advantages"):
            if not isinstance(getattr(self, name), bool):
                # project convention: config errors are ValueErrors naming the field
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")  # noqa: TRY004
        if not isinstance(self.eps, (int, float)) or not (0 < self.eps < math.inf):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")


@dataclass
class AdvantageInputs:
    """What the estimators read. Shapes are checked here; each estimator checks the optional fields it needs."""

    token_rewards: (
        Tensor  # (B, T) reward per response token (verifier score on the last token, KL penalty per token)
    )
    mask: Tensor  # (B, T) bool, True on real response tokens
    values: Tensor | None = None  # (B, T) critic values V(s_t) (required by gae)
    group_index: Tensor | None = None  # (B,) long, samples of one prompt share an index (grpo, dr_grpo, rloo)
    baseline_scores: Tensor | None = None  # (B,) remax: score of the greedy response for the same prompt
    reduce: SumReducer | None = None  # sums across ranks for global-batch stats (reinforce_pp, whitening)

    def __post_init__(self) -> None:
        if self.token_rewards.dim() != 2:
            raise ValueError(f"token_rewards must be (B, T), got shape {tuple(self.token_rewards.shape)}")
        shape = self.token_rewards.shape
        if self.mask.shape != shape or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(shape)}, "
                f"got {self.mask.dtype} of shape {tuple(self.mask.shape)}"
            )
        if self.values is not None and self.values.shape != shape:
            raise ValueError(f"values must have shape {tuple(shape)}, got {tuple(self.values.shape)}")
        if self.group_index is not None and (
            self.group_index.shape != shape[:1] or self.group_index.is_floating_point()
        ):
            raise ValueError(
                f"group_index must be an integer tensor of shape ({shape[0]},), "
                f"got {self.group_index.dtype} of shape {tuple(self.group_index.shape)}"
            )
        if self.baseline_scores is not None and self.baseline_scores.shape != shape[:1]:
            raise ValueError(
                f"baseline_scores must have shape ({shape[0]},), got {tuple(self.baseline_scores.shape)}"
            )


@dataclass
class AdvantageOutputs:
    advantages: Tensor  # (B, T), 0 on padding
    returns: Tensor  # (B, T), 0 on padding: gae's lambda_critic targets; reinforce_pp's return-to-go;
    #                   outcome estimators' sequence score broadcast to its tokens
    lambda_policy: Tensor | None = None  # (B,) per-sequence lambda actually used (gae only)


def lengths_from_mask(mask: Tensor) -> Tensor:
    """Response length per sequence: ``mask`` (B, T) bool -> (B,) long count of True entries."""
    return mask.sum(dim=-1, dtype=torch.long)


def length_adaptive_lambda(lengths: Tensor, alpha: float) -> Tensor:
    """VAPO's Length-adaptive GAE: ``clamp(1 - 1/(alpha * l), 0, 1)`` per sequence.

    Setting the total TD weight ``1/(1 - lambda)`` equal to ``alpha * l`` gives ``1 - 1/(alpha*l)``; for
    ``alpha * l <= 1`` (including ``l = 0``) that is <= 0, so it is clamped to 0 (one-step TD).

    Args:
        lengths: (B,) response lengths (any numeric dtype).
        alpha: > 0 [paper: 0.05].
    Returns:
        (B,) float lambdas (float32 for integer ``lengths``, else their dtype).
    """
    if not (0 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    scaled = lengths.to(lengths.dtype if lengths.is_floating_point() else torch.float32) * alpha
    # 1/0 = inf -> 1 - inf = -inf -> clamped to 0, so empty responses need no special case
    return (1.0 - 1.0 / scaled).clamp(0.0, 1.0)


def _next_masked_value(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T): the value at the next masked position after t (0 past the last one); holes are skipped."""
    B, T = values.shape
    positions = torch.arange(T, device=values.device).expand(B, T)
    idx = torch.where(mask, positions, T)  # T means "no token": points at the appended 0 below
    # reverse running min gives the first masked position >= t; shift by one for "> t"
    first_at_or_after = torch.flip(torch.cummin(torch.flip(idx, [1]), dim=1).values, [1])
    next_idx = torch.cat([first_at_or_after[:, 1:], idx.new_full((B, 1), T)], dim=1)
    padded = torch.cat([values, values.new_zeros(B, 1)], dim=1)
    return padded.gather(1, next_idx)


@torch.no_grad()
def compute_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16) with a per-sequence lambda.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V after the last token is 0),
    ``A_t = delta_t + gamma * lambda * A_{t+1}``, ``R_t = A_t + V_t``. One reverse scan over T updates the
    whole batch at once; ``lam`` may differ per sequence. ``mask`` holes are skipped (see module docstring).

    Args:
        token_rewards: (B, T) reward per response token; padding is never read.
        values: (B, T) critic values V(s_t); padding is never read.
        mask: (B, T) bool, True on real response tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1], a float or a (B,) / (B, 1) tensor (one per sequence).
    Returns:
        ``(advantages, returns)``, both (B, T) in the promoted dtype of rewards and values, 0 on padding.
    """
    _check_unit_interval("gamma", gamma)
    if token_rewards.dim() != 2 or values.shape != token_rewards.shape or mask.shape != token_rewards.shape:
        raise ValueError(
            "token_rewards, values and mask must share one (B, T) shape, got "
            f"{tuple(token_rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    B, T = token_rewards.shape
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    if isinstance(lam, Tensor):
        if lam.numel() != B or lam.dim() > 2:
            raise ValueError(f"lam must be a float or a ({B},) tensor, got shape {tuple(lam.shape)}")
        lam = lam.reshape(B).to(dtype)
        if not bool(((lam >= 0) & (lam <= 1)).all()):
            raise ValueError(
                f"lam must lie in [0, 1], got values in [{lam.min().item()}, {lam.max().item()}]"
            )
    else:
        _check_unit_interval("lam", lam)
        lam = torch.full((B,), float(lam), dtype=dtype, device=token_rewards.device)

    mask = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=token_rewards.device)
    rewards = torch.where(mask, token_rewards.to(dtype), zero)
    values = torch.where(mask, values.to(dtype), zero)
    deltas = rewards + gamma * _next_masked_value(values, mask) - values

    # time-major so each step touches contiguous memory
    deltas_tb, mask_tb = deltas.T.contiguous(), mask.T.contiguous()
    advantages_tb = torch.empty_like(deltas_tb)
    decay = gamma * lam  # (B,)
    running = torch.zeros(B, dtype=dtype, device=deltas.device)
    for t in range(T - 1, -1, -1):  # the time recursion; every sequence advances together
        running = torch.where(mask_tb[t], torch.addcmul(deltas_tb[t], decay, running), running)
        advantages_tb[t] = running
    advantages = torch.where(mask, advantages_tb.T, zero)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def _require(inputs: AdvantageInputs, field: str, estimator: str) -> Tensor:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"{field} is required by the {estimator!r} advantage estimator")
    return value


def _sequence_scores(inputs: AdvantageInputs) -> Tensor:
    """(B,) outcome score: the masked sum of the token rewards."""
    return masked_sum(inputs.token_rewards, inputs.mask, dim=-1)


def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, T): the sequence's value on each of its tokens, 0 on padding."""
    zero = torch.zeros((), dtype=per_sequence.dtype, device=per_sequence.device)
    return torch.where(mask, per_sequence[:, None], zero)


def _outcome_outputs(advantage: Tensor, scores: Tensor, mask: Tensor) -> AdvantageOutputs:
    return AdvantageOutputs(advantages=_broadcast(advantage, mask), returns=_broadcast(scores, mask))


@dataclass
class _Groups:
    ids: Tensor  # (B,) long in [0, G): compacted group_index
    sizes: Tensor  # (G,) float, samples per group
    deviations: Tensor  # (B,) score minus its group's minimum (exact 0 in a constant group)

    def sum(self, x: Tensor) -> Tensor:  # (B,) -> (G,)
        return x.new_zeros(self.sizes.shape[0]).index_add_(0, self.ids, x)


def _groups(scores: Tensor, group_index: Tensor) -> _Groups:
    ids = torch.unique(group_index, return_inverse=True)[1]
    num_groups = int(ids.max()) + 1 if ids.numel() else 0
    sizes = scores.new_zeros(num_groups).index_add_(0, ids, torch.ones_like(scores))
    group_min = scores.new_zeros(num_groups).scatter_reduce_(0, ids, scores, "amin", include_self=False)
    return _Groups(ids=ids, sizes=sizes, deviations=scores - group_min[ids])


def _centered(groups: _Groups) -> Tensor:
    """(B,) score minus its group mean."""
    mean = groups.sum(groups.deviations) / groups.sizes
    return groups.deviations - mean[groups.ids]


@ADVANTAGE_ESTIMATORS.register("gae", needs=("values",))
@torch.no_grad()
def gae_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """PPO/VAPO advantages: GAE with Decoupled (and optionally Length-adaptive) lambdas.

    Advantages use ``lambda_policy`` — per sequence ``clamp(1 - 1/(alpha*l), 0, 1)`` when
    ``length_adaptive_alpha`` is set — and returns (critic targets) are ``A^{lambda_critic} + V``.
    Both come from one scan: the batch is stacked with itself, the first half with the policy lambdas and
    the second with ``lambda_critic``. Optionally whitens the advantages over the global batch.
    Needs ``values`` (B, T).
    """
    values = _require(inputs, "values", "gae")
    mask, rewards = inputs.mask, inputs.token_rewards
    B = rewards.shape[0]
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if params.length_adaptive_alpha is not None:
        lam_policy = length_adaptive_lambda(lengths_from_mask(mask).to(dtype), params.length_adaptive_alpha)
    else:
        lam_policy = torch.full((B,), params.lambda_policy, dtype=dtype, device=rewards.device)
    lam_critic = torch.full_like(lam_policy, params.lambda_critic)

    advantages, returns = compute_gae(
        torch.cat([rewards, rewards]),
        torch.cat([values, values]),
        torch.cat([mask, mask]),
        params.gamma,
        torch.cat([lam_policy, lam_critic]),
    )
    advantages, returns = advantages[:B], returns[B:]
    if params.whiten_advantages:
        kwargs = {} if inputs.reduce is None else {"reduce": inputs.reduce}
        advantages = masked_whiten(advantages, mask, eps=params.eps, **kwargs)
    return AdvantageOutputs(advantages=advantages, returns=returns, lambda_policy=lam_policy)


@ADVANTAGE_ESTIMATORS.register("grpo", needs=("group_index",))
@torch.no_grad()
def grpo_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """GRPO outcome advantage ``(r_i - mean_g(r)) / (std_g(r) + eps)``, broadcast to every token.

    ``std_g`` is Bessel-corrected; ``norm_by_std=False`` skips the division (then it equals dr_grpo).
    Needs ``group_index`` (B,).
    """
    group_index = _require(inputs, "group_index", "grpo")
    scores = _sequence_scores(inputs)
    groups = _groups(scores, group_index)
    advantage = _centered(groups)
    if params.norm_by_std:
        # a singleton group has centered = 0 and var = 0/1, so its advantage is 0, not NaN
        var = groups.sum(advantage**2) / (groups.sizes - 1).clamp(min=1)
        advantage = advantage / (var.sqrt()[groups.ids] + params.eps)
    return _outcome_outputs(advantage, scores, inputs.mask)


@ADVANTAGE_ESTIMATORS.register("dr_grpo", needs=("group_index",))
@torch.no_grad()
def dr_grpo_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """Dr.GRPO outcome advantage ``r_i - mean_g(r)`` (no std division), broadcast to every token.

    The paper's other change, a constant length normaliser, lives in ``aggregation.py``. Needs ``group_index``.
    """
    group_index = _require(inputs, "group_index", "dr_grpo")
    scores = _sequence_scores(inputs)
    return _outcome_outputs(_centered(_groups(scores, group_index)), scores, inputs.mask)


@ADVANTAGE_ESTIMATORS.register("rloo", needs=("group_index",))
@torch.no_grad()
def rloo_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """RLOO: ``r_j - (sum_{k != j} r_k) / (G - 1)`` within each group, broadcast to every token.

    Groups may differ in size but need at least 2 samples. Needs ``group_index`` (B,).
    """
    group_index = _require(inputs, "group_index", "rloo")
    scores = _sequence_scores(inputs)
    groups = _groups(scores, group_index)
    if bool((groups.sizes < 2).any()):
        raise ValueError("group_index: rloo needs at least 2 samples per group, found a group of 1")
    d = groups.deviations
    leave_one_out = (groups.sum(d)[groups.ids] - d) / (groups.sizes[groups.ids] - 1)
    return _outcome_outputs(d - leave_one_out, scores, inputs.mask)


@ADVANTAGE_ESTIMATORS.register("remax", needs=("baseline_scores",))
@torch.no_grad()
def remax_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """ReMax: ``r_i - r(greedy response to the same prompt)``, broadcast to every token.

    Needs ``baseline_scores`` (B,), the greedy response's score repeated for each sample of its prompt.
    """
    baseline = _require(inputs, "baseline_scores", "remax")
    scores = _sequence_scores(inputs)
    return _outcome_outputs(scores - baseline.to(scores.dtype), scores, inputs.mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp_advantages(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutputs:
    """REINFORCE++: return-to-go ``G_t = sum_{s>=t} gamma^(s-t) r_s``, whitened over the global batch.

    The per-token KL penalty is expected inside ``token_rewards``. Mean and std are taken over every masked
    token of the batch — across ranks when ``reduce`` is given — not per sequence or per group.
    Returns are the un-whitened return-to-go.
    """
    # return-to-go is GAE with V = 0 and lambda = 1
    returns, _ = compute_gae(
        inputs.token_rewards, torch.zeros_like(inputs.token_rewards), inputs.mask, params.gamma, 1.0
    )
    kwargs = {} if inputs.reduce is None else {"reduce": inputs.reduce}
    advantages = masked_whiten(returns, inputs.mask, eps=params.eps, **kwargs)
    return AdvantageOutputs(advantages=advantages, returns=returns)
