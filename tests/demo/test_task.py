"""The demo task: hand-worked solutions, determinism, the shipped splits, grading by ``math_verify``."""

from __future__ import annotations

import random
from itertools import combinations

import pytest
import torch

from vapo_pl.demo import task
from vapo_pl.demo.evaluate import grade
from vapo_pl.demo.task import Problem, TaskSpec
from vapo_pl.tiny import DEFAULT_CHARS, build_char_tokenizer


@pytest.fixture(scope="module")
def splits() -> tuple[list[Problem], list[Problem]]:
    return task.generate_splits()


def test_hand_worked_problem():
    p = Problem(47, (("+", 5), ("-", 3), ("+", 8)))
    assert p.prompt == "47+5-3+8=?"
    # 47+5 = 52 (units 7+5 = 12 carries), 52-3 = 49, 49+8 = 57 (9+8 = 17 carries)
    assert p.answer == "57"
    assert p.carries == (0, 2)
    assert p.solution() == "47+5=52\n52-3=49\n49+8=57\n\\boxed{57}"
    # forgetting the first carry keeps the tens digit: 42, then 42-3 = 39, 39+8 = 47 (still carries)
    assert p.solution([0]) == "47+5=42\n42-3=39\n39+8=47\n\\boxed{47}"
    # both forgotten: 42, 39, 37; a step that does not carry ignores "forgotten"
    assert p.solution([0, 1, 2]) == "47+5=42\n42-3=39\n39+8=37\n\\boxed{37}"
    assert task.parse_prompt(p.prompt) == p


@pytest.mark.parametrize("bad", ["47+5-3+8", "7+5=?", "47+15=?", "47*5=?", "47=?", ""])
def test_parse_prompt_rejects(bad):
    with pytest.raises(ValueError, match="prompt"):
        task.parse_prompt(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_train": 0}, "num_train"),
        ({"min_steps": 0}, "min_steps"),
        ({"max_steps": 0}, "max_steps"),
        ({"carry_weights": (0.0, 0.0)}, "carry_weights"),
        ({"carry_weights": (1.0, -1.0)}, "carry_weights"),
    ],
)
def test_task_spec_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TaskSpec(**kwargs)


def test_generator_is_deterministic(splits):
    again = task.generate_splits()
    assert again == splits
    other = task.generate_splits(TaskSpec(seed=1))
    assert [p.prompt for p in other[1]] != [p.prompt for p in splits[1]]
    # held-out is drawn first: a different train size leaves it unchanged
    assert task.generate_splits(TaskSpec(num_train=50))[1] == splits[1]


def test_shipped_files_are_the_generators_output(splits):
    train, heldout = splits
    assert task.TRAIN_FILE.read_text() == task.to_jsonl(train)
    assert task.HELDOUT_FILE.read_text() == task.to_jsonl(heldout)
    assert task.read_split(task.TRAIN_FILE) == train
    assert task.read_split(task.HELDOUT_FILE) == heldout


def test_write_splits_round_trip(tmp_path):
    spec = TaskSpec(num_train=30, num_heldout=10, seed=7)
    train_path, heldout_path = task.write_splits(tmp_path, spec)
    train, heldout = task.generate_splits(spec)
    assert task.read_split(train_path) == train and task.read_split(heldout_path) == heldout
    assert set(train_path.read_text().splitlines()[0].replace('"', "").strip("{}").split(", ")) == {
        f"prompt: {train[0].prompt}",
        f"answer: {train[0].answer}",
    }


def test_read_split_rejects_a_wrong_answer(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "47+5=?", "answer": "53"}\n')
    with pytest.raises(ValueError, match="answer"):
        task.read_split(path)


def test_splits_sizes_unique_and_disjoint(splits):
    train, heldout = splits
    assert (len(train), len(heldout)) == (2000, 200)
    train_prompts, heldout_prompts = {p.prompt for p in train}, {p.prompt for p in heldout}
    assert len(train_prompts) == 2000 and len(heldout_prompts) == 200
    assert not train_prompts & heldout_prompts


def test_problem_invariants(splits):
    """Any set of forgotten carries keeps every value in [10, 99] and makes the answer short by 10 each."""
    for p in splits[0] + splits[1]:
        assert 10 <= p.start <= 99 and 1 <= len(p.ops) <= 8
        assert all(op in "+-" and 1 <= b <= 9 for op, b in p.ops)
        steps = task.run_chain(p, ())
        assert all(10 <= r <= 99 for *_, r in steps)
        for a, op, b, _ in steps:  # subtractions never borrow
            assert op == "+" or a % 10 >= b
        assert len(p.carries) <= 2
        for k in range(len(p.carries) + 1):
            for forgotten in combinations(p.carries, k):
                values = [r for *_, r in task.run_chain(p, forgotten)]
                assert all(10 <= v <= 99 for v in values)
                assert values[-1] == int(p.answer) - 10 * k


def test_carry_and_length_mix(splits):
    train, heldout = splits
    for split in (train, heldout):
        counts = torch.bincount(torch.tensor([len(p.carries) for p in split]), minlength=3).float() / len(
            split
        )
        assert 0.02 < counts[0] < 0.1 and 0.75 < counts[1] < 0.93 and 0.05 < counts[2] < 0.18
        lengths = [len(p.solution()) for p in split]
        assert lengths == [8 * len(p.ops) + 10 for p in split]  # two-digit values: 8 characters a line
        assert min(lengths) == 18 and max(lengths) == 74  # 1 step vs 8 steps
        assert max(lengths) / min(lengths) >= 4
        assert len({len(p.ops) for p in split}) == 8  # every chain length 1..8 occurs


def test_demonstration_forget_rate():
    p = Problem(47, (("+", 5), ("-", 3), ("+", 8)))
    rng = random.Random(0)
    demos = [task.demonstration(p, rng, 0.6) for _ in range(4000)]
    first_forgotten = sum(d.startswith("47+5=42") for d in demos) / len(demos)
    right = sum(d == p.solution() for d in demos) / len(demos)
    assert abs(first_forgotten - 0.6) < 0.03  # binomial sd sqrt(.24/4000) = 0.008
    assert abs(right - 0.4**2) < 0.03
    assert {task.demonstration(p, rng, 0.0) for _ in range(20)} == {p.solution()}
    assert {task.demonstration(p, rng, 1.0) for _ in range(20)} == {p.solution([0, 2])}
    assert {task.sample_forgotten(p, rng, 1.0) for _ in range(5)} == {(0, 2)}


def test_forks_hand_worked():
    p = Problem(47, (("+", 5), ("-", 3), ("+", 8)))
    # "47+5=52\n52-3=49\n49+8=57": tens digits at characters 5 and 21, 5|4 then 5|4
    assert task.forks(p, ()) == [task.Fork(5, "5", "4"), task.Fork(21, "5", "4")]
    # after dropping the first carry the path runs 42, 39, 39+8 = 47 kept or 37 dropped
    assert task.forks(p, (0,)) == [task.Fork(5, "5", "4"), task.Fork(21, "4", "3")]
    assert task.forks(Problem(12, (("-", 1),)), ()) == []


def test_forks_are_where_the_paths_part(splits):
    """Along any path, keeping or dropping a carry agrees up to its fork and differs exactly there."""
    for p in splits[1]:
        for k in range(len(p.carries) + 1):
            for forgotten in combinations(p.carries, k):
                text = p.solution(forgotten)
                for step, fork in zip(p.carries, task.forks(p, forgotten)):
                    other = p.solution(tuple(sorted(set(forgotten) ^ {step})))
                    assert text[: fork.index] == other[: fork.index]
                    kept, dropped = (other, text) if step in forgotten else (text, other)
                    assert (kept[fork.index], dropped[fork.index]) == (fork.kept, fork.dropped)


def test_every_shipped_answer_verifies(splits):
    """The real ``math_verify`` reward: each canonical solution scores 1; a wrong final number scores 0."""
    problems = splits[0] + splits[1]
    answers = [p.answer for p in problems]
    right = grade([p.solution() for p in problems], answers).float()
    assert right.tolist() == [1.0] * len(problems)
    off_by_one = [p.solution()[: -len(p.answer) - 1] + f"{int(p.answer) + 1}}}" for p in problems]
    assert all(s.endswith(f"\\boxed{{{int(p.answer) + 1}}}") for s, p in zip(off_by_one, problems))
    assert grade(off_by_one, answers).float().tolist() == [0.0] * len(problems)
    with_carry = [p for p in problems if p.carries]
    forgotten = grade([p.solution(p.carries[:1]) for p in with_carry], [p.answer for p in with_carry]).float()
    assert forgotten.tolist() == [0.0] * len(with_carry)


def test_characters_are_in_the_tiny_vocabulary(splits):
    assert set(task.TASK_CHARS) <= set(DEFAULT_CHARS)
    tok = build_char_tokenizer()
    for p in splits[1]:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False
        )
        text += p.solution()
        assert set(text) <= set(task.TASK_CHARS)
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text)  # one token per character, none unknown
        assert tok.decode(ids) == text


def test_long_task_files_are_what_its_spec_generates():
    """The shipped long-task splits equal ``generate_splits(long.TASK)``; its responses run 18-130 characters with
    1-3 carries, as ``vapo_pl/demo/long.py`` says."""
    from vapo_pl.demo import long

    train, heldout = task.generate_splits(long.TASK)
    assert long.TRAIN_FILE.read_text() == task.to_jsonl(train)
    assert long.HELDOUT_FILE.read_text() == task.to_jsonl(heldout)
    lengths = [len(p.solution()) for p in train]
    assert (min(lengths), max(lengths)) == (18, 130)
    assert {len(p.carries) for p in train} == {1, 2, 3}
