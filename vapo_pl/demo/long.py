"""The second embedded task, built to need credit assignment: the demo's carry chains, made long.

Same problems, solutions, base-policy recipe and grading as the demo (``task``, ``base_policy``), with
these parameters:

- 1 to 15 steps per problem, so responses run from 18 to 130 tokens (7x; the demo's 1-8 steps give
  18-74). The generator's rule that no move occurs twice (the lookup of the next move is by content)
  and the fixed decade of every value cap a problem at 15 steps with 3 carries.
- 1 to 3 carries per problem (weights 0.3 / 0.4 / 0.3), all among the first three steps
  (``carry_window=3``): the decisions come early and a long, exact computation follows, as when a
  solution's approach is settled in its first lines. Each carry is one decision at one token; a
  response is right only if every carry is kept.
- The base policy forgets a carry with probability 0.6 and is trained for 2,400 steps (the demo's
  1,200 left it misreading the next move in long chains about once in three responses). It solves about
  a fifth of the held-out problems (0.4, 0.16 and 0.064 of the 1-, 2- and 3-carry ones if it made no
  other slip).

A forgotten carry is visible where it is written (``47+5=42``) and the response can never recover, so
the value of every later state is 0: a critic that reads that has a per-token signal that a group
baseline (GRPO) does not, and a response with one kept and one dropped carry gets opposite credit at
the two forks instead of one shared sequence-level advantage. With the decisions early, most of a
response's tokens come after its outcome is settled: the carry rule (``value_rule``) explains 0.73 of
the return variance over all tokens of the base policy's rollouts (0.47 when carries fell anywhere).

``python -m vapo_pl.demo.prepare --task long`` builds the base policy (``.cache/demo/base-long``);
``configs/demo_long.yaml`` trains it.
"""

from __future__ import annotations

from vapo_pl.demo.base_policy import BaseSpec
from vapo_pl.demo.task import DATA_DIR, TaskSpec

TASK = TaskSpec(seed=4321, num_train=2000, num_heldout=200, min_steps=1, max_steps=15,
                carry_weights=(0.0, 0.3, 0.4, 0.3), carry_window=3)
BASE = BaseSpec(task=TASK, p_forget=0.6, max_position_embeddings=256, steps=2400)
TRAIN_FILE = DATA_DIR / "long_train.jsonl"
HELDOUT_FILE = DATA_DIR / "long_heldout.jsonl"


def write_splits() -> None:
    from vapo_pl.demo import task

    train, heldout = task.generate_splits(TASK)
    TRAIN_FILE.write_text(task.to_jsonl(train))
    HELDOUT_FILE.write_text(task.to_jsonl(heldout))


if __name__ == "__main__":
    write_splits()
    print(TRAIN_FILE, HELDOUT_FILE)
