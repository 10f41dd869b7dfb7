"""Tests for callbacks/samples.py: escaping, the correct/wrong pick, and a real Trainer writing the text to
TensorBoard (the rollouts there are hand-built, no engine)."""

from __future__ import annotations

import pytest
import torch
from vapo_pl.callbacks.samples import TEXT_TAG, SampleLogger, markdown_escape, pick_samples

from tests.callbacks._helpers import make_rollout, read_events, run_trainer


def test_markdown_escape():
    assert markdown_escape("a*b_c") == r"a\*b\_c"
    assert markdown_escape("<script>x</script>") == r"\<script\>x\</script\>"
    assert markdown_escape(r"\boxed{1}") == r"\\boxed\{1\}"
    assert markdown_escape("# 1. [x](y)") == r"\# 1\. \[x\]\(y\)"
    assert markdown_escape("line1\nline2") == "line1  \nline2"  # a markdown hard line break
    assert markdown_escape("plain text 42") == "plain text 42"


def test_pick_balances_correct_and_wrong():
    correct = torch.tensor([True] * 5 + [False] * 5)
    picked = pick_samples(correct, 4, seed=0)
    assert len(set(picked)) == 4
    assert [bool(correct[i]) for i in picked] == [True, True, False, False]


@pytest.mark.parametrize(
    "correct, num, n_good, n_bad",
    [
        ([True] * 6 + [False], 4, 3, 1),  # one wrong only: top up with correct ones
        ([True] + [False] * 6, 4, 1, 3),  # one correct only
        ([False] * 3, 2, 0, 2),  # none correct
        ([True, False], 5, 1, 1),  # fewer samples than asked: all of them
        ([True] * 3 + [False] * 3, 3, 2, 1),  # odd count: the extra one goes to the correct side
    ],
)
def test_pick_tops_up_from_the_other_side(correct, num, n_good, n_bad):
    c = torch.tensor(correct)
    picked = pick_samples(c, num, seed=1)
    assert len(set(picked)) == len(picked) == n_good + n_bad
    assert sum(bool(c[i]) for i in picked) == n_good


def test_pick_is_seeded():
    correct = torch.tensor([True] * 20 + [False] * 20)
    assert pick_samples(correct, 4, seed=3) == pick_samples(correct, 4, seed=3)
    assert len({tuple(pick_samples(correct, 4, seed=s)) for s in range(10)}) > 1


@pytest.mark.parametrize("arg", ["every_n_steps", "num_samples", "max_chars"])
def test_bad_arguments_name_the_argument(arg):
    with pytest.raises(ValueError, match=f"SampleLogger.{arg}"):
        SampleLogger(**{arg: 0})


def _meta(i: int, response: str, extracted: str | None) -> dict:
    return {"prompt": f"What is {i}+{i}?", "response": response, "answer": str(2 * i), "extracted": extracted,
            "source": f"val.jsonl:{i + 1}"}


def test_render_without_metadata_is_none():
    assert SampleLogger().render(make_rollout([1, 2]), step=0) is None


def test_render_cuts_long_text():
    r = make_rollout([1], correct=[True], metadata=[_meta(1, "x" * 50, "2")])
    text = SampleLogger(max_chars=10).render(r, step=0)
    assert "x" * 10 + " \\[\\.\\.\\. 40 more characters\\]" in text
    assert "x" * 11 not in text


def test_trainer_writes_escaped_samples_every_n_steps(tmp_path):
    """Four steps of hand-built rollouts through a real Trainer; text is written after steps 2 and 4."""
    metadata = [
        _meta(1, "so it is \\boxed{2}", "2"),  # correct
        _meta(2, "**bold** <b>html</b>\nanswer 5", "5"),  # wrong, full of markdown / HTML
        _meta(3, "no idea", None),  # wrong, nothing extracted
    ]
    r = make_rollout([4, 7, 2], correct=[True, False, False], scores=[1.0, -1.0, -0.5], metadata=metadata)
    outputs = [{"rollout": r, "entropy": None, "metrics": {}}] * 4
    _, logger = run_trainer(tmp_path, [SampleLogger(every_n_steps=2, num_samples=3)], outputs)
    acc = read_events(logger)
    tag = f"{TEXT_TAG}/text_summary"  # what SummaryWriter.add_text names it
    events = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
    assert sorted(events) == [2, 4]
    text = events[2]
    assert text.count("**sample ") == 3
    assert text.index("correct, reward 1") < text.index("wrong, reward -")  # correct ones first
    assert r"\\boxed\{2\}" in text  # the correct sample, escaped
    assert r"What is 1\+1?" in text and "**answer:** 2 / **extracted:** 2" in text
    assert r"\*\*bold\*\* \<b\>html\</b\>" + "  \nanswer 5" in text and "<b>" not in text
    assert "no idea" in text and "**extracted:** (none)" in text
    assert r"source val\.jsonl:3" in text
