"""The demo's task: chains of single-digit additions and subtractions, solved one line per step.

A problem is a two-digit start and 1..8 single-digit operations; the prompt is the question only
(``"47+5-3+8=?"``, the chat template adds ``Q:``/``A:``) and the worked solution writes every
intermediate result before the boxed answer::

    47+5=52
    52-3=49
    49+8=57
    \\boxed{57}

so responses run from 18 to 74 characters (1 to 8 steps): the heterogeneous lengths that VAPO's
length-adaptive GAE is for. The gold answer is graded by the ``math_verify`` reward, as any user's.

Structure that the base policy's imperfect demonstrations rely on (``demonstration``):

- A step *carries* when the units digits of an addition overflow (``47+5``); every other step
  stays inside its decade (additions that do not overflow, subtractions that do not borrow), so
  there is never a borrow, and the number of carries ``c`` is fixed by the problem (0, 1 or 2).
- The demonstrator forgets a carry with probability ``p_forget`` (writes ``47+5=42``) and is
  otherwise exact, always continuing from the number it wrote. A forgotten carry only changes a
  tens digit, so later steps carry exactly where they would have, and the final answer is short by
  ten per forgotten carry: a wrong path can never come back to the right answer.
- No move (``+5``, ``-3``) occurs twice in a problem, so the next move is always the one after the
  move just made: a lookup by content, not by counting.
- The start decade ``d0`` satisfies ``max(1, c) <= d0 <= 9 - c``. A value's decade is ``d0`` plus the
  carries kept so far, so every value on every path has two digits: each line is 8 characters and
  a solution of ``s`` steps is ``8 s + 10`` (no minus signs, no third digit).

Splits are drawn from one seeded ``random.Random``; prompts are unique, and train and held-out
share none. ``write_splits`` writes the shipped ``data/train.jsonl`` and ``data/heldout.jsonl``
(fields ``prompt`` and ``answer``); a test checks they equal what ``generate_splits`` produces.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"

# Every character a prompt, a solution or the chat template can contain (a subset of tiny.DEFAULT_CHARS).
TASK_CHARS = "0123456789+-=?\n:\\{}QAboxed "

_PROMPT = re.compile(r"(\d{2})((?:[+-]\d)+)=\?")


@dataclass(frozen=True)
class TaskSpec:
    """Parameters of the problem generator; ``generate_splits(TaskSpec())`` gives the shipped files."""

    seed: int = 1234  # the one random.Random every split is drawn from
    num_train: int = 2000  # training prompts
    num_heldout: int = 200  # held-out prompts, disjoint from the training ones
    min_steps: int = 1  # operations per problem, drawn uniformly from [min_steps, max_steps]
    max_steps: int = 8
    carry_weights: tuple[float, ...] = (0.05, 0.85, 0.1)  # P(c = 0, 1, 2 carries), c capped at the steps
    carry_window: int = 0  # carries fall among the first carry_window steps; 0 = anywhere in the chain

    def __post_init__(self) -> None:
        for name in ("num_train", "num_heldout", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TaskSpec.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_steps, int) or not self.min_steps <= self.max_steps <= 16:
            raise ValueError(f"TaskSpec.max_steps must be an int in [min_steps, 16], got {self.max_steps!r}")
        w = self.carry_weights
        if not w or len(w) > 5 or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(
                f"TaskSpec.carry_weights must be 1..5 non-negative weights, not all 0, got {w!r}"
            )
        if isinstance(self.carry_window, bool) or not isinstance(self.carry_window, int) or self.carry_window < 0:
            raise ValueError(f"TaskSpec.carry_window must be an int >= 0, got {self.carry_window!r}")


@dataclass(frozen=True)
class Problem:
    """``start`` followed by ``ops``: e.g. ``Problem(47, (("+", 5), ("-", 3)))`` is ``47+5-3``."""

    start: int  # two digits, 10..99
    ops: tuple[tuple[str, int], ...]  # ("+" or "-", 1..9) per step

    @property
    def prompt(self) -> str:
        return f"{self.start}" + "".join(f"{op}{b}" for op, b in self.ops) + "=?"

    @property
    def answer(self) -> str:
        return str(run_chain(self, ())[-1][-1])

    @property
    def carries(self) -> tuple[int, ...]:
        """Indices of the steps whose units digits overflow."""
        return tuple(
            i for i, (a, op, b, _) in enumerate(run_chain(self, ())) if op == "+" and a % 10 + b >= 10
        )

    def solution(self, forgotten: Sequence[int] = ()) -> str:
        """The worked solution; the steps listed in ``forgotten`` drop their carry."""
        lines = [f"{a}{op}{b}={r}" for a, op, b, r in run_chain(self, forgotten)]
        return "\n".join(lines) + f"\n\\boxed{{{run_chain(self, forgotten)[-1][-1]}}}"


def run_chain(problem: Problem, forgotten: Sequence[int]) -> list[tuple[int, str, int, int]]:
    """``(value, op, operand, result)`` per step; a step in ``forgotten`` that carries keeps its tens."""
    steps, a = [], problem.start
    for i, (op, b) in enumerate(problem.ops):
        r = a + b if op == "+" else a - b
        if i in forgotten and op == "+" and a % 10 + b >= 10:
            r -= 10
        steps.append((a, op, b, r))
        a = r
    return steps


def parse_prompt(prompt: str) -> Problem:
    """The inverse of ``Problem.prompt``."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not a demo-task prompt like '47+5-3=?'")
    ops = tuple((s[0], int(s[1])) for s in re.findall(r"[+-]\d", m.group(2)))
    return Problem(int(m.group(1)), ops)


def sample_problem(rng: random.Random, spec: TaskSpec) -> Problem:
    """One problem: steps uniform in [min_steps, max_steps], then the carry count, then the numbers.

    Carrying steps are placed at random (among the first ``spec.carry_window`` steps if it is set); a non-carrying step picks uniformly among the moves that
    stay in the decade (add 1..9-u or subtract 1..u, with u the units digit), a carrying step among
    the additions that overflow (add 10-u..9). No move appears twice in a problem, so "the move after
    the one just made" is unambiguous in the prompt.
    A draw that hits a dead end (no unused move of the needed kind) is redrawn.
    """
    num_steps = rng.randint(spec.min_steps, spec.max_steps)
    window = min(num_steps, spec.carry_window) if spec.carry_window else num_steps
    max_c = min(window, len(spec.carry_weights) - 1)
    c = rng.choices(range(max_c + 1), weights=spec.carry_weights[: max_c + 1])[0]
    while True:
        carry_at = set(rng.sample(range(window), c))
        a = rng.randint(10 * max(1, c), 10 * (10 - c) - 1)  # start decade in [max(1, c), 9 - c]
        start, ops = a, []
        for i in range(num_steps):
            u = a % 10
            if i in carry_at:
                moves = [("+", b) for b in range(10 - u, 10)]
            else:
                moves = [("+", b) for b in range(1, 10 - u)] + [("-", b) for b in range(1, u + 1)]
            moves = [m for m in moves if m not in ops]
            if not moves:
                break
            op, b = rng.choice(moves)
            ops.append((op, b))
            a = a + b if op == "+" else a - b
        else:
            return Problem(start, tuple(ops))


def generate_splits(spec: TaskSpec = TaskSpec()) -> tuple[list[Problem], list[Problem]]:
    """``(train, heldout)``: unique prompts drawn in order from ``random.Random(spec.seed)``.

    Held-out is drawn first, so changing ``num_train`` leaves the held-out set unchanged.
    """
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    drawn: list[Problem] = []
    total = spec.num_heldout + spec.num_train
    for _ in range(100 * total):
        p = sample_problem(rng, spec)
        if p.prompt not in seen:
            seen.add(p.prompt)
            drawn.append(p)
            if len(drawn) == total:
                return drawn[spec.num_heldout :], drawn[: spec.num_heldout]
    raise ValueError(f"TaskSpec asks for {total} unique prompts; the generator found only {len(drawn)}")


def sample_forgotten(problem: Problem, rng: random.Random, p_forget: float) -> tuple[int, ...]:
    """The imperfect demonstrator's slips: each carrying step is forgotten with probability ``p_forget``."""
    return tuple(i for i in problem.carries if rng.random() < p_forget)


def demonstration(problem: Problem, rng: random.Random, p_forget: float) -> str:
    """An imperfect worked solution: ``problem.solution(sample_forgotten(problem, rng, p_forget))``."""
    return problem.solution(sample_forgotten(problem, rng, p_forget))


@dataclass(frozen=True)
class Fork:
    """Where a carrying step's result is first written differently with the carry kept or dropped."""

    index: int  # character index in the solution text
    kept: str  # the character written there when the carry is kept (the right one)
    dropped: str  # the character written there when it is forgotten


def forks(problem: Problem, forgotten: Sequence[int] = ()) -> list[Fork]:
    """One ``Fork`` per carrying step of ``problem.solution(forgotten)``, along that solution's path.

    Before the fork both continuations agree; ``solution`` writes ``dropped`` at steps in ``forgotten``
    and ``kept`` at the others. Every value on every path has two digits, so the fork is always the
    tens digit (``47+5=``: 5 kept, 4 dropped); the search for the first difference does not assume it.
    """
    out, offset = [], 0
    for i, (a, op, b, r) in enumerate(run_chain(problem, forgotten)):
        head = f"{a}{op}{b}="
        if op == "+" and a % 10 + b >= 10:
            kept, dropped = f"{a + b}\n", f"{a + b - 10}\n"
            j = next(j for j, (x, y) in enumerate(zip(kept, dropped)) if x != y)
            out.append(Fork(offset + len(head) + j, kept[j], dropped[j]))
        offset += len(head) + len(str(r)) + 1
    return out


def rows(problems: Sequence[Problem]) -> list[dict[str, str]]:
    return [{"prompt": p.prompt, "answer": p.answer} for p in problems]


def to_jsonl(problems: Sequence[Problem]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows(problems))


def read_split(path: str | Path) -> list[Problem]:
    """Problems of a jsonl split (fields ``prompt``, ``answer``), checking each answer."""
    problems = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        row = json.loads(line)
        p = parse_prompt(row["prompt"])
        if p.answer != row["answer"]:
            raise ValueError(f"{path}:{n}: answer {row['answer']!r} but the prompt gives {p.answer!r}")
        problems.append(p)
    return problems


def write_splits(out_dir: str | Path = DATA_DIR, spec: TaskSpec = TaskSpec()) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = generate_splits(spec)
    paths = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    for path, split in zip(paths, (train, heldout)):
        path.write_text(to_jsonl(split))
    return paths


if __name__ == "__main__":
    for path in write_splits():
        print(path)
