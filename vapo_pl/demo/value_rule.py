"""A value predictor for the demo task that reads the response's visible state: the critic's ceiling.

On the demo task a response fails exactly when it forgets a carry, and a forgotten carry shows at the
token where it is written (the tens digit of a carrying step, ``task.forks``). So the chance of success
from the state ``prompt + response[:t]`` depends on two visible things only:

- whether ``response[:t]`` has already left the correct solution (then the answer is lost: a wrong
  path never comes back to the right number), and
- how many carry forks of the correct solution are still ahead (at or after position ``t``).

``RuleValue.fit`` estimates ``P(success | on track, k forks ahead)`` for every ``k`` from rollouts of a
policy, and ``RuleValue.values`` turns a response into per-token predictions. Tokens are characters
(the demo's tokenizer), with the EOS as one extra token at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from vapo_pl.demo import task


def _track(prompt: str, response: str) -> tuple[int, list[int]]:
    """``(diverge, forks)``: the first index where ``response`` leaves the correct solution (its length if
    it never does) and the character indices of the correct solution's carry forks."""
    problem = task.parse_prompt(prompt)
    gold = problem.solution()
    diverge = next((i for i, (a, b) in enumerate(zip(response, gold)) if a != b), min(len(response), len(gold)))
    if diverge == len(gold) and len(response) > len(gold):
        diverge = len(gold)  # kept writing after the boxed answer
    return diverge, [f.index for f in task.forks(problem)]


class RuleValue:
    """``P(success | visible state)`` from the carry rule; ``table[k]`` for ``k`` carry forks still ahead."""

    def __init__(self, table: Sequence[float]) -> None:
        self.table = list(table)

    @classmethod
    def fit(cls, prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float]) -> RuleValue:
        """``table[k]``: mean score of the responses that reach an on-track state with ``k`` forks ahead (each
        response counted once per ``k``)."""
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for prompt, response, score in zip(prompts, responses, scores):
            diverge, forks = _track(prompt, response)
            # every on-track prefix of this response contributes once per number of forks ahead
            seen = set()
            for t in range(len(response) + 1):
                if t > diverge:
                    break
                k = sum(f >= t for f in forks)
                if k not in seen:
                    seen.add(k)
                    sums[k] = sums.get(k, 0.0) + float(score)
                    counts[k] = counts.get(k, 0) + 1
        top = max(counts, default=0)
        table = []
        for k in range(top + 1):
            table.append(sums[k] / counts[k] if counts.get(k) else (table[-1] if table else 0.0))
        return cls(table)

    def values(self, prompt: str, response: str, num_tokens: int) -> list[float]:
        """Predictions for the states before each of the ``num_tokens`` response tokens (EOS included)."""
        diverge, forks = _track(prompt, response)
        out = []
        for t in range(num_tokens):
            if t > diverge:
                out.append(0.0)
            else:
                k = sum(f >= t for f in forks)
                out.append(self.table[min(k, len(self.table) - 1)])
        return out
