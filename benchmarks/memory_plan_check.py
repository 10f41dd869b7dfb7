"""``vapo-pl plan`` against measurement on CPU: each term of the plan next to what the real code allocates.

    python benchmarks/memory_plan_check.py                 # the demo model and a medium tiny model, fp32
    python benchmarks/memory_plan_check.py --bf16          # also bf16 layers (FSDP2's MixedPrecisionPolicy), autocast
    python benchmarks/memory_plan_check.py --kv            # also the KV cache vLLM's CPU engine builds
    python benchmarks/memory_plan_check.py --json out.json

Each case is ``configs/demo.yaml`` through the ``vapo-pl`` parser (with overrides), planned by ``vapo_pl.memory_plan``
for one rank, then measured on the real models:

- weights, gradients and optimizer state: the bytes of the actor's and critic's parameters, of their gradients after
  a backward, and of AdamW's state after one step (``vapo_pl.update.make_optimizer``, the trainer's optimizer);
- activations: the unique storages autograd saves (``torch.autograd.graph.saved_tensors_hooks``; parameters, and
  autocast's bf16 copies of them, counted as a term of their own, left out) during a training forward of
  ``vapo_pl.forward.policy_logprobs`` and ``critic_values`` on one micro-batch of full-length sequences. With
  gradient checkpointing the checkpoints keep their inputs instead (captured by wrapping
  the checkpoint functions) and backward recomputes one layer at a time: "with checkpointing" is what the forward
  keeps plus the largest layer of the run without checkpointing (its storages attributed to the layer that first
  saved them);
- logits: the largest logits-shaped tensor allocated while the output head runs (a TorchDispatchMode between the
  head's forward hooks);
- KV cache (``--kv``): tokens vLLM's CPU engine fits into ``VLLM_CPU_KVCACHE_SPACE`` (blocks x block size).

Acceptance: every term within 25% of the measurement (exit status 1 otherwise). ``tests/test_memory_plan.py`` runs a
small case of the same functions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25


@dataclass
class Row:
    case: str
    term: str
    plan: float
    measured: float

    @property
    def ratio(self) -> float:
        return self.plan / self.measured if self.measured else float("inf")

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1) <= TOLERANCE


def build_model(path: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                max_positions: int = 1024, seed: int = 0) -> Path:
    """A random Qwen2 of the given size with the tiny character tokenizer (its vocabulary is the first ~100 ids of a
    larger embedding; the rest is never sampled, which memory does not care about)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vapo_pl.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      torch_dtype="float32")
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plan_for(args: list[str]):
    """(Setup, Plan) of ``vapo-pl plan <args>`` for one rank, 80 GiB."""
    from vapo_pl.cli import build_parser
    from vapo_pl.memory_plan import GiB, make_plan, setup_from_config

    setup = setup_from_config(build_parser().parse_args(["fit", *args]).fit)
    return setup, make_plan(setup, 80 * GiB)


def full_batch(setup, vocab: int, seed: int = 0):
    """A micro-batch of full-length sequences (every prompt and response at its maximum length), except that with
    several sequences the last response is one token short: its row is padded, as rows of a real batch are, so
    transformers builds the dense attention mask a real micro-batch gets."""
    from vapo_pl.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    b, p, t = setup.micro_batch, setup.prompt_len, setup.response_len
    ids = torch.randint(2, vocab, (b, p + t), generator=g)
    attention = torch.ones(b, p + t, dtype=torch.long)
    response = torch.ones(b, t, dtype=torch.bool)
    lengths = torch.full((b,), t)
    if b > 1:
        attention[-1, -1], response[-1, -1], lengths[-1] = 0, False, t - 1
        ids[-1, -1] = 0
    zeros = torch.zeros(b)
    return RolloutBatch(input_ids=ids, attention_mask=attention, response_mask=response,
                        rollout_logprobs=torch.zeros(b, t), scores=zeros, correct=zeros.bool(), lengths=lengths,
                        truncated=zeros.bool(), group_index=torch.arange(b), weight_version=0)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest logits-shaped tensor (last dimension ``vocab``) any op allocates while active (views and in-place
    results of an input do not count)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


class SavedBytes:
    """Unique storages saved for backward (parameters excluded), attributed to the decoder layer running when each was
    first saved; with checkpointing, also the tensors the checkpoints keep for their recompute."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], autocast: bool = False) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.layers = layers
        self.seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, layer index or -1)
        self.casts: dict[int, int] = {}  # autocast's bf16 copies of weights that autograd saved: storage -> bytes
        self.current = -1
        self.bf16_weights: dict[tuple, list[torch.Tensor]] = {}
        if autocast:
            for layer in layers:
                for w in layer.parameters():
                    if w.dim() == 2:
                        self.bf16_weights.setdefault(tuple(w.shape), []).append(w.detach().to(torch.bfloat16))

    def _is_cast(self, t: torch.Tensor) -> bool:
        """A bf16 copy of a weight (linear layers save it transposed)."""
        if t.dtype != torch.bfloat16 or t.dim() != 2:
            return False
        return any(torch.equal(t, w) for w in self.bf16_weights.get(tuple(t.shape), ())) or \
            any(torch.equal(t.t(), w) for w in self.bf16_weights.get(tuple(t.shape[::-1]), ()))

    def _add(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() in self.params or s.data_ptr() in self.seen or s.data_ptr() in self.casts:
                return
            if self.bf16_weights and self._is_cast(t):
                self.casts[s.data_ptr()] = s.nbytes()
            else:
                self.seen[s.data_ptr()] = (s.nbytes(), self.current)

    def _walk(self, x) -> None:
        if isinstance(x, torch.Tensor):
            self._add(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                self._walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                self._walk(y)
        elif isinstance(x, functools.partial):
            self._walk(x.args)
            self._walk(x.keywords)

    def _wrap_checkpoint(self, fn):
        def wrapped(function, *args, **kwargs):
            self._walk(function)
            self._walk(args)
            self._walk(kwargs)
            return fn(function, *args, **kwargs)

        return wrapped

    @contextmanager
    def recording(self):
        import torch.utils.checkpoint as ckpt

        def pack(t):
            self._add(t)
            return t

        hooks = []
        for k, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, k=k: setattr(self, "current", k)))
            hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "current", -1)))
            if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                layer._gradient_checkpointing_func = self._wrap_checkpoint(layer._gradient_checkpointing_func)
        original = ckpt.checkpoint
        ckpt.checkpoint = self._wrap_checkpoint(original)  # the chunked output head calls it by attribute
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield self
        finally:
            ckpt.checkpoint = original
            for h in hooks:
                h.remove()

    @property
    def total(self) -> int:
        return sum(b for b, _ in self.seen.values())

    @property
    def largest_layer(self) -> int:
        per = [0] * len(self.layers)
        for b, k in self.seen.values():
            if k >= 0:
                per[k] += b
        return max(per) if per else 0


@contextmanager
def largest_head_output(model: torch.nn.Module):
    """The largest logits tensor produced while ``model``'s output head runs (a dict filled on exit)."""
    result = {"bytes": 0}
    head = model.get_output_embeddings()
    mode = _LargestOutput(head.out_features)

    def pre(m, a):
        mode.__enter__()

    def post(m, a, o):
        mode.__exit__(None, None, None)
        result["bytes"] = max(result["bytes"], mode.largest)

    h1, h2 = head.register_forward_pre_hook(pre), head.register_forward_hook(post)
    try:
        yield result
    finally:
        h1.remove()
        h2.remove()


def _layers(model) -> list[torch.nn.Module]:
    from vapo_pl.parallel import _decoder_layers

    return _decoder_layers(model)


def _bf16_layers(model: torch.nn.Module) -> None:
    """FSDP2's MixedPrecisionPolicy as ``vapo_pl.parallel.fully_shard_model`` applies it, without a process group:
    the decoder layers hold bf16 weights and cast their floating-point inputs to bf16; the root (embeddings, final
    norm, head) stays fp32."""
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(torch.bfloat16)
        if isinstance(x, (tuple, list)):
            return type(x)(cast(y) for y in x)
        return x

    for layer in _layers(model):
        layer.to(torch.bfloat16)
        layer.register_forward_pre_hook(lambda m, args, kwargs: (cast(args), {k: cast(v) for k, v in kwargs.items()}),
                                        with_kwargs=True)


def load_models(model_dir: Path, regime: str = "fp32"):
    from transformers import AutoModelForCausalLM

    from vapo_pl.critic import ValueModel
    from vapo_pl.forward import keep_output_head_in_fp32

    actor = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
    keep_output_head_in_fp32(actor)
    critic = ValueModel.from_pretrained(str(model_dir), torch_dtype=torch.float32).train()
    if regime == "bf16":
        _bf16_layers(actor)
        _bf16_layers(critic)
    return actor, critic


def measure_activations(setup, model_dir: Path, regime: str) -> dict[str, float]:
    """Saved bytes of the actor's and critic's training forward, without and with checkpointing, and the largest
    logits tensor, for one micro-batch of full-length sequences."""
    from vapo_pl import forward

    out: dict[str, float] = {}
    row_tokens = setup.pack_row_tokens if setup.packing else None
    for gc in (False, True):
        actor, critic = load_models(model_dir, regime)
        vocab = actor.config.vocab_size
        batch = full_batch(setup, vocab)
        if gc:
            actor.gradient_checkpointing_enable()
            critic.gradient_checkpointing_enable()
        autocast = torch.autocast("cpu", torch.bfloat16) if regime == "autocast" else torch.autocast("cpu",
                                                                                                    enabled=False)
        for name, model in (("actor", actor), ("critic", critic)):
            rec = SavedBytes(model, _layers(model), autocast=regime == "autocast")
            with ExitStack() as stack:
                stack.enter_context(autocast)
                rec_ctx = stack.enter_context(rec.recording())
                if name == "actor":
                    logits = stack.enter_context(largest_head_output(model))
                    logp, _ = forward.policy_logprobs(model, batch, 1.0, setup.chunk_size, row_tokens,
                                                      checkpoint_head=gc)
                    loss = logp.sum()
                else:
                    loss = forward.critic_values(model, batch, row_tokens).sum()
            saved = rec_ctx.total
            if regime == "autocast" and not gc:  # autocast's bf16 weight copies, saved by autograd: their own term
                out[f"{name}_autocast_casts"] = sum(rec_ctx.casts.values())
            if gc:
                out[f"{name}_kept"] = saved
            else:
                out[f"{name}_full"] = saved
                out[f"{name}_layer"] = rec_ctx.largest_layer
                if name == "actor":
                    out["logits"] = logits["bytes"]
            if gc and name == "actor":
                out["logits_gc"] = logits["bytes"]
            del loss  # the graph goes with it: only the forward's saved tensors are measured
        del actor, critic
    for name in ("actor", "critic"):
        out[f"{name}_gc"] = out[f"{name}_kept"] + out[f"{name}_layer"]
    return out


def measure_states(setup, model_dir: Path) -> dict[str, float]:
    """Weights, gradients after a backward, and AdamW's state after one step, of the actor and the critic."""
    from vapo_pl import forward
    from vapo_pl.config import OptimConfig
    from vapo_pl.update import make_optimizer

    actor, critic = load_models(model_dir)
    small = replace(setup, micro_batch=1)
    batch = full_batch(small, actor.config.vocab_size)
    row_tokens = setup.pack_row_tokens if setup.packing else None
    logp, _ = forward.policy_logprobs(actor, batch, 1.0, setup.chunk_size, row_tokens)
    (logp.sum() + forward.critic_values(critic, batch, row_tokens).sum()).backward()
    opt = make_optimizer(actor, critic, OptimConfig())["optimizer"]

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    params = [*actor.parameters(), *critic.parameters()]
    out = {"actor_weights": nbytes(actor.parameters()), "critic_weights": nbytes(critic.parameters()),
           "grads": nbytes(p.grad for p in params if p.grad is not None)}
    opt.step()
    out["optim"] = nbytes(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return out


def measure_kv_tokens(model_dir: Path, setup) -> int:
    """Tokens of KV cache vLLM's CPU engine allocates in VLLM_CPU_KVCACHE_SPACE (blocks x block size)."""
    from vllm import LLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(setup.engine_kv_space_gb)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=setup.max_model_len, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = int(cache.num_gpu_blocks) * int(cache.block_size)
    del llm
    return tokens


def calibrate(case: str, args: list[str], model_dir: Path, regimes=("fp32",), kv: bool = False) -> list[Row]:
    """Plan vs measurement for one config (``args`` after ``fit``), every term."""
    from vapo_pl.memory_plan import REGIMES  # noqa: F401  (the regimes the plan knows)

    setup, plan = plan_for(args)
    rows: list[Row] = []
    states = measure_states(setup, model_dir)
    by_name = {t.name: t for t in plan.states}
    rows += [Row(case, "actor weights", by_name["actor weights"].gpu, states["actor_weights"]),
             Row(case, "critic weights", by_name["critic weights"].gpu, states["critic_weights"]),
             Row(case, "gradients", by_name["gradients (actor + critic)"].gpu, states["grads"]),
             Row(case, "optimizer state", by_name["optimizer state"].gpu, states["optim"])]
    from vapo_pl.memory_plan import logits_saved, make_plan

    for regime in regimes:
        if regime == "fp32":
            s, p = setup, plan
        elif regime == "bf16":  # FSDP2 under bf16-mixed: the forward reads bf16 weights
            s = replace(setup, precision="bf16-mixed", strategy="fsdp2")
            p = make_plan(s, plan.gpu_bytes)
        else:  # DDP under bf16-mixed: autocast over fp32 weights
            s = replace(setup, precision="bf16-mixed", strategy="ddp")
            p = make_plan(s, plan.gpu_bytes)
        m = measure_activations(s, model_dir, regime)
        tag = "" if regime == "fp32" else f" [{regime}]"
        for name, acts in (("actor", p.actor_acts), ("critic", p.critic_acts)):
            # the policy's logits are saved for backward unless the head is chunked and checkpointed: the saved
            # storages measured include them
            full, gc = acts.no_checkpointing, acts.with_checkpointing
            if name == "actor":
                full += logits_saved(replace(s, gradient_checkpointing=False))
                gc += logits_saved(replace(s, gradient_checkpointing=True))
            label = " (+ kept logits)" if name == "actor" else ""
            rows.append(Row(case, f"{name} activations{label}, no checkpointing{tag}", full, m[f"{name}_full"]))
            rows.append(Row(case, f"{name} activations{label}, checkpointing{tag}", gc, m[f"{name}_gc"]))
            rows.append(Row(case, f"{name} one layer{tag}", acts.recomputed_layer, m[f"{name}_layer"]))
        if regime == "autocast":
            casts = next(t.gpu for t in p.update if t.name.startswith("autocast"))
            rows.append(Row(case, "autocast bf16 weight copies", casts, m["actor_autocast_casts"]
                            + m["critic_autocast_casts"]))
        if regime == "fp32":
            from vapo_pl.memory_plan import logits_bytes

            for gc, key in ((False, "logits"), (True, "logits_gc")):
                rows.append(Row(case, f"logits tensor, {'' if gc else 'no '}checkpointing",
                                logits_bytes(replace(s, gradient_checkpointing=gc))[0], m[key]))
    if kv:
        rows.append(Row(case, "KV cache tokens (vLLM CPU)", plan.engine.kv_tokens, measure_kv_tokens(model_dir, setup)))
    return rows


def table(rows: list[Row]) -> str:
    out = [f"{'case':<8} {'term':<48} {'plan':>14} {'measured':>14} {'ratio':>7}"]
    for r in rows:
        unit = "" if "tokens" in r.term else " B"
        out.append(f"{r.case:<8} {r.term:<48} {r.plan:>12,.0f}{unit:>2} {r.measured:>12,.0f}{unit:>2} {r.ratio:7.3f}"
                   + ("" if r.ok else "  <-- outside 25%"))
    return "\n".join(out)


MEDIUM = {"hidden": 256, "layers": 8, "heads": 8, "kv_heads": 2, "intermediate": 1024, "vocab": 8192}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true", help="also bf16 weights (FSDP2 mixed precision) and autocast")
    ap.add_argument("--kv", action="store_true", help="also the KV cache of vLLM's CPU engine (builds an engine)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--cases", default="demo,medium8,medium1",
                    help="demo (the demo config), medium8 (8 x 512-token sequences on an 8-layer model, hidden 256, "
                         "vocab 8192), medium1 (one sequence)")
    a = ap.parse_args(argv)
    cases = set(a.cases.split(","))
    os.chdir(REPO)
    regimes = ("fp32", "bf16", "autocast") if a.bf16 else ("fp32",)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        demo_dir = REPO / ".cache/demo/base"
        if not (demo_dir / "config.json").is_file():  # a fresh checkout: the demo's architecture, random weights
            demo_dir = build_model(Path(tmp) / "demo", hidden=64, layers=3, heads=2, kv_heads=2, intermediate=256,
                                   vocab=98, max_positions=256)
        if "demo" in cases:
            rows += calibrate("demo", ["--config", "configs/demo.yaml", f"--model.init_args.model_path={demo_dir}"],
                              demo_dir, regimes, kv=a.kv)
        medium = build_model(Path(tmp) / "medium", **MEDIUM)
        common = ["--config", "configs/demo.yaml", f"--model.init_args.model_path={medium}",
                  "--data.init_args.max_response_length=480"]  # 512-token sequences
        if "medium8" in cases:
            rows += calibrate("medium8", [*common, "--model.init_args.algorithm.micro_batch_size=8"], medium,
                              regimes, kv=a.kv)
        if "medium1" in cases:
            rows += calibrate("medium1", [*common, "--model.init_args.algorithm.micro_batch_size=1",
                                          "--model.init_args.algorithm.minibatch_size=16"], medium, regimes)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps([{**vars(r), "ratio": r.ratio} for r in rows], indent=1))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} terms within {TOLERANCE:.0%} of the measurement")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
