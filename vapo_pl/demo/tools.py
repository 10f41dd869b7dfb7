"""The multi-turn demo: the demo's carry chains, with a calculator the policy may call.

The problems, splits and grading are the demo's (``task``). An episode is either

- one turn that computes in the text, exactly as in the demo (``47+5=52`` ... ``\\boxed{57}``), where each carry is
  forgotten with probability ``p_forget``; or
- a tool call, ``<calc>47+5-3+8</calc>``, answered by the sandboxed calculator (``ToolEnvironment(tag="calc")``)
  with ``<tool_response>57</tool_response>`` in the template's tool-response form, then a second turn that writes
  ``\\boxed{57}``.

The base policy imitates a demonstrator that calls the tool with probability ``p_tool`` (0.2) and otherwise works in
the text and slips. Its first response token is that decision (``<`` or the first digit), taken as a soft target
like the carry forks (``base_policy.demo_loss``); the observation's tokens are context only (no loss), as in RL. So
the base policy calls the tool about a fifth of the time and is right about half the time; RL can raise accuracy by
keeping carries, by calling the tool, or both, and the demo prints held-out accuracy and tool-call rate base -> final.

``python -m vapo_pl.demo.prepare --task tools`` builds it (``.cache/demo/base-tools``); ``configs/demo_tools.yaml``
(``make demo-tools``) trains it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from vapo_pl.demo import base_policy, task
from vapo_pl.demo.base_policy import INFO_FILE, BaseSpec, default_cache_dir
from vapo_pl.demo.task import Problem

TAG = "calc"
BUILD_THREADS = 2  # torch threads while building: 0.10 s a step against 0.13 s with one (bucketed batches, 2 cores)


@dataclass(frozen=True)
class ToolSpec:
    """The tool demo's base policy: the demo's model and schedule, plus the demonstrator's tool-use rate."""

    base: BaseSpec = field(default_factory=BaseSpec)
    p_tool: float = 0.2  # probability that the demonstrator calls the calculator

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_tool <= 1.0:
            raise ValueError(f"ToolSpec.p_tool must be in [0, 1], got {self.p_tool!r}")


def expression(problem: Problem) -> str:
    return problem.prompt[: -len("=?")]


class Demo(NamedTuple):
    ids: list[int]  # prompt + turns + observation
    labels: list[int]  # the token to learn at each position (-100: prompt, observation, soft forks)
    forks: list[tuple[int, int, int, float]]  # (position, kept token, dropped token, probability of kept)


def encode(tokenizer, problem: Problem, use_tool: bool, forgotten: tuple[int, ...], spec: ToolSpec,
           memo: _Encoder | None = None) -> Demo:
    """One demonstration as token ids: the tool path (call, observation, answer) or the text path; the decision at
    the first response token and the carry forks of the text path are soft targets. ``memo`` reuses rendered
    prompts and observations (the ids are the same)."""
    from vapo_pl.envs.tools import tool_response_text

    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    ids = memo.prompt(tokenizer, problem.prompt) if memo else base_policy.prompt_ids(tokenizer, problem.prompt)
    labels = [-100] * len(ids)
    start = len(ids)
    solution = problem.solution(forgotten)
    first_tool, first_text = enc("<")[0], enc(solution[0])[0]
    if use_tool:
        call = enc(f"<{TAG}>{expression(problem)}</{TAG}>") + [eos]
        obs = memo.observation(problem.answer) if memo else enc(tool_response_text(tokenizer, problem.answer))
        answer = enc(f"\\boxed{{{problem.answer}}}") + [eos]
        ids += call + obs + answer
        labels += call + [-100] * len(obs) + answer
        forks = []
    else:
        text = enc(solution) + [eos]
        ids += text
        labels += text
        forks = [(start + f.index, enc(f.kept)[0], enc(f.dropped)[0], 1 - spec.base.p_forget)
                 for f in task.forks(problem, forgotten)]
    forks.insert(0, (start, first_tool, first_text, spec.p_tool))
    for pos, *_ in forks:
        labels[pos] = -100
    return Demo(ids, labels, forks)


def batch_loss(model, tokenizer, demos: list[Demo]) -> Tensor:
    """Token-mean cross-entropy on the policy's tokens, with the soft targets at the forks."""
    pad = tokenizer.pad_token_id
    t = max(len(d.ids) for d in demos)
    ids = torch.full((len(demos), t), pad, dtype=torch.long)
    labels = torch.full((len(demos), t), -100, dtype=torch.long)
    rows, cols, kept, dropped, p_kept = [], [], [], [], []
    for i, d in enumerate(demos):
        ids[i, : len(d.ids)] = torch.tensor(d.ids)
        labels[i, : len(d.labels)] = torch.tensor(d.labels)
        for pos, k, dr, p in d.forks:
            rows.append(i)
            cols.append(pos)
            kept.append(k)
            dropped.append(dr)
            p_kept.append(p)
    logits = model(input_ids=ids, attention_mask=ids.ne(pad)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets.ne(-100)
    hard = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    at = logp[torch.tensor(rows), torch.tensor(cols) - 1]
    pk = torch.tensor(p_kept)
    soft = -(pk * at.gather(1, torch.tensor(kept)[:, None]).squeeze(1)
             + (1 - pk) * at.gather(1, torch.tensor(dropped)[:, None]).squeeze(1))
    return (hard.sum() + soft.sum()) / (mask.sum() + len(rows))


class _Encoder:
    """``encode`` with the chat-template renders (prompt ids per problem, observation ids per answer) memoised:
    they are the same every time a problem is drawn, and rendering them is most of an encode's cost."""

    def __init__(self, tokenizer, spec: ToolSpec) -> None:
        self.tokenizer, self.spec = tokenizer, spec
        self._prompts: dict[str, list[int]] = {}
        self._observations: dict[str, list[int]] = {}

    def __call__(self, problem: Problem, use_tool: bool, forgotten: tuple[int, ...]) -> Demo:
        return encode(self.tokenizer, problem, use_tool, forgotten, self.spec, memo=self)

    def prompt(self, tokenizer, prompt: str) -> list[int]:
        if prompt not in self._prompts:
            self._prompts[prompt] = base_policy.prompt_ids(tokenizer, prompt)
        return list(self._prompts[prompt])

    def observation(self, answer: str) -> list[int]:
        from vapo_pl.envs.tools import tool_response_text

        if answer not in self._observations:
            text = tool_response_text(self.tokenizer, answer)
            self._observations[answer] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._observations[answer]


def demo_batches(tokenizer, problems: list[Problem], spec: ToolSpec, rng: random.Random):
    """Endless lists of ``batch_size`` fresh demonstrations, drawn ``BUCKET_BATCHES`` batches at a time, sorted by
    length, cut into batches and shuffled, as the demo's base policy does (``base_policy.demo_batches``): every
    demonstration is still used once, with much less padding (tool and text paths differ in length by up to 3x)."""
    b = spec.base
    encoder = _Encoder(tokenizer, spec)
    while True:
        demos = []
        for p in rng.choices(problems, k=b.batch_size * base_policy.BUCKET_BATCHES):
            use_tool = rng.random() < spec.p_tool
            demos.append(encoder(p, use_tool, task.sample_forgotten(p, rng, b.p_forget)))
        demos.sort(key=lambda d: len(d.ids))
        chunks = [demos[i : i + b.batch_size] for i in range(0, len(demos), b.batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def train(model, tokenizer, problems: list[Problem], spec: ToolSpec, verbose: bool = False) -> dict[str, float]:
    """AdamW on ``batch_loss`` of fresh demonstrations (``demo_batches``), with the demo's schedule
    (``base_policy.lr_at``)."""
    b = spec.base
    rng = random.Random(b.seed)
    torch.manual_seed(b.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": b.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=b.lr, betas=(0.9, 0.98))
    model.train()
    loss = torch.tensor(math.nan)
    batches = demo_batches(tokenizer, problems, spec, rng)
    for step in range(b.steps):
        for group in opt.param_groups:
            group["lr"] = base_policy.lr_at(step, b)
        loss = batch_loss(model, tokenizer, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step + 1) % 200 == 0:
            print(f"tool base policy: step {step + 1}/{b.steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    return {"steps": b.steps, "final_loss": round(loss.item(), 5)}


def spec_hash(spec: ToolSpec) -> str:
    import transformers

    from vapo_pl import tiny
    from vapo_pl.envs import tools as env_tools

    h = hashlib.sha256()
    for module in (task, tiny, base_policy, env_tools, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(f"torch={torch.__version__} transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def ensure_tool_policy(cache_dir: str | Path | None = None, spec: ToolSpec | None = None,
                       verbose: bool = False) -> Path:
    """The tool demo's base policy directory, built on first use and cached as ``base_policy`` does (a temporary
    directory renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vapo_pl.tiny import build_tiny_model

    spec = spec or ToolSpec()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"tools-{spec_hash(spec)}"
    if (final / INFO_FILE).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        t0 = time.perf_counter()
        b = spec.base
        build_tiny_model(tmp, hidden_size=b.hidden_size, num_layers=b.num_layers, num_heads=b.num_heads,
                         num_kv_heads=b.num_kv_heads, max_position_embeddings=b.max_position_embeddings, seed=b.seed)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        problems, _ = task.generate_splits(b.task)
        stats = train(model, tokenizer, problems, spec, verbose=verbose)
        model.save_pretrained(tmp)
        info = {"spec": dataclasses.asdict(spec), "build_seconds": round(time.perf_counter() - t0, 1), **stats}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INFO_FILE).is_file():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return final
