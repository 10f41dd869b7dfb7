"""The update machinery of an RL step: minibatches, micro-batch accumulation with global token counts, per-model
gradient clipping and the optimizer step, and the statistics of a pass.

``Updater`` runs the passes over a batch whose advantages are known; ``VAPOModule`` owns the models and the forward
passes it calls. A minibatch whose loss or gradient norm is not finite is not stepped; the pass goes on with the
others and then ends in ``UpdateSkipped``, the one way a failed update reaches the RL step.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vapo_pl.algorithms.aggregation import aggregate
from vapo_pl.algorithms.kl import kl_estimate
from vapo_pl.algorithms.nll import positive_example_nll
from vapo_pl.algorithms.policy_losses import POLICY_LOSSES
from vapo_pl.algorithms.rollout_correction import ROLLOUT_CORRECTIONS
from vapo_pl.algorithms.value import value_loss
from vapo_pl.parallel import gradient_sync

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vapo_pl.algorithms.advantages import AdvantageOutputs
    from vapo_pl.batch import PreparedBatch, RolloutBatch
    from vapo_pl.config import OptimConfig
    from vapo_pl.module import VAPOModule


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. ``algorithm.max_skipped_steps`` updates in a row were skipped); ``vapo-pl`` prints
    it as one ``error:`` line and exits with code 1."""


class UpdateSkipped(Exception):
    """An update (or a check before it) found a non-finite or absurd value; nothing that value touched was stepped.
    ``reason`` names the tensor; ``metrics`` are the pass's statistics up to there (still logged)."""

    def __init__(self, reason: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics or {}


@dataclass
class PassStats:
    """Statistics of one pass, one value per optimizer step: terms summed over a minibatch's micro-batches
    (``add_sum``), ratios averaged over them (``add_mean``), gradient norms (``add_step_value``); ``result`` averages
    each over the optimizer steps."""

    per_step: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    _sums: dict[str, Tensor] = field(default_factory=dict)
    _means: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))

    def add_sum(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else torch.zeros_like(value) + value

    def add_mean(self, name: str, value: Tensor) -> None:
        self._means[name].append(value)

    def end_minibatch(self) -> None:
        for k, v in self._sums.items():
            self.per_step[k].append(v)
        for k, v in self._means.items():
            self.per_step[k].append(torch.stack(v).mean())
        self._sums, self._means = {}, defaultdict(list)

    def add_step_value(self, name: str, value: Tensor) -> None:
        self.per_step[name].append(value)

    def result(self) -> dict[str, float]:
        return {k: torch.stack([t.float() for t in v]).mean().item() for k, v in self.per_step.items()}


@dataclass
class CriticFirst:
    """The critic's gradients of the single joint update are in place already (``CriticTraining.first_pass``), with
    their loss and clip fractions."""

    value_loss: Tensor
    vf_clipfrac: Tensor


class Updater:
    """Minibatch passes over one batch for ``module`` (its models, forwards, optimizer and strategy)."""

    def __init__(self, module: VAPOModule) -> None:
        self.m = module

    @property
    def cfg(self):
        return self.m.algorithm

    # ------------------------------------------------------------------ batching
    def micro_batches(self, index: Tensor, device: torch.device | None = None) -> list[tuple[Tensor, list[int]]]:
        """``index`` (rows, a CPU tensor) in micro-batches of ``micro_batch_size``: ``(rows on device, the same rows as
        a list)`` pairs, so a micro-batch is selected without reading anything back from the accelerator."""
        from vapo_pl.packing import to_device

        device = device or self.m.device
        return [(to_device(part, device), part.tolist()) for part in index.split(self.cfg.micro_batch_size)]

    def minibatches(self, n: int, epoch: int = 0, critic_only: bool = False) -> list[Tensor]:
        """Shuffled local row indices, one tensor per optimizer step; critic-only passes use
        ``critic_minibatch_size`` when it is set."""
        cfg = self.cfg
        world = self.m._world
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
        g = torch.Generator().manual_seed(self.m.seed * 1_000_003 + self.m.rl_step + epoch * 7_919_000_003)
        return list(torch.randperm(n, generator=g).split(local))

    # ------------------------------------------------------------------ the passes
    def run(self, batch: RolloutBatch, prep: PreparedBatch, adv: AdvantageOutputs, critic_only: bool = False,
            epochs: int | None = None, critic_first: CriticFirst | None = None) -> dict[str, float]:
        """K epochs over minibatches (``epochs`` overrides K); one optimizer step per minibatch, micro-batches
        accumulate. ``critic_first``: the first pass's critic gradients are in place already. Raises
        ``UpdateSkipped`` (after the remaining minibatches) if a minibatch's loss or gradient was not finite.

        Each micro-batch's loss is divided by its minibatch's *global* counts (tokens, correct tokens,
        sequences; summed over ranks and divided by the world size, since DDP averages gradients), so the
        accumulated gradient is exactly that of the whole minibatch's loss, e.g. the Token-level loss."""
        m, cfg = self.m, self.cfg
        opt, sched = m.optimizers(), m.lr_schedulers()
        device = batch.scores.device
        world = m._world
        policy_mask = batch.response_mask
        if cfg.mask_truncated:
            policy_mask = policy_mask & ~batch.truncated.unsqueeze(1)
        positive_mask = policy_mask & batch.correct.unsqueeze(1)
        stats = PassStats()
        bad: str | None = None  # the first minibatch whose loss or gradient was not finite
        # old log-probs left to this pass (one_update_per_batch): filled from each micro-batch's own forward
        fill = None if critic_only or prep.old_logp is not None else {
            "logp": torch.zeros(policy_mask.shape, device=device), "entropy": torch.zeros(policy_mask.shape, device=device)}
        # ppo_epochs passes train both models; the critic's extra passes (critic_epochs) train it alone
        n_epochs = cfg.ppo_epochs
        if m.critic is not None:
            n_epochs = cfg.critic_epochs or cfg.ppo_epochs
        if epochs is not None:
            n_epochs = epochs
        for epoch in range(n_epochs):
            critic_only_epoch = critic_only or epoch >= cfg.ppo_epochs
            for mb_host in self.minibatches(len(batch), epoch, critic_only=critic_only_epoch):
                mb_idx = mb_host.to(device)
                counts = torch.stack([policy_mask[mb_idx].sum(), batch.response_mask[mb_idx].sum(),
                                      positive_mask[mb_idx].sum()]).float()
                n_tok, n_val_tok, n_pos = m._sum_across_ranks(counts) / world
                total = torch.zeros((), device=device)  # this minibatch's loss, for the finite check
                critic_here = m.critic is not None and (critic_first is None or critic_only_epoch)
                if m.critic is not None and not critic_here:
                    stats.add_sum("critic/value_loss", critic_first.value_loss)
                    for v in critic_first.vf_clipfrac.unbind():
                        stats.add_mean("critic/vf_clipfrac", v)
                    total = total + critic_first.value_loss
                parts = self.micro_batches(mb_host, device)
                ptx_follows = cfg.ptx_coef > 0 and not critic_only_epoch
                for i, (idx, host_idx) in enumerate(parts):
                    loss = torch.zeros((), device=device)
                    if not critic_only_epoch:
                        actor_loss, terms, ratios = self.actor_loss(batch, prep, adv, idx, policy_mask, n_tok,
                                                                    n_pos, len(mb_idx) / world, fill=fill,
                                                                    host_idx=host_idx)
                        loss = loss + actor_loss
                        for k, v in terms.items():
                            stats.add_sum(k, v)
                        for k, v in ratios.items():
                            stats.add_mean(k, v)
                    if critic_here:
                        critic_loss, vstats = self.critic_loss(batch, prep, adv, idx, n_val_tok, host_idx=host_idx)
                        loss = loss + critic_loss
                        stats.add_sum("critic/value_loss", critic_loss.detach())
                        stats.add_mean("critic/vf_clipfrac", vstats["vf_clipfrac"])
                    # gradients are communicated once per optimizer step, on its last backward
                    with gradient_sync(m, sync=i == len(parts) - 1 and not ptx_follows):
                        m.manual_backward(loss)
                    total = total + loss.detach()
                if ptx_follows:
                    ptx = self.ptx_backward()
                    stats.add_sum("actor/ptx_loss", ptx)
                    total = total + cfg.ptx_coef * ptx
                stats.end_minibatch()
                norms, bad_here = m._clip_and_step(opt, critic_only_epoch, total)
                for k, v in norms.items():
                    stats.add_step_value(k, v)
                if bad_here is None:
                    sched.step()
                else:
                    bad = bad or bad_here
        if fill is not None:
            prep.old_logp, prep.entropy = fill["logp"], fill["entropy"]
        out = stats.result()
        for group in opt.param_groups:
            out[f"{group['name']}/lr"] = group["lr"]
        if bad is not None:
            raise UpdateSkipped(bad, out)
        return out

    # ------------------------------------------------------------------ losses of one micro-batch
    def actor_loss(self, batch, prep, adv, idx, policy_mask, n_tok, n_pos, n_seqs, fill=None, host_idx=None
                   ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Policy loss + mu * positive-example NLL + KL loss for micro-batch ``idx`` (``host_idx``: the same rows on
        the CPU); returns the loss, its detached terms (to be summed over micro-batches) and ratio statistics (to be
        averaged). With ``fill`` the old log-probs are this forward's own, detached (and written into ``fill`` with
        the entropies)."""
        m, cfg = self.m, self.cfg
        mb = batch.select(idx, host_idx)
        mask = policy_mask[idx]
        logp, ent = m.policy_logprobs(m.actor, mb, with_entropy=fill is not None)
        if fill is not None:
            old = logp.detach()
            fill["logp"][idx] = old
            fill["entropy"][idx] = ent
        else:
            old = prep.old_logp[idx]
        pg = POLICY_LOSSES.get(cfg.policy_loss)(logp, old, adv.advantages[idx], mask, cfg.policy_loss_params())
        ratios = {f"actor/{k}": v for k, v in pg.stats.items()}
        pg_loss = pg.loss
        if cfg.rollout_correction != "none":  # the sampler drew the tokens: reweight (TIS) or drop (MIS) them
            corr = ROLLOUT_CORRECTIONS.get(cfg.rollout_correction)(old, mb.rollout_logprobs, mask,
                                                                   cfg.correction_params())
            pg_loss = pg_loss * corr.weights
            ratios.update({f"rollout_correction/{k}": v for k, v in corr.stats.items()})
        # a constant divisor (Dr.GRPO): data.max_response_length, not this batch's padded width
        norm_length = cfg.norm_length or m.max_response_length or mask.shape[1]
        loss = aggregate(pg_loss, mask, cfg.loss_agg_mode, norm_length=norm_length, num_tokens=n_tok,
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
        return loss, terms, ratios

    def critic_loss(self, batch, prep, adv, idx, n_tok, host_idx=None) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss toward the ``lambda_critic`` returns for micro-batch ``idx`` (token mean over the
        minibatch)."""
        mb = batch.select(idx, host_idx)
        return self.value_loss(mb, self.m.critic_values(mb), prep.old_values[idx], adv.returns[idx], n_tok)

    def value_loss(self, mb: RolloutBatch, values: Tensor, old: Tensor, returns: Tensor, n_tok: Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        vl, vstats = value_loss(values, old, returns, mb.response_mask, self.cfg.value_clip)
        return aggregate(vl, mb.response_mask, "token-mean", num_tokens=n_tok), vstats

    def ptx_nll(self, ids: Tensor, attention: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(summed NLL, token count) of ``loss_mask``'s tokens under the actor (temperature 1): PPO-ptx's term."""
        from vapo_pl.algorithms.logprob import logprobs_from_logits
        from vapo_pl.forward import position_ids

        m = self.m
        logits = m.actor(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                         use_cache=False).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:], 1.0, m.logprob_chunk_size)
        mask = loss_mask[:, 1:]
        return -(logp * mask).sum(), mask.sum()

    def ptx_backward(self) -> Tensor:
        """Add ``ptx_coef`` x the token-mean NLL of one PPO-ptx batch to the gradients (its own micro-batches; the
        mean is over the batch's tokens on all ranks, as the RL loss's). Returns the NLL, detached."""
        m = self.m
        ids, attention, loss_mask = (t.to(m.device) for t in m.rollout_data.next_ptx_batch())
        world = m._world
        n_tok = (m._sum_across_ranks(loss_mask[:, 1:].sum().float()) / world).clamp(min=1)
        nll_total = torch.zeros((), device=m.device)
        parts = torch.arange(len(ids), device=m.device).split(self.cfg.micro_batch_size)
        for i, idx in enumerate(parts):
            nll, _ = self.ptx_nll(ids[idx], attention[idx], loss_mask[idx])
            with gradient_sync(m, sync=i == len(parts) - 1):
                m.manual_backward(self.cfg.ptx_coef * nll / n_tok)
            nll_total = nll_total + nll.detach() / n_tok
        return nll_total

    def record_skip(self, bad: str | None) -> None:
        """Count a skipped update on the module (or reset the run of them); warn once per skip, stop after
        ``algorithm.max_skipped_steps`` in a row (``RunStopped``)."""
        m = self.m
        if bad is None:
            m.skipped_in_a_row = 0
            return
        m.skipped_steps += 1
        m.skipped_in_a_row += 1
        step = m.rl_step + 1
        if m.trainer.is_global_zero:
            log.warning("RL step %d: update skipped, %s (%d skipped in a row)", step, bad, m.skipped_in_a_row)
        limit = m.algorithm.max_skipped_steps
        if m.skipped_in_a_row >= limit:
            raise RunStopped(f"stopping: {limit} RL steps in a row skipped their update (step {step}: {bad}); "
                             "see algorithm.max_abs_reward and the reward hooks")

    # ------------------------------------------------------------------ the optimizer step
    def clip_and_step(self, opt, critic_only: bool, loss: Tensor) -> tuple[dict[str, Tensor], str | None]:
        """Clip each model's gradient norm separately, then step, unless the loss or a gradient norm is not
        finite: then the gradients are dropped and nothing moves (under DeepSpeed only the loss is checked, its
        config clips, and the skip path is untested there). Returns the pre-clip norms and what was wrong
        (``None`` when the step was taken)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        m = self.m
        norms = {}
        if not isinstance(m.trainer.strategy, DeepSpeedStrategy):  # DeepSpeed clips in its own config
            clips = {"actor": m.optim.actor_grad_clip, "critic": m.optim.critic_grad_clip}
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

    def first_bad_tensor(self, tensors: dict[str, Tensor], mask: Tensor, bound: dict[str, float] | None = None
                         ) -> str | None:
        """The name (and what is wrong) of the first tensor with a non-finite value on ``mask``, or with a value
        beyond its ``bound``; ``None`` if all are fine. Decided on every rank alike (one all-reduce)."""
        bound = bound or {}
        flags = []
        for name, t in tensors.items():
            v = t[mask] if t.shape == mask.shape else t
            flags.append(torch.stack([(~torch.isfinite(v)).any(), (v.abs() > bound.get(name, math.inf)).any()]))
        flags = self.m._sum_across_ranks(torch.stack(flags).float()) > 0
        for (name, _), (nonfinite, too_big) in zip(tensors.items(), flags.tolist()):
            if nonfinite:
                return f"{name} (non-finite)"
            if too_big:
                return f"{name} (|value| > {bound[name]:g})"
        return None

    def check(self, tensors: dict[str, Tensor], mask: Tensor, bound: dict[str, float] | None = None) -> None:
        """``first_bad_tensor``, raising ``UpdateSkipped`` instead of returning a name."""
        bad = self.first_bad_tensor(tensors, mask, bound)
        if bad is not None:
            raise UpdateSkipped(bad)


def make_optimizer(actor: nn.Module, critic: nn.Module | None, optim: OptimConfig) -> dict:
    """One AdamW with an ``actor`` and a ``critic`` parameter group (their own learning rates) and the warm-up
    schedule, as ``configure_optimizers`` returns them."""
    groups = [{"params": [p for p in actor.parameters() if p.requires_grad],
               "lr": optim.actor_lr, "name": "actor"}]
    if critic is not None:
        groups.append({"params": [p for p in critic.parameters() if p.requires_grad],
                       "lr": optim.critic_lr, "name": "critic"})
    opt = torch.optim.AdamW(groups, betas=optim.betas, eps=optim.eps,
                            weight_decay=optim.weight_decay)
    warm = optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
