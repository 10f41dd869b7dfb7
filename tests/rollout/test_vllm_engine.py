"""VLLMEngine against the trainer-side references (transformers on the same weights).

One engine per model (each start takes 10-30 s on 2 shared cores). ``enforce_eager=True``: the tiny model
lives under a new pytest tmp path every session, which misses vLLM's torch.compile cache (keyed on the
path) and would cost ~60 s of compilation per engine. The ``synced`` fixture perturbs
the transformers copy and pushes it into the engine once, and every test after it works on those weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.rollout import EOS, PROMPTS, hf_greedy, load_hf, perturb_, reference_logprobs
from vapo_pl.rollout.base import Sampling
from vapo_pl.rollout.vllm_engine import VLLMEngine

GREEDY = Sampling(n=1, temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return VLLMEngine(tiny_model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def synced(tiny_model_dir, engine):
    """(perturbed transformers model, greedy engine outputs before the sync); the engine holds the new weights,
    sent the way the trainer sends them: streamed in small buckets (``stream_state_items``)."""
    from vapo_pl.parallel import stream_state_items

    model = load_hf(tiny_model_dir)
    perturb_(model, scale=0.5, seed=0)
    before = [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]
    engine.update_weights(stream_state_items(model, None, dtype=engine.weight_dtype, bucket_bytes=4096))
    return model, before


@pytest.mark.vllm
def test_greedy_matches_transformers_after_weight_sync(engine, synced):
    model, before = synced
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    after = [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]
    assert after == expected
    assert before != expected  # the engine really served other weights before the sync
    assert engine.version == 1


@pytest.mark.vllm
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, -1), (0.7, -1), (0.7, 5)])
def test_logprobs_are_those_of_the_sampling_distribution(engine, synced, temperature, top_k):
    """Each returned log-prob equals log_softmax(logits / T) (top-k masked, renormalised) of a forward pass."""
    model, _ = synced
    out = engine.generate(
        PROMPTS[:3], Sampling(n=3, temperature=temperature, top_k=top_k, max_tokens=20, seed=1)
    )
    for prompt, completions in zip(PROMPTS[:3], out):
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = reference_logprobs(model, prompt, c.token_ids, temperature, top_k)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_finish_reasons_stop_with_eos_and_length(engine, synced):
    max_tokens = 40
    out = engine.generate(PROMPTS[:2], Sampling(n=32, temperature=1.0, max_tokens=max_tokens, seed=3))
    completions = [c for per_prompt in out for c in per_prompt]
    assert len(completions) == 64
    reasons = {c.finish_reason for c in completions}
    assert reasons == {"stop", "length"}  # with p(EOS) ~ 1/97 per token both occur (seeded, so fixed)
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] and not c.truncated
        else:
            assert len(c.token_ids) == max_tokens and EOS not in c.token_ids and c.truncated
    short = engine.generate(PROMPTS[:2], Sampling(n=1, temperature=0.0, max_tokens=1))
    assert all(len(c[0].token_ids) == 1 for c in short)


@pytest.mark.vllm
def test_seeded_calls_reproduce_and_streams_differ(engine, synced):
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]  # a repeated prompt must still get its own samples
    sampling = Sampling(n=4, temperature=1.0, max_tokens=16, seed=11)
    torch.manual_seed(123)
    first = engine.generate(prompts, sampling)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_call)  # the trainer's global RNG was neither read nor advanced
    second = engine.generate(prompts, sampling)
    assert [[(c.token_ids, c.logprobs) for c in p] for p in first] == [
        [(c.token_ids, c.logprobs) for c in p] for p in second
    ]
    samples = [tuple(c.token_ids) for p in first for c in p]
    assert len(set(samples)) == len(samples)  # 12 distinct: n samples differ, repeated prompts differ
    other_seed = engine.generate(prompts, Sampling(n=4, temperature=1.0, max_tokens=16, seed=12))
    assert [c.token_ids for c in other_seed[0]] != [c.token_ids for c in first[0]]
    unseeded = Sampling(n=4, temperature=1.0, max_tokens=16)
    assert [c.token_ids for c in engine.generate(prompts, unseeded)[0]] != [
        c.token_ids for c in engine.generate(prompts, unseeded)[0]
    ]
    engine.replica = 1  # what rank 1 (tensor_parallel_size 1) would compute
    try:
        other_rank = engine.generate(prompts, sampling)
    finally:
        engine.replica = 0
    assert [c.token_ids for c in other_rank[0]] != [c.token_ids for c in first[0]]


@pytest.mark.vllm
def test_seeded_batch_larger_than_the_token_budget(engine):
    """Regression: vLLM 0.32 on CPU crashed ("CPU Generator does not use offset") when the prompts of a seeded
    call exceeded the scheduler's token budget and a prefill was chunked; the engine turns chunking off on CPU
    (with ``enable_chunked_prefill=True`` this test fails)."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    plen = 40
    n_prompts = budget // plen + 8  # more prompt tokens than one scheduler step takes
    prompts = [[5 + i % 60] * plen for i in range(n_prompts)]
    out = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_tokens=2, seed=3))
    assert len(out) == n_prompts and all(len(g) == 2 and g[0].token_ids for g in out)


def test_hf_engine_greedy_matches_vllm_on_same_weights(engine, synced):
    """Cross-engine check: left-padded batched HF generation vs vLLM, greedy, on the synced weights."""
    from vapo_pl.rollout.hf_engine import HFEngine

    model, _ = synced
    hf = HFEngine(model)
    assert [c[0].token_ids for c in hf.generate(PROMPTS, GREEDY)] == [
        c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)
    ]


@pytest.mark.vllm
def test_sync_logs_are_quiet_but_real_failures_show(engine, synced, monkeypatch):
    """Once an engine exists the per-sync noise (a rotary embedding has no weights to load; INFO lines) is filtered on
    vLLM's own loggers, while another layer's load failure and other warnings still pass."""
    import logging

    from vapo_pl.rollout.vllm_engine import _SYNC_LOGGERS

    import importlib

    for name in _SYNC_LOGGERS:  # the loggers vLLM's modules really log to (a rename upstream fails here)
        assert importlib.import_module(name).logger.name == name
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    layerwise = logging.getLogger(_SYNC_LOGGERS[0])

    def passes(level, msg, *args):
        return layerwise.filter(logging.LogRecord(layerwise.name, level, __file__, 1, msg, args, None))

    assert not passes(logging.WARNING, "%s: Failed to load weights", "RotaryEmbedding")
    assert passes(logging.WARNING, "%s: Failed to load weights", "QKVParallelLinear")
    assert passes(logging.ERROR, "something else")
    assert not passes(logging.INFO, "Successfully reset prefix cache")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")
    assert passes(logging.WARNING, "%s: Failed to load weights", "RotaryEmbedding")


def test_only_the_intended_narrowing_cast_warning_is_dropped(engine, monkeypatch):
    """Weights sent as float32 views into a 16-bit engine are cast by vLLM's loader on purpose; its per-weight warning
    about that is dropped, any other dtype mismatch (and everything else on that logger) still shows."""
    import importlib
    import logging

    from vapo_pl.rollout.vllm_engine import _CAST_LOGGER

    assert importlib.import_module(_CAST_LOGGER).logger.name == _CAST_LOGGER
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    logger = logging.getLogger(_CAST_LOGGER)
    msg = "Attempted to load weight %s with dtype %s into parameter with dtype %s"

    def passes(*args, level=logging.WARNING, text=msg):
        return logger.filter(logging.LogRecord(logger.name, level, __file__, 1, text, args, None))

    assert not passes("lm_head.weight", torch.float32, torch.bfloat16)
    assert not passes("lm_head.weight", torch.float32, torch.float16)
    assert passes("lm_head.weight", torch.float16, torch.bfloat16)
    assert passes("lm_head.weight", torch.int8, torch.bfloat16)
    assert passes(level=logging.INFO, text="some other line")


def test_update_weights_rejects_empty(engine):
    with pytest.raises(ValueError, match="weights"):
        engine.update_weights([])


@pytest.mark.vllm
def test_tied_embeddings_sync(tiny_tied_model_dir):
    model = load_hf(tiny_tied_model_dir)
    state = model.state_dict()
    assert (
        "lm_head.weight" in state
        and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    )
    tied = VLLMEngine(tiny_tied_model_dir, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    perturb_(model, scale=0.5, seed=1)
    before = [c[0].token_ids for c in tied.generate(PROMPTS, GREEDY)]
    tied.update_weights(model.state_dict().items())
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert [c[0].token_ids for c in tied.generate(PROMPTS, GREEDY)] == expected
    assert before != expected


def test_constructor_rejects_bad_options(tiny_model_dir, tmp_path):
    """Validated before vLLM is touched: no engine starts here."""
    with pytest.raises(ValueError, match="dtype"):
        VLLMEngine(tiny_model_dir, dtype="float64")
    with pytest.raises(ValueError, match="kv_cache_space_gb"):
        VLLMEngine(tiny_model_dir, kv_cache_space_gb=0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(tiny_model_dir, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="model_path"):
        VLLMEngine(tmp_path / "missing")


_DIST_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
from vapo_pl.rollout.base import Sampling
from vapo_pl.rollout.vllm_engine import VLLMEngine
engine = VLLMEngine(sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
out = engine.generate([[5, 6, 7, 8]], Sampling(n=2, temperature=1.0, max_tokens=8, seed=3))
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)  # the trainer's group still works next to the engine
result = {"replica": engine.replica, "tokens": [c.token_ids for c in out[0]], "sum": total.item()}
open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(result))
"""


@pytest.mark.vllm
@pytest.mark.distributed
def test_one_engine_per_rank_under_torchrun(tiny_model_dir, tmp_path):
    """Two ranks with a gloo group (as the trainer has): external_launcher engines, one per rank,
    with different sampling streams for the same seeded call."""
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run(
        [*cmd, str(script), str(tiny_model_dir), str(tmp_path)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["replica"] for r in ranks] == [0, 1]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]  # 1 + 2 on both ranks
    assert ranks[0]["tokens"] != ranks[1]["tokens"]



@pytest.mark.vllm
def test_streamed_sync_holds_about_one_layer_not_the_model(engine, tiny_model_dir):
    """Peak extra memory of a sync to a bfloat16 engine, measured by ``benchmarks/weight_sync_memory.PeakTracker``:
    materialised, every cast copy is alive at once (the whole model); gathered tensors (a new cast tensor per
    parameter, as after an FSDP2/ZeRO-3 gather) streamed lazily peak at what vLLM's layer-wise reload holds until a
    fused layer is complete (gate+up of one MLP here), not the model; weights held whole go as views (nothing)."""
    import importlib.util

    from tests.conftest import REPO
    from vapo_pl.parallel import stream_state_items

    spec = importlib.util.spec_from_file_location("weight_sync_memory", REPO / "benchmarks" / "weight_sync_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load_hf(tiny_model_dir)
    size = bench.model_bytes(model, torch.bfloat16)
    layer = bench.largest_fused_layer(model, torch.bfloat16)
    materialised = bench.PeakTracker(model)
    engine.update_weights(list(materialised.wrap((k, v.to(torch.bfloat16)) for k, v in model.state_dict().items())))
    gathered = bench.PeakTracker(model)
    engine.update_weights(gathered.wrap((k, v.clone().to(torch.bfloat16)) for k, v in model.state_dict().items()))
    views = bench.PeakTracker(model)
    engine.update_weights(views.wrap(stream_state_items(model, None, dtype=torch.bfloat16, bucket_bytes=size // 20)))
    assert materialised.peak == size
    assert gathered.count == materialised.count  # every tensor was cast and sent
    assert gathered.peak <= layer + size // 20 and gathered.peak < 0.5 * size  # the layer plus one tensor in flight
    assert views.count == 0 and views.peak == 0


def test_float32_views_load_into_a_bfloat16_engine_as_the_cast_copies_do(tiny_model_dir):
    """Weights a rank holds whole go to the engine as views of the float32 actor (no copy) and vLLM's loaders cast
    them while copying: a bfloat16 engine then generates exactly what it generates from explicitly cast bf16
    tensors (tokens and log-probs), and not what it generated before the sync."""
    from vapo_pl.parallel import stream_state_items

    engine = VLLMEngine(tiny_model_dir, dtype="bfloat16", max_model_len=256, enforce_eager=True, seed=0)
    assert engine.weight_dtype == torch.bfloat16
    sampling = Sampling(n=1, temperature=0.0, max_tokens=16)
    before = engine.generate(PROMPTS, sampling)
    model = load_hf(tiny_model_dir)
    perturb_(model, scale=0.5, seed=1)
    views = list(stream_state_items(model, None, dtype=torch.bfloat16))
    assert all(t.dtype == torch.float32 for _, t in views)
    assert all(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
               for (_, t), p in zip(views, model.state_dict().values()))
    engine.update_weights(views)
    from_views = engine.generate(PROMPTS, sampling)
    engine.update_weights((k, v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    from_casts = engine.generate(PROMPTS, sampling)
    tokens = [[c.token_ids for c in out] for out in from_views]
    assert tokens == [[c.token_ids for c in out] for out in from_casts]
    assert tokens != [[c.token_ids for c in out] for out in before]
    assert [[c.logprobs for c in out] for out in from_views] == [[c.logprobs for c in out] for out in from_casts]


def test_an_unfinished_stream_leaves_grad_mode_alone(tiny_model_dir):
    """The sync's generator must not switch autograd off for its caller, even when abandoned half-way."""
    import torch

    from vapo_pl.parallel import stream_state_items

    model = load_hf(tiny_model_dir)
    items = stream_state_items(model, None, dtype=torch.bfloat16, bucket_bytes=1024)
    _, tensor = next(items)
    assert torch.is_grad_enabled() and not tensor.requires_grad
