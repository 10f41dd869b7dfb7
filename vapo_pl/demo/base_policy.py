"""The demo's base policy: a tiny Qwen2 taught the task by imitation of an imperfect demonstrator.

``ensure_base_policy()`` returns a directory holding a ``save_pretrained`` Qwen2 (3 layers, hidden
64, 2 heads of 32, 210 k parameters) and its character tokenizer, built on first use and cached.
It is trained by next-token cross-entropy on worked solutions of the training prompts in which
each carry is forgotten with probability ``p_forget`` = 0.65 (``task.sample_forgotten``): it learns
every step's arithmetic and the lookup of the next move, and that a carry is written a third of
the time. So:

- greedy decoding drops every carry and solves only the carry-free problems (5%);
- sampling at temperature 1 solves a one-carry problem about 35% of the time and a two-carry one
  about 12%: held-out mean accuracy about 0.35;
- the right answer is in the policy's distribution everywhere (pass@8 about 0.9), and what RL has
  to learn is one decision per carry, at one token, in solutions 18 to 74 tokens long.

Measured on the default build (seed 0): greedy 0.035, mean@4 0.356, mean@8 0.343, pass@8 0.885
(seed 1: 0.05, 0.364, 0.364, 0.925).

Departure from plain imitation: at each carry fork the loss takes the demonstrator's distribution
(0.35 kept, 0.65 dropped) as a soft target instead of the digit the sampled demonstration wrote
(``demo_loss``). Same expected gradient, no sampling noise; with hard targets the carry
probability of the trained model drifted between 0.12 and 0.48 across tens digits.

Cache: the directory is named by a hash of this file, ``task.py``, ``tiny.py``, the ``BaseSpec`` and
the torch/transformers versions, under ``cache_dir`` (default ``$VAPO_PL_CACHE/demo`` if set, else
``<repo>/.cache/demo``). A build goes to a temporary directory renamed into place at the end, so an
interrupted build leaves no half-written model behind, and a finished one is never rebuilt.

``python -m vapo_pl.demo.base_policy`` builds (or finds) the model, prints its path and its held-out
accuracy (greedy, mean@4 and mean@8 at temperature 1, pass@8) graded by the ``math_verify`` reward.
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

from vapo_pl.demo import task
from vapo_pl.demo.task import Problem, TaskSpec

REPO = Path(__file__).resolve().parents[2]
INFO_FILE = "build_info.json"
BUCKET_BATCHES = 16  # batches drawn at once and grouped by length


# Head sizes vLLM 0.32's CPU attention backend accepts (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model; part of its cache key."""

    task: TaskSpec = field(default_factory=TaskSpec)  # the problems (train split) it learns from
    p_forget: float = 0.65  # probability that the demonstrator forgets a carry
    hidden_size: int = 64  # 3 layers of 64: 210 k parameters; 2 layers learn the lookups too slowly
    num_layers: int = 3
    num_heads: int = 2  # head size 32: vLLM's CPU attention supports only VLLM_CPU_HEAD_SIZES
    num_kv_heads: int = 2
    max_position_embeddings: int = 256  # prompt <= 25 tokens, response <= 75 (EOS included)
    batch_size: int = 32  # sequences per step, each a fresh demonstration of a random train prompt
    steps: int = 1200  # optimizer steps; the lookup of the next move clicks at 500-900 (seed, data)
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr / 10
    check_size: int = 128  # demonstrations whose NLL off the forks is recorded in build_info.json
    weight_decay: float = 0.01
    seed: int = 0  # model initialisation and demonstration sampling

    def __post_init__(self) -> None:
        if not isinstance(self.task, TaskSpec):
            got = type(self.task).__name__
            raise ValueError(f"BaseSpec.task must be a TaskSpec, got {got}")  # noqa: TRY004
        if not 0.0 <= self.p_forget <= 1.0:
            raise ValueError(f"BaseSpec.p_forget must be in [0, 1], got {self.p_forget!r}")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
            "batch_size",
            "steps",
            "check_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BaseSpec.{name} must be a positive int, got {value!r}")
        head = self.hidden_size // self.num_heads
        if self.hidden_size % self.num_heads or head not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"BaseSpec.num_heads: head size {self.hidden_size} / {self.num_heads} "
                f"is not one of {VLLM_CPU_HEAD_SIZES}, the sizes vLLM's CPU attention supports"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"BaseSpec.num_kv_heads must divide num_heads, got {self.num_kv_heads!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"BaseSpec.lr must be in (0, 1), got {self.lr!r}")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= self.steps:
            raise ValueError(f"BaseSpec.warmup_steps must be an int in [0, steps], got {w!r}")


def default_cache_dir() -> Path:
    root = os.environ.get("VAPO_PL_CACHE")
    return Path(root) / "demo" if root else REPO / ".cache" / "demo"


def spec_hash(spec: BaseSpec) -> str:
    """16 hex digits naming the build: the code that makes it, its parameters, the library versions."""
    import transformers

    from vapo_pl import tiny

    h = hashlib.sha256()
    for module in (task, tiny, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(f"torch={torch.__version__} transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def ensure_base_policy(
    cache_dir: str | Path | None = None,
    spec: BaseSpec | None = None,
    *,
    num_threads: int = 1,
    verbose: bool = False,
) -> Path:
    """The base policy's directory (``save_pretrained`` model and tokenizer), built if not cached.

    Args:
        cache_dir: where builds live (default: ``default_cache_dir()``).
        spec: build parameters (default: ``BaseSpec()``, the demo's model).
        num_threads: torch CPU threads while building (not part of the cache key). One is fastest
            for a model this small: two threads took 2.2x longer per step on an idle 2-core machine.
        verbose: print the training loss every 100 steps while building.

    Returns:
        ``<cache_dir>/base-<hash>``, loadable by transformers and vLLM; ``build_info.json`` in it
        records the spec, the build time, the steps trained and the final check NLL.
    """
    spec = BaseSpec() if spec is None else spec
    if not isinstance(spec, BaseSpec):
        raise ValueError(f"spec must be a BaseSpec, got {type(spec).__name__}")  # noqa: TRY004
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"base-{spec_hash(spec)}"
    if (final / INFO_FILE).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        stats = build_base_policy(tmp, spec, num_threads=num_threads, verbose=verbose)
        info = {"spec": dataclasses.asdict(spec), **stats}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INFO_FILE).is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_base_policy(path: Path, spec: BaseSpec, *, num_threads: int = 1, verbose: bool = False) -> dict:
    """Build the model at ``path`` and train it on demonstrations; returns what to record about it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vapo_pl.tiny import build_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        t0 = time.perf_counter()
        build_tiny_model(
            path,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            seed=spec.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        train, _ = task.generate_splits(spec.task)
        stats = train_on_demonstrations(model, tokenizer, train, spec, verbose=verbose)
        model.save_pretrained(path)
        return {"build_seconds": round(time.perf_counter() - t0, 1), **stats}
    finally:
        torch.set_num_threads(threads)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of ``prompt`` in the chat template with the generation prompt (``Q:``, it, newline, ``A:``)."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def encode_demo(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt (chat template applied) + response + EOS, and where the response starts."""
    ids = prompt_ids(tokenizer, prompt)
    return ids + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id], len(ids)


class DemoBatch(NamedTuple):
    """Demonstrations for one supervised step: ``B`` sequences, ``F`` carry forks among them."""

    input_ids: Tensor  # (B, T) long, right-padded prompt + response + EOS
    labels: Tensor  # (B, T) long, the token to learn at each position; -100 on prompt, padding and forks
    fork_rows: Tensor  # (F,) long, sequence of each fork
    fork_cols: Tensor  # (F,) long, token position of each fork
    fork_kept: Tensor  # (F,) long, token id written when the carry is kept
    fork_dropped: Tensor  # (F,) long, token id written when the carry is forgotten


def collate(tokenizer, encoded: list[tuple[list[int], int, list[task.Fork]]]) -> DemoBatch:
    """``DemoBatch`` of ``(ids, response_start, forks)`` triples (from ``encode_demo`` and ``task.forks``)."""
    pad = tokenizer.pad_token_id
    t = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(encoded), t), pad, dtype=torch.long)
    labels = torch.full((len(encoded), t), -100, dtype=torch.long)
    rows, cols, kept, dropped = [], [], [], []
    for i, (ids, start, forks) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = input_ids[i, start : len(ids)]
        for f in forks:  # one token per character, so a fork's character index maps to one token
            rows.append(i)
            cols.append(start + f.index)
            kept.append(tokenizer(f.kept, add_special_tokens=False).input_ids[0])
            dropped.append(tokenizer(f.dropped, add_special_tokens=False).input_ids[0])
    labels[rows, cols] = -100
    forks = (torch.tensor(xs, dtype=torch.long) for xs in (rows, cols, kept, dropped))
    return DemoBatch(input_ids, labels, *forks)


def demo_batches(tokenizer, problems: list[Problem], spec: BaseSpec, rng: random.Random):
    """Endless ``DemoBatch``es of fresh demonstrations of random ``problems``.

    Demonstrations are drawn ``BUCKET_BATCHES`` batches at a time, sorted by length, cut into
    batches and shuffled: every demonstration is still used once, with about a quarter less padding.
    """
    while True:
        encoded = []
        for p in rng.choices(problems, k=spec.batch_size * BUCKET_BATCHES):
            forgotten = task.sample_forgotten(p, rng, spec.p_forget)
            encoded.append(
                (*encode_demo(tokenizer, p.prompt, p.solution(forgotten)), task.forks(p, forgotten))
            )
        encoded.sort(key=lambda e: len(e[0]))
        chunks = [encoded[i : i + spec.batch_size] for i in range(0, len(encoded), spec.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(tokenizer, chunk)


def demo_loss(logits: Tensor, batch: DemoBatch, p_forget: float) -> Tensor:
    """Token-mean cross-entropy over the response tokens (EOS included).

    At a carry fork the target is the demonstrator's distribution (``1 - p_forget`` on the kept
    digit, ``p_forget`` on the dropped one) instead of the digit it happened to write: the same
    expected gradient without the sampling noise, so the model's carry probability settles at
    ``1 - p_forget`` in every context rather than drifting per digit (measured: 0.12-0.48 across
    tens digits with sampled targets). The rest of each sequence follows the sampled path.

    Args:
        logits: (B, T, V) next-token logits at each position of ``batch.input_ids``.
        batch: the demonstrations.
        p_forget: the demonstrator's probability of dropping a carry.
    """
    logp = torch.log_softmax(
        logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
    )  # (B, T-1, V)
    targets = batch.labels[:, 1:]  # (B, T-1)
    mask = targets.ne(-100)
    hard = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
    at_fork = logp[batch.fork_rows, batch.fork_cols - 1]  # (F, V)
    soft = -(
        (1 - p_forget) * at_fork.gather(1, batch.fork_kept[:, None])
        + p_forget * at_fork.gather(1, batch.fork_dropped[:, None])
    )  # (F, 1)
    return (hard.sum() + soft.sum()) / (mask.sum() + len(batch.fork_rows))


def lr_at(step: int, spec: BaseSpec) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine decay to lr / 10."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def check_nll(model, batch: DemoBatch, pad_id: int) -> float:
    """Mean NLL per response token off the forks: what is left to learn besides the carry choice."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.input_ids.ne(pad_id)).logits
    model.train()
    no_forks = batch._replace(**{f: batch.fork_rows[:0] for f in DemoBatch._fields[2:]})
    return demo_loss(logits, no_forks, 0.0).item()


def train_on_demonstrations(
    model, tokenizer, problems: list[Problem], spec: BaseSpec, verbose: bool = False
) -> dict[str, float]:
    """AdamW on ``demo_loss`` of fresh demonstrations of ``problems`` for ``spec.steps`` steps.

    Returns ``{"steps": ..., "check_nll": ...}``: the NLL off the forks of a fixed batch of
    ``check_size`` demonstrations after training (about 0.001-0.003 when the arithmetic is learned,
    0.01 or more when the lookup of the next move has not finished clicking).
    """
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    pad = tokenizer.pad_token_id
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms' gains do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    batches = demo_batches(tokenizer, problems, spec, rng)
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        batch = next(batches)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.input_ids.ne(pad)).logits
        loss = demo_loss(logits, batch, spec.p_forget)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step + 1) % 100 == 0:
            print(f"base policy: step {step + 1}/{spec.steps} loss {loss.item():.4f}", flush=True)
    check_rng = random.Random(spec.seed + 1)
    check = collate(
        tokenizer,
        [
            (*encode_demo(tokenizer, p.prompt, p.solution(f)), task.forks(p, f))
            for p in check_rng.choices(problems, k=spec.check_size)
            for f in [task.sample_forgotten(p, check_rng, spec.p_forget)]
        ],
    )
    nll = check_nll(model, check, pad)
    if verbose:
        print(f"base policy: trained {spec.steps} steps, check nll {nll:.4f}", flush=True)
    model.eval()
    return {"steps": spec.steps, "check_nll": round(nll, 5)}


def main() -> None:
    from vapo_pl.demo.evaluate import evaluate_policy

    path = ensure_base_policy(verbose=True)
    print(path)
    info = json.loads((path / INFO_FILE).read_text())
    print(f"built in {info['build_seconds']} s, {info['steps']} steps, check nll {info['check_nll']}")
    torch.set_num_threads(1)
    print(json.dumps(evaluate_policy(path), indent=2))


if __name__ == "__main__":
    main()
