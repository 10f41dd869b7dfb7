"""The tool demo's demonstrations: the two paths as token ids, what the loss learns, and that the observation the base
policy is pretrained on is exactly what the sandboxed calculator answers during RL."""

from __future__ import annotations

import random

import torch

from vapo_pl.demo import task
from vapo_pl.demo.tools import TAG, ToolSpec, batch_loss, encode, expression
from vapo_pl.envs import ToolEnvironment
from vapo_pl.tiny import build_char_tokenizer, build_tiny_model

PROBLEM = task.Problem(47, (("+", 5), ("-", 3), ("+", 8)))


def test_tool_path_learns_the_turns_not_the_observation():
    tok = build_char_tokenizer()
    d = encode(tok, PROBLEM, True, (), ToolSpec())
    text = tok.decode(d.ids)
    assert text == "Q:47+5-3+8=?\nA:<calc>47+5-3+8</calc><eos>\n<tool_response>\n57\n</tool_response>\nA:\\boxed{57}<eos>"
    learned = tok.decode([t for t in d.labels if t != -100])
    assert learned == "calc>47+5-3+8</calc><eos>\\boxed{57}<eos>"  # "<" is the soft decision, the observation context
    (pos, kept, dropped, p), = d.forks
    assert tok.decode([d.ids[pos]]) == "<" and kept == d.ids[pos] and p == ToolSpec().p_tool
    assert tok.decode([dropped]) == "4"  # the text path's first token


def test_text_path_keeps_the_demos_carry_forks():
    tok = build_char_tokenizer()
    d = encode(tok, PROBLEM, False, (0,), ToolSpec())
    assert tok.decode(d.ids).endswith("A:47+5=42\n42-3=39\n39+8=47\n\\boxed{47}<eos>")
    assert [f[3] for f in d.forks] == [ToolSpec().p_tool] + [1 - ToolSpec().base.p_forget] * 2  # 47+5, 39+8


def test_the_demonstrated_observation_is_what_the_calculator_answers():
    tok = build_char_tokenizer()
    d = encode(tok, PROBLEM, True, (), ToolSpec())
    env = ToolEnvironment(tok, tag=TAG, tools=["calculator"])
    call = f"<{TAG}>{expression(PROBLEM)}</{TAG}>"
    r = env.step([], call)
    obs = tok(r.observation, add_special_tokens=False).input_ids
    start = len(tok.apply_chat_template([{"role": "user", "content": PROBLEM.prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) + len(call) + 1
    assert d.ids[start : start + len(obs)] == obs and r.info == {"tool_calls": 1, "tool_errors": 0,
                                                                 "tool_seconds": r.info["tool_seconds"]}


def test_loss_is_finite_and_learns(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(0)
    demos = [encode(tok, PROBLEM, rng.random() < 0.5, (), ToolSpec()) for _ in range(8)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = batch_loss(model, tok, demos)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and float(loss) < first / 2


def test_demo_batches_are_plain_encodes_bucketed_by_length():
    """The memoised encoder gives the ids ``encode`` gives, and each batch is a run of similar lengths: a batch's
    longest demonstration is shorter than the padding an unsorted batch of the same draws would need."""
    from vapo_pl.demo import base_policy
    from vapo_pl.demo.tools import demo_batches

    tok = build_char_tokenizer()
    spec = ToolSpec(base=base_policy.BaseSpec(batch_size=8))
    problems, _ = task.generate_splits(spec.base.task)
    batches = demo_batches(tok, problems[:50], spec, random.Random(3))
    drawn = [next(batches) for _ in range(base_policy.BUCKET_BATCHES)]
    flat = [d for b in drawn for d in b]
    assert len(flat) == 8 * base_policy.BUCKET_BATCHES
    rng = random.Random(3)  # the same draws, encoded one by one without the memo
    plain = []
    for p in rng.choices(problems[:50], k=len(flat)):
        use_tool = rng.random() < spec.p_tool
        plain.append(encode(tok, p, use_tool, task.sample_forgotten(p, rng, spec.base.p_forget), spec))
    key = lambda d: (d.ids, d.labels, d.forks)
    assert sorted(map(key, flat)) == sorted(map(key, plain))
    assert any(d.ids != plain[0].ids for d in plain)  # the draws differ, so the comparison above can fail
    padded = sum(max(len(d.ids) for d in b) * len(b) for b in drawn)
    unsorted = sum(max(len(d.ids) for d in plain[i : i + 8]) * 8 for i in range(0, len(plain), 8))
    assert padded < 0.9 * unsorted
