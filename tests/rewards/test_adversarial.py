"""Hostile responses score 0 within the time bound, from any thread, with no side effect.

The bound is per sample: ``timeout_s`` in the verifier process plus ``KILL_GRACE_S`` before the
parent kills it. Wall times are measured per input after the pool is warm (start-up is not a
sample's cost), with 1 s of margin for a shared 2-core machine.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.rewards._helpers import make_inputs
from vapo_pl.rewards import correctness, resolve_reward_fn
from vapo_pl.rewards.verifier import KILL_GRACE_S, VerifierPool, get_pool

math_verify = resolve_reward_fn("math_verify")
TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + KILL_GRACE_S + 1.0
REPO = Path(__file__).resolve().parents[2]

HOSTILE = {
    "megabyte_no_answer": "lorem ipsum " * 90_000,
    "megabyte_then_wrong_box": "x " * 500_000 + "\\boxed{41}",
    "nested_braces_10k": "\\boxed{" + "{" * 10_000 + "42" + "}" * 10_000 + "}",
    "nested_parens_10k": "The answer is " + "(" * 10_000 + "42" + ")" * 10_000,
    "unbalanced_box": "The answer is \\boxed{",
    "unbalanced_box_with_answer": "Therefore \\boxed{42",
    "nul_bytes": "\x00" * 100_000 + "\\boxed{4\x002}",
    "nul_in_anchor": "The answer is \x00\x00",
    "unicode_fullwidth": "\\boxed{\uff14\uff12}",
    "unicode_arabic_digits": "\\boxed{\u0664\u0662}",
    "unicode_bidi_zero_width": "\\boxed{\u202e24\u202c\u200b}",
    "unicode_surrogate_emoji": "\\boxed{\ud800\U0001f600\u0301}",
    "unicode_flood": "\U0001f600\u0301" * 300_000 + "\\boxed{\u2167}",
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "power_tower_plain": "The answer is 9^9^9^9^9",
    "factorial_bomb": "\\boxed{(10^{10^{7}})!}",
}


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    get_pool().warm_up()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_scores_zero_within_bound(name):
    inputs = make_inputs([HOSTILE[name]], ["42"])
    t0 = time.perf_counter()
    out = math_verify(inputs, timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    assert out.scores.tolist() == [0.0]
    assert elapsed < BOUND_S, f"{name}: {elapsed:.2f} s"
    get_pool().warm_up()  # a killed worker's replacement starts here, not in the next input's timing


def test_megabyte_keeps_a_correct_final_answer():
    inputs = make_inputs(["x " * 500_000 + "\\boxed{42}"], ["42"])
    t0 = time.perf_counter()
    assert math_verify(inputs, timeout_s=TIMEOUT_S).scores.tolist() == [1.0]
    assert time.perf_counter() - t0 < BOUND_S


def test_code_injection_has_no_effect(tmp_path, monkeypatch):
    payloads = [
        "\\boxed{__import__('os').system('touch PWNED')}",
        "The answer is __import__('os').system('touch PWNED')",
        "The answer is 1+__import__('os').system('touch PWNED')",
        "\\boxed{\\text{__import__('os').system('touch PWNED')}}",
        "\\boxed{eval(\"__import__('os').system('touch PWNED')\")}",
        '#### exec(\'open("PWNED","w")\')',
    ]
    monkeypatch.chdir(tmp_path)
    places = [tmp_path / "PWNED", Path(tempfile.gettempdir()) / "PWNED", REPO / "PWNED"]
    assert not any(p.exists() for p in places)
    # A real pool started here, so its worker's working directory is tmp_path too.
    fresh = VerifierPool(1)
    monkeypatch.setattr(correctness, "get_pool", lambda num_workers=None: fresh)
    try:
        out = math_verify(make_inputs(payloads, ["0"] * len(payloads)), timeout_s=TIMEOUT_S)
    finally:
        fresh.close()
    assert out.scores.tolist() == [0.0] * len(payloads)
    assert not any(p.exists() for p in places)


def test_bound_holds_off_the_main_thread():
    """math-verify's own signal.alarm timeouts would raise here; the worker processes do not care."""
    result = {}

    def work():
        inputs = make_inputs([HOSTILE["power_tower"], "\\boxed{42}"], ["42", "42"])
        t0 = time.perf_counter()
        result["out"] = math_verify(inputs, timeout_s=TIMEOUT_S)
        result["elapsed"] = time.perf_counter() - t0

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result["out"].scores.tolist() == [0.0, 1.0]
    assert result["out"].stats["math_verify/timeout_frac"] == 0.5
    assert result["elapsed"] < BOUND_S
