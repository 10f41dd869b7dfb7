"""A small-settings base policy, built once per test session (seconds, not the demo's minutes)."""

from __future__ import annotations

import time

import pytest

from vapo_pl.demo.base_policy import BaseSpec, ensure_base_policy
from vapo_pl.demo.task import TaskSpec

# A model half the demo's width (one head of 32, a size vLLM's CPU attention supports), 40 steps, 200 prompts.
SMALL = BaseSpec(
    task=TaskSpec(num_train=200, num_heldout=20),
    hidden_size=32,
    num_heads=1,
    num_kv_heads=1,
    steps=40,
    batch_size=16,
    warmup_steps=5,
)


@pytest.fixture(scope="session")
def small_build(tmp_path_factory):
    """``(cache_dir, model_dir, build_seconds)`` of ``SMALL`` built into a fresh cache."""
    cache = tmp_path_factory.mktemp("demo_cache")
    t0 = time.perf_counter()
    path = ensure_base_policy(cache, SMALL, num_threads=1)
    return cache, path, time.perf_counter() - t0
