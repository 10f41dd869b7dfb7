"""PPO-ptx: ``ptx_coef`` x a language-modelling NLL on ``data.ptx_files`` joins every RL optimizer step."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def ptx_file(tmp_path):
    path = tmp_path / "ptx.jsonl"
    rows = [{"text": f"{i}+{i}={2 * i}. {i}*2={2 * i}."} for i in range(10)]
    rows += [{"prompt": f"{i}+1=?", "response": str(i + 1)} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(make_run, ptx_file, coef, capture):
    module, dm, trainer = make_run(algorithm={"minibatch_size": 16, "ptx_coef": coef},
                                   data={"ptx_files": ptx_file, "ptx_batch_size": 6} if ptx_file else {},
                                   trainer={"max_steps": 1})
    real = module._clip_and_step

    def grab(opt, critic_only, total):
        capture.append({n: p.grad.clone() for n, p in module.actor.named_parameters() if p.grad is not None})
        return real(opt, critic_only, total)

    module._clip_and_step = grab
    trainer.fit(module, datamodule=dm)
    return module, dm


def test_zero_coefficient_leaves_the_update_unchanged_bit_for_bit(make_run, ptx_file):
    with_data, without = [], []
    a, _ = _run(make_run, ptx_file, 0.0, with_data)
    b, _ = _run(make_run, None, 0.0, without)
    for name, g in with_data[0].items():
        assert torch.equal(g, without[0][name]), name
    for (name, p), q in zip(a.actor.state_dict().items(), b.actor.state_dict().values()):
        assert torch.equal(p, q), name


def test_gradient_is_the_sum_of_the_rl_and_ptx_terms(make_run, ptx_file):
    coef = 0.5
    rl, mixed = [], []
    _run(make_run, ptx_file, 0.0, rl)
    module, dm = _run(make_run, ptx_file, coef, mixed)
    # the PPO-ptx batch the step used: the DataModule's first, recomputed from a fresh actor with the same weights
    fresh, dm2, _ = make_run(data={"ptx_files": ptx_file, "ptx_batch_size": 6})
    fresh.configure_model()
    dm2.connect(fresh)
    dm2.setup("fit")
    ids, attention, loss_mask = dm2.next_ptx_batch()
    assert loss_mask.sum() < attention.sum()  # prompt/response rows train on the response only
    nll, n = fresh.ptx_nll(ids, attention, loss_mask)
    (nll / n).backward()
    ptx = {k: p.grad for k, p in fresh.actor.named_parameters() if p.grad is not None}
    assert len(ptx) > 10
    for name, g in mixed[0].items():
        torch.testing.assert_close(g, rl[0][name] + coef * ptx[name], atol=1e-6, rtol=1e-5, msg=name)
    assert dm.ptx_cursor == 6


def test_ptx_needs_data_and_bad_rows_name_the_row(make_run, tmp_path):
    from vapo_pl.prompts import DataError

    module, dm, trainer = make_run(algorithm={"ptx_coef": 0.1}, trainer={"max_steps": 1})
    with pytest.raises(ValueError, match="ptx_coef > 0 needs PPO-ptx data: set data.ptx_files"):
        trainer.fit(module, datamodule=dm)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=?"}) + "\n")
    m, dm, _ = make_run(data={"ptx_files": str(bad)})
    dm.connect(m)
    with pytest.raises(DataError, match=r"bad.jsonl:1: a PPO-ptx row needs a non-empty 'text', or 'prompt' and"):
        dm.setup("fit")
