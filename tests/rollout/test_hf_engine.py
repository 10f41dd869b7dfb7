"""HFEngine (transformers ``generate``) against a plain forward pass, and the engine factory.

The greedy comparison with vLLM on the same weights lives in ``test_vllm_engine.py`` (it needs the
vLLM engine that module already starts).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.rollout import EOS, PROMPTS, hf_greedy, load_hf, perturb_, reference_logprobs
from vapo_pl.common import derive_seed
from vapo_pl.rollout.base import Sampling
from vapo_pl.rollout.factory import build_engine
from vapo_pl.rollout.hf_engine import HFEngine

GREEDY = Sampling(n=1, temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = load_hf(tiny_model_dir)
    perturb_(model, scale=0.5, seed=2)
    return model


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, -1), (0.7, -1), (0.7, 5)])
def test_logprobs_are_those_of_the_sampling_distribution(model, temperature, top_k):
    """Left-padded batch; each log-prob equals log_softmax(logits / T) (top-k masked) of one forward pass."""
    engine = HFEngine(model)
    out = engine.generate(PROMPTS, Sampling(n=2, temperature=temperature, top_k=top_k, max_tokens=20, seed=1))
    assert [len(p) for p in out] == [2] * len(PROMPTS)
    for prompt, completions in zip(PROMPTS, out):
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = reference_logprobs(model, prompt, c.token_ids, temperature, top_k)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_greedy_batched_equals_unbatched_generate(model):
    """Left padding must not change greedy decoding: batch of five vs five single-prompt ``generate`` calls."""
    got = [c[0].token_ids for c in HFEngine(model).generate(PROMPTS, GREEDY)]
    assert got == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]


def test_checkpoint_generation_config_is_ignored(model):
    """Settings in the model's generation_config (here min-p, an n-gram ban, a repetition penalty, top-k 3)
    must not leak into sampling: generate() fills every field the call leaves unset from it."""
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.min_p = 0.3
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 3
    try:
        out = HFEngine(model).generate(PROMPTS[:2], Sampling(n=2, temperature=1.0, max_tokens=12, seed=4))
        assert model.generation_config.min_p == 0.3  # put back after the call
    finally:
        model.generation_config = saved
    for prompt, completions in zip(PROMPTS[:2], out):
        for c in completions:
            ref = reference_logprobs(model, prompt, c.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_finish_reasons_stop_with_eos_and_length(model):
    max_tokens = 40
    out = HFEngine(model).generate(
        PROMPTS[:2], Sampling(n=32, temperature=1.0, max_tokens=max_tokens, seed=3)
    )
    completions = [c for per_prompt in out for c in per_prompt]
    assert {c.finish_reason for c in completions} == {"stop", "length"}  # p(EOS) ~ 1/97 per token, seeded
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == max_tokens and EOS not in c.token_ids


def test_seeded_calls_reproduce_streams_differ_and_global_rng_is_untouched(model):
    engine = HFEngine(model, max_batch_size=5)  # 12 rows in chunks of 5, 5, 2
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    sampling = Sampling(n=4, temperature=1.0, max_tokens=16, seed=11)
    torch.manual_seed(123)
    first = engine.generate(prompts, sampling)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_call)  # the call neither read nor advanced the global RNG
    second = engine.generate(prompts, sampling)
    assert [[(c.token_ids, c.logprobs) for c in p] for p in first] == [
        [(c.token_ids, c.logprobs) for c in p] for p in second
    ]
    samples = [tuple(c.token_ids) for p in first for c in p]
    assert len(set(samples)) == len(samples)
    other_rank = HFEngine(model, rank=1, max_batch_size=5).generate(prompts, sampling)
    assert [c.token_ids for c in other_rank[0]] != [c.token_ids for c in first[0]]
    unseeded = Sampling(n=2, temperature=1.0, max_tokens=16)
    assert (
        engine.generate(prompts, unseeded)[0][0].token_ids
        != engine.generate(prompts, unseeded)[0][0].token_ids
    )


def test_shared_module_sees_trainer_updates_without_copy(tiny_model_dir):
    model = load_hf(tiny_model_dir)
    engine = HFEngine(model)
    before = [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]
    perturb_(model, scale=0.5, seed=3)  # the "optimizer step", in place on the shared module

    def never_iterated():
        raise AssertionError("a shared engine must not pull the weights")
        yield

    engine.update_weights(never_iterated())
    after = [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]
    assert engine.version == 1
    assert after == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS] != before
    model.train()
    engine.generate(PROMPTS[:1], GREEDY)
    assert model.training  # the engine restores the trainer's mode


@pytest.mark.parametrize("tied", [False, True])
def test_owned_model_copies_weights(tiny_model_dir, tiny_tied_model_dir, tied):
    path = tiny_tied_model_dir if tied else tiny_model_dir
    engine = HFEngine(path, dtype="float32")
    trainer = load_hf(path)
    perturb_(trainer, scale=0.5, seed=4)
    before = [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]
    state = trainer.state_dict()
    if tied:
        del state["lm_head.weight"]  # tied: the embedding alone carries it
    engine.update_weights(state.items())
    expected = [hf_greedy(trainer, p, GREEDY.max_tokens) for p in PROMPTS]
    assert [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected != before
    assert engine.version == 1
    with pytest.raises(ValueError, match="unexpected"):
        engine.update_weights([("model.not_a_layer.weight", torch.zeros(1))])


def test_derive_seed_separates_nearby_inputs():
    """seed + rank would collide ((0, 1) vs (1, 0)); the hash keeps all 400 pairs apart and below 2**62."""
    seeds = {derive_seed(s, r) for s in range(100) for r in range(4)}
    assert len(seeds) == 400 and max(seeds) < 2**62
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)


def test_factory_builds_hf_and_rejects_bad_input(tiny_model_dir, tmp_path):
    assert isinstance(build_engine("hf", tiny_model_dir, dtype="float32"), HFEngine)
    with pytest.raises(
        ValueError, match=r"kind: unknown rollout engine 'sglang'; choose one of \['vllm', 'hf'\]"
    ):
        build_engine("sglang", tiny_model_dir)
    missing = tmp_path / "no_such_model"
    for kind in ("vllm", "hf"):
        with pytest.raises(ValueError) as err:
            build_engine(kind, missing)
        assert str(err.value) == f"model_path: no model directory at {str(missing)!r}"  # one line, the path
