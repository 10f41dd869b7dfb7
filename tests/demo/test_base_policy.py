"""The demo's base policy: a small-settings build, the cache (reuse, separate keys, atomic writes), batching."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest
import torch

from vapo_pl.demo import base_policy, task
from tests.demo.conftest import SMALL
from vapo_pl.demo.base_policy import BaseSpec, ensure_base_policy

def _loss(model_dir, problems) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    batch = base_policy.pad_batch(
        [base_policy.encode_demo(tok, p.prompt, task.demonstration(p, rng, 0.6)) for p in problems], tok.pad_token_id
    )
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[0].ne(tok.pad_token_id), labels=batch[1]).loss.item()


def test_small_build_is_fast_loadable_and_trained(small_build, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vapo_pl.tiny import build_tiny_model

    cache, path, seconds = small_build
    assert seconds < 60
    assert path.parent == cache and path.name == f"base-{base_policy.spec_hash(SMALL)}"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary directory left behind
    info = json.loads((path / base_policy.INFO_FILE).read_text())
    assert info["spec"] == dataclasses.asdict(SMALL) and info["build_seconds"] > 0
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32 and model.config.max_position_embeddings == 256
    assert model.config.vocab_size >= max(tok(task.TASK_CHARS, add_special_tokens=False).input_ids) + 1
    # the supervised steps did something: demonstration loss well below the untrained model's
    untrained = build_tiny_model(
        tmp_path / "init", hidden_size=32, max_position_embeddings=256, seed=SMALL.seed
    )
    held = task.generate_splits(SMALL.task)[1]
    assert _loss(path, held) < 0.7 * _loss(untrained, held)


def test_second_call_reuses_the_cache(small_build, monkeypatch):
    cache, path, _ = small_build
    info = path / base_policy.INFO_FILE
    mtime = info.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached base policy")

    monkeypatch.setattr(base_policy, "build_base_policy", no_rebuild)
    t0 = time.perf_counter()
    assert ensure_base_policy(cache, SMALL) == path
    assert time.perf_counter() - t0 < 2.0
    assert info.stat().st_mtime_ns == mtime


def test_another_spec_gets_another_directory(tmp_path, monkeypatch):
    """The cache logic alone, with the build replaced by a fake that counts its calls."""
    built = []

    def fake_build(path, spec, *, num_threads=2, verbose=False):
        built.append(spec)
        (path / "weights").write_text(str(spec.steps))
        return 0.0

    monkeypatch.setattr(base_policy, "build_base_policy", fake_build)
    a = ensure_base_policy(tmp_path, SMALL)
    b = ensure_base_policy(tmp_path, dataclasses.replace(SMALL, steps=41))
    assert ensure_base_policy(tmp_path, SMALL) == a
    assert a != b and a.parent == b.parent == tmp_path
    assert (a / "weights").read_text() == "40" and (b / "weights").read_text() == "41"
    assert len(built) == 2
    assert base_policy.spec_hash(SMALL) == base_policy.spec_hash(dataclasses.replace(SMALL))
    other_task = dataclasses.replace(SMALL, task=dataclasses.replace(SMALL.task, seed=5))
    assert base_policy.spec_hash(other_task) != base_policy.spec_hash(SMALL)


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base_policy, "train_on_demonstrations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_base_policy(tmp_path, SMALL)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VAPO_PL_CACHE", raising=False)
    assert base_policy.default_cache_dir() == base_policy.REPO / ".cache" / "demo"
    monkeypatch.setenv("VAPO_PL_CACHE", str(tmp_path))
    assert base_policy.default_cache_dir() == tmp_path / "demo"


def test_build_is_deterministic(small_build, tmp_path):
    from safetensors.torch import load_file

    _, path, _ = small_build
    again = base_policy.ensure_base_policy(tmp_path, SMALL, num_threads=1)
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encode_demo_and_pad_batch(small_build):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_build[1])
    ids, start = base_policy.encode_demo(tok, "47+5=?", "47+5=52\n\\boxed{52}")
    # "Q:47+5=?\nA:" is 11 characters, one token each; the response is 19 characters plus EOS
    assert start == 11 and len(ids) == 11 + 19 + 1
    assert tok.decode(ids[:start]) == "Q:47+5=?\nA:"
    assert tok.decode(ids[start:-1]) == "47+5=52\n\\boxed{52}" and ids[-1] == tok.eos_token_id
    short, s_start = base_policy.encode_demo(tok, "47+5=?", "\\boxed{52}")
    input_ids, labels = base_policy.pad_batch([(ids, start), (short, s_start)], tok.pad_token_id)
    assert input_ids.shape == labels.shape == (2, 31)
    assert labels[0, :11].tolist() == [-100] * 11 and labels[0, 11:].tolist() == ids[11:]
    assert labels[1, 11:22].tolist() == short[11:] and labels[1, 22:].tolist() == [-100] * 9
    assert input_ids[1, 22:].tolist() == [tok.pad_token_id] * 9


def test_demo_batches_use_every_draw_once():
    """Length bucketing reorders demonstrations but keeps each drawn one exactly once."""
    from vapo_pl.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    problems = task.generate_splits(SMALL.task)[0]
    spec = dataclasses.replace(SMALL, batch_size=4)
    batches = base_policy.demo_batches(tok, problems, spec, random.Random(3))
    got = [next(batches) for _ in range(base_policy.BUCKET_BATCHES)]
    # the same draws, unsorted: rng.choices then one demonstration each
    rng = random.Random(3)
    drawn = rng.choices(problems, k=4 * base_policy.BUCKET_BATCHES)
    unsorted = [base_policy.encode_demo(tok, p.prompt, task.demonstration(p, rng, 0.6))[0] for p in drawn]
    seen = sorted(tok.decode([t for t in row.tolist() if t != tok.pad_token_id]) for ids, _ in got for row in ids)
    assert seen == sorted(tok.decode(ids) for ids in unsorted)
    padding = sum(int(ids.eq(tok.pad_token_id).sum()) for ids, _ in got)
    chunks = [unsorted[i : i + 4] for i in range(0, len(unsorted), 4)]
    unsorted_padding = sum(max(map(len, c)) - len(ids) for c in chunks for ids in c)
    assert padding < unsorted_padding / 2


@pytest.mark.parametrize(
    "kwargs, field",
    [({"p_forget": 1.5}, "p_forget"), ({"hidden_size": 0}, "hidden_size"), ({"steps": 2.5}, "steps"),
     ({"lr": 0.0}, "lr"), ({"warmup_steps": -1}, "warmup_steps"), ({"task": {}}, "task")],
)
def test_base_spec_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BaseSpec(**kwargs)
