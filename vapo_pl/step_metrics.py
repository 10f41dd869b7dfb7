"""The metrics of an RL step beyond the update's own: the rollout batch's rewards, accuracy, lengths, advantages,
values and entropy, skips, the KL to the reference model, the critic against Monte-Carlo returns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vapo_pl.algorithms.advantages import AdvantageOutputs
from vapo_pl.algorithms.rollout_correction import mismatch_metrics
from vapo_pl.algorithms.utils import masked_mean
from vapo_pl.algorithms.value import explained_variance
from vapo_pl.batch import PreparedBatch, RolloutBatch

if TYPE_CHECKING:
    from torch import Tensor

    from vapo_pl.module import VAPOModule


def peak_rss_gb() -> float:
    """Peak resident memory of this (trainer) process in GB; verifier worker processes are not included."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def rollout_metrics(batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs) -> dict[str, float]:
    """Per-step metrics of ``batch`` (this rank's rows; ``VAPOModule.log_metrics`` averages over ranks)."""
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
    if prep.old_logp is not None:  # the trainer's log-probs of the sampled tokens against the sampler's
        m.update(mismatch_metrics(prep.old_logp, batch.rollout_logprobs, mask))
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


def step_metrics(m: VAPOModule, batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs, rewards: Tensor,
                 metrics: dict[str, float], skipped: str | None) -> dict[str, float]:
    """The step's metrics besides the update's own (``metrics``, so far): skips, the rollout's, the KL to the
    reference when the old log-probs came from the update pass, and the critic against Monte-Carlo returns."""
    out = {"train/step_skipped": float(skipped is not None), "train/skipped_steps": float(m.skipped_steps)}
    if m.has_reference and "actor/kl_ref" not in metrics and prep.old_logp is not None:
        out["actor/kl_ref"] = float(m._kl_ref(prep, batch.response_mask))  # old log-probs from the update pass
    out.update(rollout_metrics(batch, prep, adv))
    if prep.old_values is not None:  # against Monte-Carlo returns, whatever lambda_critic the targets use
        mc = adv if m.algorithm.lambda_critic == 1.0 else m.compute_advantages(
            batch, rewards, prep.old_values, monte_carlo_critic=True)
        out["critic/explained_var_mc"] = float(explained_variance(prep.old_values, mc.returns, batch.response_mask))
    return out
