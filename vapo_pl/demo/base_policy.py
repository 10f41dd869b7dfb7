"""The demo's base policy: a tiny Qwen2 taught the task by imitation of an imperfect demonstrator.

``ensure_base_policy()`` returns a directory holding a ``save_pretrained`` Qwen2 and its character
tokenizer, built on first use and cached. The model is trained by next-token cross-entropy on the
response tokens of worked solutions (``task.demonstration``) in which every carry is forgotten with
probability ``p_forget`` (0.6): it learns each step's arithmetic, and learns that the carry is
written only sometimes. So:

- greedy decoding forgets every carry (the wrong digit is the likelier one) and solves only the
  carry-free problems; sampling at temperature 1 solves a one-carry problem about 40% of the time
  and a two-carry one about 16%: held-out accuracy well under 0.4 either way;
- the right answer is within the policy's distribution on every problem, so pass@8 is high and RL
  has a signal to amplify: a reward for the final answer, credited to the few carry tokens.

Cache: the directory is named by a hash of this file, ``task.py``, ``tiny.py``, the ``BaseSpec`` and
the torch/transformers versions, under ``cache_dir`` (default ``$VAPO_PL_CACHE/demo`` if set, else
``<repo>/.cache/demo``). A build goes to a temporary directory renamed into place at the end, so an
interrupted build leaves no half-written model behind, and a finished one is never rebuilt.

``python -m vapo_pl.demo.base_policy`` builds (or finds) the model, prints its path and its held-out
accuracy (greedy, mean@4 sampled at temperature 1, pass@8) graded by the ``math_verify`` reward.
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

import torch

from vapo_pl.demo import task
from vapo_pl.demo.task import Problem, TaskSpec

REPO = Path(__file__).resolve().parents[2]
INFO_FILE = "build_info.json"
BUCKET_BATCHES = 16  # batches drawn at once and grouped by length


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines the base model; part of its cache key."""

    task: TaskSpec = field(default_factory=TaskSpec)  # the problems (train split) it learns from
    p_forget: float = 0.65  # probability that the demonstrator forgets a carry
    hidden_size: int = 64  # with 3 layers, 186 k parameters: learns the task in ~700 steps
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256  # prompt <= 25 tokens, response <= 75 (EOS included)
    steps: int = 800  # optimizer steps of supervised training
    batch_size: int = 32  # sequences per step, each a fresh demonstration of a random train prompt
    lr: float = 3e-3  # AdamW peak learning rate, linear warm-up then cosine decay to lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0  # model initialisation and demonstration sampling

    def __post_init__(self) -> None:
        if not isinstance(self.task, TaskSpec):
            raise ValueError(f"BaseSpec.task must be a TaskSpec, got {type(self.task).__name__}")
        if not 0.0 <= self.p_forget <= 1.0:
            raise ValueError(f"BaseSpec.p_forget must be in [0, 1], got {self.p_forget!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings",
                     "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BaseSpec.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"BaseSpec.lr must be in (0, 1), got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"BaseSpec.warmup_steps must be a non-negative int, got {self.warmup_steps!r}")


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
    cache_dir: str | Path | None = None, spec: BaseSpec | None = None, *, num_threads: int = 2, verbose: bool = False
) -> Path:
    """The base policy's directory (``save_pretrained`` model and tokenizer), built if not cached.

    Args:
        cache_dir: where builds live (default: ``default_cache_dir()``).
        spec: build parameters (default: ``BaseSpec()``, the demo's model).
        num_threads: torch CPU threads while building (not part of the cache key).
        verbose: print the training loss every 100 steps while building.

    Returns:
        ``<cache_dir>/base-<hash>``, loadable by transformers and vLLM; ``build_info.json`` in it
        records the spec and the build time.
    """
    spec = BaseSpec() if spec is None else spec
    if not isinstance(spec, BaseSpec):
        raise ValueError(f"spec must be a BaseSpec, got {type(spec).__name__}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"base-{spec_hash(spec)}"
    if (final / INFO_FILE).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        seconds = build_base_policy(tmp, spec, num_threads=num_threads, verbose=verbose)
        info = {"spec": dataclasses.asdict(spec), "build_seconds": round(seconds, 1)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INFO_FILE).is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_base_policy(path: Path, spec: BaseSpec, *, num_threads: int = 2, verbose: bool = False) -> float:
    """Build the model at ``path`` and train it on demonstrations; returns the seconds taken."""
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
        train_on_demonstrations(model, tokenizer, train, spec, verbose=verbose)
        model.save_pretrained(path)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with the chat template and generation prompt applied (``Q:<prompt>``, newline, ``A:``)."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def encode_demo(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt (chat template applied) + response + EOS, and where the response starts."""
    ids = prompt_ids(tokenizer, prompt)
    return ids + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id], len(ids)


def pad_batch(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)``, both (B, T); labels are -100 outside the responses."""
    t = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), t), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = input_ids[i, start : len(ids)]
    return input_ids, labels


def demo_batches(tokenizer, problems: list[Problem], spec: BaseSpec, rng: random.Random):
    """Endless ``(input_ids, labels)`` batches of fresh demonstrations of random ``problems``.

    Demonstrations are drawn ``BUCKET_BATCHES`` batches at a time, sorted by length, cut into
    batches and shuffled: every demonstration is still used once, with about a quarter less padding.
    """
    while True:
        drawn = rng.choices(problems, k=spec.batch_size * BUCKET_BATCHES)
        encoded = sorted(
            (encode_demo(tokenizer, p.prompt, task.demonstration(p, rng, spec.p_forget)) for p in drawn),
            key=lambda e: len(e[0]),
        )
        chunks = [encoded[i : i + spec.batch_size] for i in range(0, len(encoded), spec.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield pad_batch(chunk, tokenizer.pad_token_id)


def train_on_demonstrations(model, tokenizer, problems: list[Problem], spec: BaseSpec, verbose: bool = False) -> None:
    """AdamW on the token-mean cross-entropy of response tokens (EOS included), fresh demonstrations."""
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms' gains do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.lr * (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    batches = demo_batches(tokenizer, problems, spec, rng)
    for step in range(spec.steps):
        input_ids, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=input_ids.ne(tokenizer.pad_token_id), labels=labels).loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step % 100 == 0 or step == spec.steps - 1):
            print(f"base policy: step {step + 1}/{spec.steps} loss {loss.item():.4f}", flush=True)
    model.eval()


def main() -> None:
    from vapo_pl.demo.evaluate import evaluate_policy

    path = ensure_base_policy(verbose=True)
    print(path)
    print(f"build time {json.loads((path / INFO_FILE).read_text())['build_seconds']} s (when it was built)")
    torch.set_num_threads(2)
    print(json.dumps(evaluate_policy(path), indent=2))


if __name__ == "__main__":
    main()
