"""The demo's base policy: the supervised loss, batching, a small-settings build, the cache."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time

import pytest
import torch

from tests.demo.conftest import SMALL
from vapo_pl.demo import base_policy, task
from vapo_pl.demo.base_policy import BaseSpec, DemoBatch, demo_loss, ensure_base_policy
from vapo_pl.tiny import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _encoded(tok, problem, forgotten):
    return (
        *base_policy.encode_demo(tok, problem.prompt, problem.solution(forgotten)),
        task.forks(problem, forgotten),
    )


def test_encode_demo_and_collate(tok):
    p = task.Problem(47, (("+", 5),))
    ids, start, forks = _encoded(tok, p, (0,))
    # "Q:47+5=?\nA:" is 11 characters, one token each; "47+5=42\n\boxed{42}" is 7 + 1 + 10, then EOS
    assert start == 11 and len(ids) == 11 + 18 + 1
    assert tok.decode(ids[:start]) == "Q:47+5=?\nA:"
    assert tok.decode(ids[start:-1]) == "47+5=42\n\\boxed{42}" and ids[-1] == tok.eos_token_id
    assert forks == [task.Fork(5, "5", "4")]
    short = task.Problem(12, (("-", 1),))  # no carry: "12-1=11\n\boxed{11}", 30 tokens too; cut to 27
    s_ids, s_start, s_forks = _encoded(tok, short, ())
    batch = base_policy.collate(tok, [(ids, start, forks), (s_ids[:-3], s_start, s_forks)])
    assert batch.input_ids.shape == batch.labels.shape == (2, 30)
    assert batch.labels[0, :11].tolist() == [-100] * 11
    # the fork (response character 5, token 16) is learned through the soft target, not the label
    assert batch.labels[0, 16] == -100 and batch.input_ids[0, 16] == tok("4").input_ids[0]
    assert batch.labels[0, 11:16].tolist() == ids[11:16] and batch.labels[0, 17:].tolist() == ids[17:]
    assert batch.labels[1, 11:27].tolist() == s_ids[11:27] and batch.labels[1, 27:].tolist() == [-100] * 3
    assert batch.input_ids[1, 27:].tolist() == [tok.pad_token_id] * 3
    assert (batch.fork_rows.tolist(), batch.fork_cols.tolist()) == ([0], [16])
    assert (batch.fork_kept.tolist(), batch.fork_dropped.tolist()) == (
        [tok("5").input_ids[0]],
        [tok("4").input_ids[0]],
    )


def test_demo_loss_hand_worked():
    """One sequence of 3 tokens, vocabulary 2: position 1 is a label, position 2 a fork."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)  # (1, 3, 2)
    batch = DemoBatch(
        input_ids=torch.tensor([[0, 1, 0]]),
        labels=torch.tensor([[-100, 1, -100]]),
        fork_rows=torch.tensor([0]),
        fork_cols=torch.tensor([2]),
        fork_kept=torch.tensor([1]),
        fork_dropped=torch.tensor([0]),
    )
    # token 1 predicted from position 0 (uniform): -log 1/2; the fork from position 1, logits (0, 1):
    # log p = (-log(1 + e), 1 - log(1 + e)); kept = 1 with weight 0.7, dropped = 0 with weight 0.3
    lse = torch.log1p(torch.exp(torch.tensor(1.0, dtype=torch.float64)))
    fork = -(0.7 * (1 - lse) + 0.3 * (-lse))
    expected = (torch.log(torch.tensor(2.0, dtype=torch.float64)) + fork) / 2
    assert demo_loss(logits, batch, 0.3).item() == pytest.approx(expected.item(), abs=1e-12)


def _loop_loss(logits, batch, p):
    total, count = 0.0, 0
    b, t, _ = logits.shape
    forks = {(r, c): (k, d) for r, c, k, d in zip(*(x.tolist() for x in batch[2:]))}
    for i in range(b):
        for j in range(1, t):
            logp = torch.log_softmax(logits[i, j - 1], -1)
            if (i, j) in forks:
                k, d = forks[(i, j)]
                total += -((1 - p) * logp[k] + p * logp[d])
                count += 1
            elif batch.labels[i, j] != -100:
                total += -logp[batch.labels[i, j]]
                count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_loss_matches_a_loop_and_the_sampled_expectation(tok, seed):
    rng = random.Random(seed)
    problems = [p for p in task.generate_splits(SMALL.task)[0] if p.carries][:6]
    encoded = [_encoded(tok, p, task.sample_forgotten(p, rng, 0.5)) for p in problems]
    batch = base_policy.collate(tok, encoded)
    torch.manual_seed(seed)
    logits = torch.randn(*batch.input_ids.shape, len(tok), dtype=torch.float64)
    p = 0.3 + 0.1 * seed
    got = demo_loss(logits, batch, p)
    assert got.item() == pytest.approx(_loop_loss(logits, batch, p).item(), abs=1e-10)
    # Rao-Blackwell: with the first fork soft and the others labelled as sampled, the loss is the
    # expectation over the first fork's two digits of the all-labelled loss
    rows, cols = batch.fork_rows, batch.fork_cols
    labels = batch.labels.clone()
    labels[rows[1:], cols[1:]] = batch.input_ids[rows[1:], cols[1:]]
    one_fork = DemoBatch(batch.input_ids, labels, *(x[:1] for x in batch[2:]))
    empty = torch.zeros(0, dtype=torch.long)
    sampled = []
    for digit in (batch.fork_kept[0], batch.fork_dropped[0]):
        all_labels = labels.clone()
        all_labels[rows[0], cols[0]] = digit
        sampled.append(
            demo_loss(logits, DemoBatch(batch.input_ids, all_labels, empty, empty, empty, empty), p)
        )
    assert sampled[0].item() != pytest.approx(sampled[1].item())
    expected = (1 - p) * sampled[0] + p * sampled[1]
    assert demo_loss(logits, one_fork, p).item() == pytest.approx(expected.item(), abs=1e-10)


def test_demo_batches_use_every_draw_once(tok):
    """Length bucketing reorders demonstrations but keeps each drawn one exactly once."""
    problems = task.generate_splits(SMALL.task)[0]
    spec = dataclasses.replace(SMALL, batch_size=4)
    batches = base_policy.demo_batches(tok, problems, spec, random.Random(3))
    got = [next(batches) for _ in range(base_policy.BUCKET_BATCHES)]
    # the same draws, unsorted: rng.choices, then the slips of each demonstration in order
    rng = random.Random(3)
    drawn = rng.choices(problems, k=4 * base_policy.BUCKET_BATCHES)
    unsorted = [_encoded(tok, p, task.sample_forgotten(p, rng, SMALL.p_forget))[0] for p in drawn]
    seen = sorted(
        tok.decode([t for t in row.tolist() if t != tok.pad_token_id]) for b in got for row in b.input_ids
    )
    assert seen == sorted(tok.decode(ids) for ids in unsorted)
    assert sum(len(b.fork_rows) for b in got) == sum(len(p.carries) for p in drawn)
    padding = sum(int(b.input_ids.eq(tok.pad_token_id).sum()) for b in got)
    chunks = [unsorted[i : i + 4] for i in range(0, len(unsorted), 4)]
    unsorted_padding = sum(max(map(len, c)) - len(ids) for c in chunks for ids in c)
    assert padding < unsorted_padding / 2


def _loss(model_dir, problems) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    batch = base_policy.collate(
        tok, [_encoded(tok, p, task.sample_forgotten(p, rng, 0.65)) for p in problems]
    )
    with torch.no_grad():
        return demo_loss(model(input_ids=batch.input_ids).logits, batch, 0.65).item()


def test_small_build_is_fast_loadable_and_trained(small_build, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vapo_pl.tiny import build_tiny_model

    cache, path, seconds = small_build
    assert seconds < 60
    assert path.parent == cache and path.name == f"base-{base_policy.spec_hash(SMALL)}"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary directory left behind
    info = json.loads((path / base_policy.INFO_FILE).read_text())
    assert info["spec"] == json.loads(json.dumps(dataclasses.asdict(SMALL))) and info["build_seconds"] > 0
    assert info["steps"] == SMALL.steps and info["check_nll"] > 0
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == SMALL.num_layers
    assert model.config.max_position_embeddings == 256
    assert model.config.vocab_size > max(tokenizer(task.TASK_CHARS, add_special_tokens=False).input_ids)
    # the supervised steps did something: demonstration loss well below the untrained model's
    untrained = build_tiny_model(
        tmp_path / "init",
        hidden_size=32,
        num_layers=SMALL.num_layers,
        num_heads=SMALL.num_heads,
        num_kv_heads=SMALL.num_kv_heads,
        max_position_embeddings=256,
        seed=SMALL.seed,
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

    def fake_build(path, spec, *, num_threads=1, verbose=False):
        built.append(spec)
        (path / "weights").write_text(str(spec.steps))
        return {"build_seconds": 0.0}

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
    again = ensure_base_policy(tmp_path, SMALL, num_threads=1)
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"num_heads": 4}, "num_heads"),  # head size 16
        ({"num_heads": 3}, "num_heads"),  # 64 / 3
        ({"num_heads": 2, "num_kv_heads": 3}, "num_kv_heads"),
        ({"warmup_steps": 2000}, "warmup_steps"),
        ({"p_forget": 1.5}, "p_forget"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"task": {}}, "task"),
    ],
)
def test_base_spec_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BaseSpec(**kwargs)


def test_lr_schedule_hand_worked():
    spec = dataclasses.replace(SMALL, lr=1e-3, warmup_steps=4, steps=14)
    # warm-up: 1/4 .. 4/4 of lr; then cosine over the 10 remaining steps from lr down to lr / 10
    assert [base_policy.lr_at(s, spec) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert base_policy.lr_at(4, spec) == pytest.approx(1e-3)
    assert base_policy.lr_at(9, spec) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert base_policy.lr_at(14, spec) == pytest.approx(1e-4)
    lrs = [base_policy.lr_at(s, spec) for s in range(4, 15)]
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_default_spec_has_a_head_size_vllm_cpu_supports():
    """vLLM's CPU attention refuses head size 8 or 16 ("Unsupported CPU attention configuration")."""
    from vapo_pl.demo.base_policy import VLLM_CPU_HEAD_SIZES, BaseSpec

    spec = BaseSpec()
    assert (
        spec.hidden_size % spec.num_heads == 0 and spec.hidden_size // spec.num_heads in VLLM_CPU_HEAD_SIZES
    )
