"""``ttrl``: Test-Time RL's majority-vote reward for unlabeled prompts (Zuo et al. 2025, arXiv 2504.16084).

For each group (the samples of one prompt) the final answers are extracted as in ``math_verify``
and put to a vote; the winning answer is the pseudo-label and samples that agree with it score 1,
the others (and samples without an answer) 0.

Which answers vote together: first by a normalised string (``extraction.normalize_answer``:
spacing, ``\\left``/``\\right``, ``\\dfrac``, ``$`` removed), then the distinct strings of a group
are merged by math-verify equivalence (greedy: each joins the first earlier cluster it verifies
against), so ``0.5``, ``\\frac{1}{2}`` and ``\\dfrac12`` are one vote. That merge runs in the
verifier processes: each parse or comparison is bounded by ``timeout_s`` (answers involved in one
that runs out stay in clusters of their own), the group's whole merge by ``timeout_s`` x (distinct
answers + 1); past that the group falls back to its string clusters (``ttrl/merge_timeout_frac``).
``equivalence="string"`` skips the merge.

Ties: the cluster whose first member comes earliest in the batch wins, so the result depends only
on the order of the samples, not on hashing or timing.

When gold answers exist (evaluation, or to watch the pseudo-labels) ``ttrl/label_accuracy`` is the
share of labelled groups whose pseudo-label math-verifies against the gold answer; a group with
no answer at all counts as wrong. ``correct`` is the agreement with the pseudo-label (the
training signal), not gold correctness.
"""

from __future__ import annotations

import torch

from vapo_pl.rewards.base import REWARD_FUNCTIONS, RewardInput, RewardOutput
from vapo_pl.rewards.correctness import check_positive_int, check_timeout, grade_answers, percent_flags
from vapo_pl.rewards.extraction import (
    MAX_ANSWER_CHARS,
    MAX_DEPTH,
    TAIL_CHARS,
    extract_answer,
    normalize_answer,
)
from vapo_pl.rewards.verifier import get_pool


def majority_vote(cluster: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Which samples agree with their group's majority cluster.

    Args:
        cluster: (B,) long cluster id per sample, -1 where there is no answer; a cluster lies
            within one group.
        group: (B,) long dense group id in [0, G).

    Returns:
        (B,) bool, True where the sample is in its group's largest cluster (ties: the cluster
        whose first member has the smallest index).
    """
    b = cluster.numel()
    valid = cluster >= 0
    if not bool(valid.any()):
        return torch.zeros(b, dtype=torch.bool)
    cid, pos = cluster[valid], torch.arange(b)[valid]
    n_clusters = int(cid.max()) + 1
    count = torch.bincount(cid, minlength=n_clusters)  # (C,)
    first = torch.full((n_clusters,), b, dtype=torch.long).scatter_reduce(0, cid, pos, "amin")  # (C,)
    cgroup = torch.zeros(n_clusters, dtype=torch.long).scatter(0, cid, group[valid])  # (C,)
    # One integer orders clusters: more votes first, then earlier first appearance.
    key = count * (b + 1) + (b - first)  # (C,)
    n_groups = int(group.max()) + 1
    best = torch.full((n_groups,), -1, dtype=torch.long).scatter_reduce(0, cgroup, key, "amax")  # (G,)
    agree = torch.zeros(b, dtype=torch.bool)
    agree[valid] = key[cid] == best[group[valid]]
    return agree


def _vote_clusters(
    texts: list[str | None],
    members: dict[int, list[int]],
    flags: list[bool],
    *,
    equivalence: str,
    timeout_s: float,
    num_workers: int | None,
) -> tuple[torch.Tensor, int]:
    """(B,) long cluster id per sample (-1 without an answer; ids unique across groups) and the
    number of groups whose math-verify merge ran out of time."""
    # Per group: distinct normalised strings in order of appearance ...
    distinct: dict[int, list[str]] = {}
    normalised: dict[int, str] = {}  # sample -> its normalised answer
    for g, idx in members.items():
        seen: dict[str, None] = {}
        for i in idx:
            if texts[i] is not None:
                normalised[i] = normalize_answer(texts[i]) or texts[i]
                seen.setdefault(normalised[i], None)
        distinct[g] = list(seen)
    # ... then merged by math-verify. One job per group: each parse/verify inside is bounded by
    # timeout_s, the job by timeout_s * (distinct answers + 1); past that the group keeps its strings.
    merged: dict[int, list[int]] = {g: list(range(len(d))) for g, d in distinct.items()}
    to_merge = [g for g, d in distinct.items() if len(d) > 1] if equivalence == "math_verify" else []
    timeouts = 0
    if to_merge:
        bound = timeout_s * (max(len(distinct[g]) for g in to_merge) + 1)
        jobs = [("cluster", [distinct[g], flags[members[g][0]], timeout_s]) for g in to_merge]
        for g, res in zip(to_merge, get_pool(num_workers).run(jobs, timeout_s=bound)):
            if isinstance(res, list):
                merged[g] = res
            else:
                timeouts += 1

    cluster = torch.full((len(texts),), -1, dtype=torch.long)
    offset = 0
    for g, idx in members.items():
        position = {s: k for k, s in enumerate(distinct[g])}
        for i in idx:
            if i in normalised:
                cluster[i] = offset + merged[g][position[normalised[i]]]
        offset += len(distinct[g])
    return cluster, timeouts


@REWARD_FUNCTIONS.register("ttrl")
def ttrl(
    inputs: RewardInput,
    *,
    timeout_s: float = 2.0,
    percent_equivalence: bool = False,
    equivalence: str = "math_verify",
    num_workers: int | None = None,
    tail_chars: int = TAIL_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    max_depth: int = MAX_DEPTH,
) -> RewardOutput:
    """1.0 where the sample's answer agrees with its group's majority answer, else 0.0.

    Args:
        inputs: the batch; ``group_index`` (B,) defines the voting groups; ``answers`` may be None.
        timeout_s: math-verify bound per parse or comparison when merging equivalent answers, and
            per pseudo-label when grading it against gold.
        percent_equivalence: as in ``math_verify``.
        equivalence: "math_verify" (string normalisation, then math-verify merge) or "string".
        num_workers: verifier processes (default: the cores of this process, shared among the node's ranks).
        tail_chars, max_answer_chars, max_depth: extraction bounds (see ``extraction.py``).

    Returns:
        scores (B,) float in {0, 1}; correct (B,) bool (agreement); extracted answers; stats
        ``ttrl/majority_frac`` (mean share of the winning answer per group), ``ttrl/answered_frac``,
        ``ttrl/merge_timeout_frac`` and, when gold answers exist, ``ttrl/label_accuracy``.
    """
    timeout_s = check_timeout(timeout_s)
    if equivalence not in ("math_verify", "string"):
        raise ValueError(f"equivalence must be 'math_verify' or 'string', got {equivalence!r}")
    for name, value in (
        ("tail_chars", tail_chars),
        ("max_answer_chars", max_answer_chars),
        ("max_depth", max_depth),
    ):
        check_positive_int(name, value)
    b = len(inputs)
    if b == 0:
        return RewardOutput(scores=torch.zeros(0), correct=torch.zeros(0, dtype=torch.bool), extracted=[])
    texts = [
        e.text if e is not None else None
        for e in (
            extract_answer(r, tail_chars=tail_chars, max_answer_chars=max_answer_chars, max_depth=max_depth)
            for r in inputs.responses
        )
    ]
    _, group = torch.unique(inputs.group_index, return_inverse=True)  # (B,) dense ids in [0, G)
    flags = percent_flags(inputs, percent_equivalence)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(i)

    cluster, merge_timeouts = _vote_clusters(
        texts, members, flags, equivalence=equivalence, timeout_s=timeout_s, num_workers=num_workers
    )
    agree = majority_vote(cluster, group)  # (B,)
    n_groups = len(members)
    group_size = torch.bincount(group, minlength=n_groups)  # (G,)
    winners = torch.zeros(n_groups).scatter_add(0, group, agree.float())  # (G,)
    stats = {
        "ttrl/answered_frac": float((cluster >= 0).float().mean()),
        "ttrl/majority_frac": float((winners / group_size).mean()),
        "ttrl/merge_timeout_frac": merge_timeouts / n_groups,
    }
    # Pseudo-label per group: the answer text of the majority cluster's first member.
    labelled = [g for g, idx in members.items() if isinstance(inputs.answers[idx[0]], str)]
    if labelled:
        labels = {g: next((texts[i] for i in members[g] if agree[i]), None) for g in labelled}
        gradable = [g for g in labelled if labels[g] is not None]
        graded = grade_answers(
            [(labels[g], inputs.answers[members[g][0]].strip(), flags[members[g][0]]) for g in gradable],
            timeout_s=timeout_s,
            num_workers=num_workers,
        )
        stats["ttrl/label_accuracy"] = sum(r is True for r in graded) / len(labelled)
    return RewardOutput(scores=agree.to(torch.float32), correct=agree, extracted=texts, stats=stats)
