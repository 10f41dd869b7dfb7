"""VAPOModule end to end on the tiny model (transformers engine unless a test says vLLM)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch


class Recorder(pl.Callback):
    """Keeps every step's metrics and the (rollout version, policy version) seen at consumption."""

    def __init__(self):
        self.metrics, self.versions = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append(dict(outputs["metrics"]))
        self.versions.append((outputs["rollout"].weight_version, pl_module.policy_version - 1))


def test_rl_steps_count_as_global_steps_and_log_section5_metrics(make_run, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    rec = Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=3, callbacks=[rec],
                                                logger=TensorBoardLogger(str(tmp_path), name="tb")))
    trainer.fit(module, dm)
    # 3 RL steps, each 2 minibatches: Lightning alone would report 6 optimizer steps
    assert trainer.global_step == module.rl_step == 3
    assert module.policy_version == 3 and len(rec.metrics) == 3
    logged = set(trainer.callback_metrics)
    for key in ("actor/pg_loss", "actor/pg_clipfrac_low", "actor/pg_clipfrac_high", "actor/approx_kl",
                "actor/entropy", "actor/grad_norm", "actor/nll_loss", "actor/lambda_policy_mean",
                "critic/value_loss", "critic/explained_var", "critic/vf_clipfrac", "critic/grad_norm",
                "critic/returns_mean", "actor/advantages_mean", "rollout/reward_mean", "rollout/acc",
                "rollout/response_length_mean", "rollout/response_length_p90", "rollout/clip_ratio",
                "perf/generate_s", "perf/forward_s", "perf/update_s", "perf/sync_s",
                "perf/generate_tokens_per_s"):
        assert key in logged, key
    assert all(math.isfinite(m["actor/pg_loss"]) for m in rec.metrics)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("rollout/reward_mean")]
    assert steps == [1, 2, 3]


def test_every_rollout_comes_from_the_current_policy(make_run):
    rec = Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=3, callbacks=[rec]))
    trainer.fit(module, dm)
    assert rec.versions == [(0, 0), (1, 1), (2, 2)]


def test_prefetching_loop_is_refused_as_off_policy(make_run):
    """The same module driven by Lightning's default (prefetching) fetcher gets a batch generated one
    update earlier; the version check must catch it."""
    from vapo_pl import VAPOModule

    class Prefetching(VAPOModule):
        def training_step(self, batch, batch_idx):  # Lightning prefetches for this signature
            out = self.rl_step_on(batch, {})
            self.rl_step += 1
            self._pin_global_step()
            return out

    module, dm, trainer = make_run(module_cls=Prefetching, trainer=dict(max_steps=3))
    with pytest.raises(RuntimeError, match="off-policy rollout"):
        trainer.fit(module, dm)


def test_policy_improves_a_dense_reward(make_run):
    """GRPO on 'share of 1s in the response': the trainer must push the reward up (sign and plumbing)."""
    rec = Recorder()
    module, dm, trainer = make_run(
        algorithm=dict(estimator="grpo", nll_coef=0.0, length_adaptive_alpha=None, ppo_epochs=2),
        data=dict(samples_per_prompt=8, prompts_per_step=4), trainer=dict(max_steps=12, callbacks=[rec]))
    trainer.fit(module, dm)
    rewards = [m["rollout/reward_mean"] for m in rec.metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards


ALGORITHMS = {
    "vapo": dict(),
    "ppo_vanilla": dict(lambda_critic=0.95, length_adaptive_alpha=None, eps_high=0.2,
                        loss_agg_mode="seq-mean-token-mean", nll_coef=0.0),
    "grpo_kl_loss": dict(estimator="grpo", kl_loss_coef=0.01, nll_coef=0.0),
    "dr_grpo": dict(estimator="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm"),
    "rloo": dict(estimator="rloo"),
    "remax": dict(estimator="remax"),
    "reinforce_pp_kl_reward": dict(estimator="reinforce_pp", kl_reward_coef=0.05, kl_target=0.1),
    "gspo": dict(estimator="grpo", policy_loss="gspo", eps_low=3e-4, eps_high=4e-4),
    "cispo": dict(estimator="grpo", policy_loss="cispo", eps_low=1.0),
    "aspo": dict(estimator="grpo", policy_loss="aspo", dual_clip_c=3.0),
    "dual_clip_ppo": dict(dual_clip_c=3.0),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_runs_a_step(make_run, name):
    rec = Recorder()
    module, dm, trainer = make_run(algorithm=ALGORITHMS[name], trainer=dict(max_steps=1, callbacks=[rec]))
    trainer.fit(module, dm)
    m = rec.metrics[0]
    assert math.isfinite(m["actor/pg_loss"]) and m["actor/grad_norm"] > 0
    assert ("critic/value_loss" in m) == module.uses_critic
    assert (module.ref_model is not None) == module.algorithm.uses_reference
    if name == "remax":
        assert rec.metrics and dm.greedy_baseline
    if "kl_reward" in name:
        assert "actor/kl_coef" in m and "actor/kl_ref" in m


def test_dapo_dynamic_sampling_and_overlong(make_run):
    from vapo_pl.rewards.base import RewardTerm

    rec = Recorder()
    reward = [RewardTerm(name="tests.trainer.task_rewards.coin"),
              RewardTerm(name="overlong", kwargs={"max_length": 12, "cache_length": 4})]
    module, dm, trainer = make_run(
        algorithm=dict(estimator="grpo", nll_coef=0.0),
        data=dict(dynamic_sampling=True, max_sampling_rounds=3, reward=reward),
        trainer=dict(max_steps=2, callbacks=[rec]))
    trainer.fit(module, dm)
    m = rec.metrics[-1]
    assert 0 < m["rollout/dynamic_sampling_kept_share"] <= 1
    assert m["rollout/sampling_rounds"] >= 1
    assert "reward/overlong" in m and m["reward/overlong"] <= 0
    # the batch stays full: prompts_per_step groups of samples_per_prompt
    assert len(rec.metrics) == 2


def test_value_pretraining_then_rl(make_run, tmp_path):
    from vapo_pl.callbacks import ValuePretraining

    vp = ValuePretraining(steps=3, save_path=str(tmp_path / "critic.pt"))
    rec = Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=1, callbacks=[vp, rec]))
    trainer.fit(module, dm)
    assert vp.done and vp.steps_done == 3 and len(vp.history) == 3
    # pretraining changed only the critic, and the first RL rollout still came from version 0
    assert rec.versions == [(0, 0)] and trainer.global_step == 1
    saved = torch.load(tmp_path / "critic.pt", weights_only=True)
    assert set(saved) == set(module.critic.state_dict())


def test_gradient_checkpointing_gives_the_same_step(make_run):
    """Recomputing activations in backward must not change the update (only memory)."""
    from vapo_pl import VAPOModule

    results = []
    for flag in (False, True):
        rec = Recorder()

        class M(VAPOModule):
            def __init__(self, **kw):
                super().__init__(gradient_checkpointing=flag, **kw)

        module, dm, trainer = make_run(module_cls=M, trainer=dict(max_steps=1, callbacks=[rec]))
        trainer.fit(module, dm)
        assert module.actor.is_gradient_checkpointing == flag
        results.append(rec.metrics[0]["actor/grad_norm"])
    assert results[0] == pytest.approx(results[1], rel=1e-4)


def test_critic_epochs_train_the_critic_alone(make_run):
    """``critic_epochs`` > ``ppo_epochs``: the extra passes move the critic and leave the actor exactly as one
    joint pass leaves it."""
    states = []
    for critic_epochs in (None, 3):
        module, dm, trainer = make_run(algorithm=dict(critic_epochs=critic_epochs), trainer=dict(max_steps=1))
        trainer.fit(module, dm)
        states.append(({k: v.clone() for k, v in module.actor.state_dict().items()},
                       {k: v.clone() for k, v in module.critic.state_dict().items()},
                       trainer.callback_metrics["critic/grad_norm"].item()))
    (actor_1, critic_1, _), (actor_3, critic_3, _) = states
    assert all(torch.equal(actor_1[k], actor_3[k]) for k in actor_1)
    assert not torch.equal(critic_1["value_head.weight"], critic_3["value_head.weight"])


def test_critic_minibatch_size_splits_only_the_critic_only_passes(make_run):
    """``critic_minibatch_size``: the joint pass keeps ``minibatch_size`` (16 samples / 8 = 2 steps), each extra
    critic-only pass takes 16 / 4 = 4 steps, and the actor ends exactly as without it."""
    from vapo_pl import VAPOModule

    runs = []
    for size in (None, 4):
        steps: list[bool] = []

        class Counting(VAPOModule):
            def _clip_and_step(self, opt, critic_only, loss, _steps=steps):
                _steps.append(critic_only)
                return super()._clip_and_step(opt, critic_only, loss)

        module, dm, trainer = make_run(module_cls=Counting, trainer=dict(max_steps=1),
                                       algorithm=dict(critic_epochs=2, critic_minibatch_size=size))
        trainer.fit(module, dm)
        runs.append((steps, {k: v.clone() for k, v in module.actor.state_dict().items()},
                     module.critic.value_head.weight.detach().clone()))
    (steps_none, actor_none, head_none), (steps_4, actor_4, head_4) = runs
    assert steps_none == [False, False, True, True]
    assert steps_4 == [False, False, True, True, True, True]
    assert all(torch.equal(actor_none[k], actor_4[k]) for k in actor_none)
    assert not torch.equal(head_none, head_4)


def test_critic_replay_draws_the_critic_only_passes_from_earlier_rl_batches(make_run, tmp_path):
    """``critic_replay_batches``: the joint pass is unchanged (after step 1 the actor equals a run without replay, and
    the optimizer steps are the same), the critic-only pass of step 1 can only draw from its own batch, later steps
    draw from the kept batches too; the deque keeps the newest N batches, and it survives a checkpoint loaded with
    ``weights_only=True``."""
    from vapo_pl import VAPOModule

    runs = []
    for replay, steps_n in ((0, 1), (2, 1), (2, 3)):
        steps: list[bool] = []
        seen: list[tuple[int, dict]] = []

        class Recording(VAPOModule):
            def _clip_and_step(self, opt, critic_only, loss, _steps=steps):
                _steps.append(critic_only)
                return super()._clip_and_step(opt, critic_only, loss)

            def rl_step_on(self, batch, timings, _seen=seen):
                out = super().rl_step_on(batch, timings)
                _seen.append((batch.weight_version, out.metrics))
                return out

        module, dm, trainer = make_run(module_cls=Recording, trainer=dict(max_steps=steps_n),
                                       algorithm=dict(critic_epochs=2, critic_replay_batches=replay))
        trainer.fit(module, dm)
        runs.append((module, steps, seen, {k: v.clone() for k, v in module.actor.state_dict().items()}))
    (_, steps_0, seen_0, actor_0), (_, steps_1, seen_1, actor_1), (module, _, seen_3, _) = runs
    assert steps_0 == steps_1 == [False, False, True, True]
    assert all(torch.equal(actor_0[k], actor_1[k]) for k in actor_0)
    assert "critic/replay_value_loss" not in seen_0[0][1] and "critic/replay_value_loss" in seen_1[0][1]
    earlier = [m["critic/replay_rows_from_earlier_batches"] for _, m in seen_3]
    assert earlier[0] == 0 and earlier[1] > 0 and earlier[2] > 0
    assert [b.weight_version for b in module.critic_replay] == [v for v, _ in seen_3[1:]]

    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "state.pt"
    torch.save(ckpt, path)
    restored = VAPOModule(model_path=module.model_path, algorithm=module.algorithm)
    restored.on_load_checkpoint(torch.load(path, weights_only=True))
    assert len(restored.critic_replay) == 2
    for a, b in zip(module.critic_replay, restored.critic_replay):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.scores, b.scores)
        assert a.metadata == b.metadata and a.weight_version == b.weight_version


def test_explained_variance_against_monte_carlo_returns(make_run):
    """``critic/explained_var_mc`` scores the critic against Monte-Carlo returns whatever ``lambda_critic`` its
    targets use: equal to ``critic/explained_var`` at lambda_critic 1, different at 0.5 (the targets then hold the
    critic's own values; a random head makes those non-zero)."""
    from vapo_pl import VAPOModule

    class RandomHead(VAPOModule):
        def __init__(self, **kwargs):
            super().__init__(critic_head_init="random", **kwargs)

    seen = {}
    for lam in (1.0, 0.5):
        module, dm, trainer = make_run(module_cls=RandomHead, trainer=dict(max_steps=1),
                                       algorithm=dict(lambda_critic=lam))
        original = module.rl_step_on
        module.rl_step_on = lambda batch, timings, _lam=lam, _f=original: seen.setdefault(_lam, _f(batch, timings))
        trainer.fit(module, dm)
    ev = {lam: (out.metrics["critic/explained_var"], out.metrics["critic/explained_var_mc"]) for lam, out in seen.items()}
    assert ev[1.0][0] == ev[1.0][1]
    assert ev[0.5][0] != ev[0.5][1]


def test_critic_head_init(tiny_model_dir):
    """``zero``: values exactly 0; ``random``: the same head for the same module seed whatever the global RNG
    state, a different one for another seed."""
    from vapo_pl import VAPOModule

    ids = torch.tensor([[3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    zero = VAPOModule(model_path=str(tiny_model_dir), critic_head_init="zero").build_critic()
    assert torch.count_nonzero(zero(ids, mask)) == 0
    heads = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        heads.append(VAPOModule(model_path=str(tiny_model_dir), seed=seed).build_critic().value_head.weight)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert heads[0].abs().sum() > 0
    with pytest.raises(ValueError, match="model.critic_head_init"):
        VAPOModule(model_path=str(tiny_model_dir), critic_head_init="ones")


def test_dr_grpo_divides_by_the_max_response_length_not_the_padded_width(make_run):
    """``seq-mean-token-sum-norm`` with no ``norm_length``: the divisor is ``data.max_response_length`` (a
    constant), so the loss of a batch equals the one with that length given explicitly, whatever width the
    batch was padded to."""
    losses = []
    for norm_length in (None, 12, 5):
        module, dm, trainer = make_run(algorithm=dict(estimator="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm"),
                                       data=dict(max_response_length=12), trainer=dict(max_steps=1))
        if norm_length is not None:
            module.algorithm.norm_length = norm_length
        trainer.fit(module, dm)
        assert module.max_response_length == 12
        losses.append(trainer.callback_metrics["actor/pg_loss"].item())
    assert losses[0] == losses[1] != losses[2]


def test_adv_eps_reaches_the_group_normalisation():
    from vapo_pl.config import AlgorithmConfig

    assert AlgorithmConfig(estimator="grpo", adv_eps=1e-3).advantage_params().eps == 1e-3


def test_bf16_mixed_step_keeps_logits_and_values_in_float32(make_run):
    """``trainer.precision: bf16-mixed`` on CPU: the step runs under bf16 autocast with float32 master weights,
    while the actor's logits and the critic's values (which feed the ratio and the advantages) are float32."""
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.dtypes = {}

            def record(key):
                def hook(module, inputs, output):  # returns None: the output is left alone
                    self.dtypes.setdefault(key, set()).add((torch.is_autocast_enabled("cpu"), output.dtype))
                return hook

            pl_module.actor.get_output_embeddings().register_forward_hook(record("logits"))
            pl_module.critic.value_head.register_forward_hook(record("values"))

    probe, rec = Probe(), Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=1, precision="bf16-mixed", callbacks=[probe, rec]))
    trainer.fit(module, dm)
    # the training passes run under bf16 autocast; every head output is float32 all the same
    for key in ("logits", "values"):
        assert (True, torch.float32) in probe.dtypes[key], probe.dtypes
        assert {out for _, out in probe.dtypes[key]} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in module.actor.parameters())
    assert math.isfinite(rec.metrics[0]["actor/pg_loss"]) and math.isfinite(rec.metrics[0]["critic/value_loss"])
