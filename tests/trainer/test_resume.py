"""Checkpoint and resume: 4 steps straight equal 2 steps + resume + 2 steps, loss for loss."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.trainer.test_module import Recorder

KEYS = ("actor/pg_loss", "critic/value_loss", "actor/nll_loss", "rollout/reward_mean", "actor/grad_norm")


def _losses(rec):
    return [[m[k] for k in KEYS] for m in rec.metrics]


def test_resume_gives_identical_losses(make_run, tmp_path):
    from vapo_pl.callbacks import LengthScaling, ValuePretraining

    straight = Recorder()
    module, dm, trainer = make_run(trainer=dict(max_steps=4, callbacks=[straight, ValuePretraining(steps=1)]))
    trainer.fit(module, dm)

    first = Recorder()
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=2, save_last=True, save_top_k=-1)
    vp = ValuePretraining(steps=1)
    module, dm, trainer = make_run(trainer=dict(max_steps=2, callbacks=[first, vp, ckpt, LengthScaling()],
                                                enable_checkpointing=True))
    trainer.fit(module, dm)
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    # what the checkpoint holds: models, optimizer + scheduler, RNG, data position, pretraining state, RL step
    assert state["global_step"] == 2 and state["vapo"]["rl_step"] == 2
    assert any(k.startswith("actor.") for k in state["state_dict"])
    assert any(k.startswith("critic.") for k in state["state_dict"])
    assert len(state["optimizer_states"]) == 1 and len(state["lr_schedulers"]) == 1
    assert {"torch", "python"} <= set(state["vapo"]["ranks"][0]["rng"])  # one entry per rank
    assert state["RolloutDataModule"]["batches_served"] == 3  # 1 pretraining + 2 RL batches
    assert any("ValuePretraining" in k and v["done"] for k, v in state["callbacks"].items())

    second = Recorder()
    vp2 = ValuePretraining(steps=1)
    module, dm, trainer = make_run(trainer=dict(max_steps=4, callbacks=[second, vp2, LengthScaling()]))
    trainer.fit(module, dm, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert vp2.done and vp2.steps_done == 1  # restored, not re-run
    assert trainer.global_step == 4 and module.rl_step == 4
    resumed = _losses(first) + _losses(second)
    assert len(resumed) == 4
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(_losses(straight)), rtol=1e-5, atol=1e-7)


def test_export_loads_in_transformers_and_vllm(make_run, tmp_path):
    """The trained actor saves in Hugging Face format; transformers and vLLM both load it and agree greedily."""
    module, dm, trainer = make_run(trainer=dict(max_steps=1))
    trainer.fit(module, dm)
    out = tmp_path / "export"
    module.export_actor(str(out))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out)
    for (k, v), (k2, v2) in zip(sorted(hf.state_dict().items()), sorted(module.actor.state_dict().items())):
        assert k == k2 and torch.equal(v, v2.cpu())
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2=?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    greedy_hf = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()

    from vapo_pl.rollout.base import Sampling
    from vapo_pl.rollout.factory import build_engine

    engine = build_engine("vllm", str(out), dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
    (comp,), = engine.generate([ids], Sampling(n=1, temperature=0.0, max_tokens=8))
    assert comp.token_ids == greedy_hf[: len(comp.token_ids)]
    assert isinstance(pl.__version__, str)


def test_resuming_keeps_a_last_link_to_the_resumed_checkpoint_and_drops_the_others(tmp_path):
    """``--ckpt_path last`` picks ``epoch=0-step=5.ckpt`` over the ``last.ckpt`` link to it: that link must stay (a
    finished run resumed again saves nothing, and used to lose it); a link elsewhere is dropped. The kept link becomes
    the ``ModelCheckpoint``'s own, so the next save moves it instead of writing ``last-v1.ckpt``."""
    from vapo_pl.checkpointing import AdoptLastLinks, drop_stale_last_links

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for step in (4, 5):
        (ckpt / f"epoch=0-step={step}.ckpt").write_bytes(b"x")
    (ckpt / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")
    (ckpt / "last-v1.ckpt").symlink_to("epoch=0-step=4.ckpt")
    assert drop_stale_last_links([ckpt], ckpt / "epoch=0-step=5.ckpt") == [ckpt / "last.ckpt"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    assert drop_stale_last_links([ckpt], ckpt / "last.ckpt") == [ckpt / "last.ckpt"]  # resuming from the link itself
    assert drop_stale_last_links([ckpt], ckpt / "epoch=0-step=4.ckpt") == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt"]

    (ckpt / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")
    cb = ModelCheckpoint(dirpath=ckpt, save_last="link")
    cb.last_model_path = str(ckpt / "last-v1.ckpt")  # what a restored state can say
    trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False)
    AdoptLastLinks(drop_stale_last_links([ckpt], ckpt / "epoch=0-step=5.ckpt")).on_train_start(trainer, None)
    assert cb.last_model_path == str(ckpt / "last.ckpt")
