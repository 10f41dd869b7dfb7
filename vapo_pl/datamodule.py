"""The rollout DataModule: prompts in, freshly generated and scored ``RolloutBatch``es out.

Strictly on-policy. Lightning's default fetcher prefetches one batch ahead, which would make a rollout
generated inside the dataset one update stale. ``VAPOModule.training_step`` therefore takes
``dataloader_iter`` (Lightning then does not prefetch) and pulls the batch itself, so generation for
step ``k`` happens inside step ``k``, after the weights of update ``k-1`` were synced to the engine.
Every batch records the ``weight_version`` it was generated with and the module checks it.

The DataModule is the engine's one owner: it builds it, wakes it before every generate call, puts it to
sleep after a step's rollouts and after an evaluation, loads the trainer's weights into it
(``sync_weights``) and records their version. The module and the callbacks use ``sync_weights``,
``next_batch`` and ``evaluate``; none of them touches the engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from vapo_pl.batch import RolloutBatch
from vapo_pl.common import derive_seed, max_across_ranks, require_model_dir, world
from vapo_pl.prompts import PromptRecord, load_prompts, render_prompt
from vapo_pl.rewards.base import CompositeReward, RewardInput, RewardTerm, complete_reward
from vapo_pl.rollout.base import Completion, RolloutEngine, Sampling
from vapo_pl.rollout.config import EngineConfig

log = logging.getLogger(__name__)


class _RolloutStream(IterableDataset):
    """Yields one ``RolloutBatch`` per RL step; generation happens when the batch is requested."""

    def __init__(self, dm: RolloutDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            batch = self.dm.next_batch()
            if batch is None:  # this rank's shard is exhausted: the epoch ends
                self.dm.start_new_epoch()
                return
            yield batch


class RolloutDataModule(pl.LightningDataModule):
    """Prompts from files, rollouts from a vLLM (or transformers) engine, rewards from a verifier.

    Args:
        train_files: jsonl / parquet files or ``save_to_disk`` directories of training prompts (``fit`` needs them;
            an evaluation-only run, ``vapo-pl validate``, reads only ``val_files``).
        val_files: held-out prompts for the ``Evaluation`` callback.
        prompt_key: row field holding the question.
        answer_key: row field holding the gold answer; ``None`` for unlabeled data (TTRL).
        answer_after: keep only the text after this marker in the answer (``"####"`` for GSM8K); ``""``: the whole
            field. (A plain string, not optional: the config parser reads an optional ``"####"`` as a YAML comment.)
        val_prompt_key: ``prompt_key`` of the held-out files (default: the training one).
        val_answer_key: ``answer_key`` of the held-out files (default: the training one).
        val_answer_after: ``answer_after`` of the held-out files (``""``: the training one).
        template: ``"chat"`` (the tokenizer's chat template) or a format string with ``{prompt}``.
        max_prompt_length: prompts longer than this (in tokens) are dropped and counted.
        max_response_length: generation cap; hitting it marks the sample truncated.
        prompts_per_step: prompts per RL step over all ranks (the paper: 512); divided among ranks.
        samples_per_prompt: group size G (the paper: 16).
        temperature: sampling temperature of training rollouts; the trainer's log-probs use the same.
        top_p: must be 1.0 for training rollouts (the trainer does not replicate the mask).
        top_k: must be -1 for training rollouts, for the same reason.
        dynamic_sampling: DAPO: drop groups whose rewards are all equal and sample more prompts.
        max_sampling_rounds: cap on generation rounds per step under dynamic sampling.
        reward: reward terms, summed with their weights (``name`` is a registry name or import path).
        engine: rollout engine options.
        model_path: policy checkpoint for the engine; default: the module's ``model_path``.
        greedy_baseline: also decode each prompt greedily and return its score (ReMax); the module
            turns it on when its estimator is ``remax``.
        ptx_files: PPO-ptx language-modelling data (jsonl / parquet / dataset dir): rows with ``text`` (loss on every
            token) or ``prompt`` + ``response`` (the prompt templated as for rollouts, loss on the response).
        ptx_batch_size: PPO-ptx sequences per optimizer step, over all ranks.
        ptx_max_length: PPO-ptx sequences are cut to this many tokens (default: prompt + response length).
        shuffle: reshuffle prompts every epoch.
        seed: base seed for shuffling and sampling (each rank and step derive their own).
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        prompt_key: str = "prompt",
        answer_key: str | None = "answer",
        answer_after: str = "",
        val_prompt_key: str | None = None,
        val_answer_key: str | None = None,
        val_answer_after: str = "",
        template: str = "chat",
        max_prompt_length: int = 512,
        max_response_length: int = 1024,
        prompts_per_step: int = 8,
        samples_per_prompt: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 3,
        reward: list[RewardTerm] | None = None,
        engine: EngineConfig | None = None,
        model_path: str | None = None,
        greedy_baseline: bool = False,
        ptx_files: str | list[str] | None = None,
        ptx_batch_size: int = 8,
        ptx_max_length: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, lo in (
            ("max_prompt_length", max_prompt_length, 1),
            ("max_response_length", max_response_length, 1),
            ("prompts_per_step", prompts_per_step, 1),
            ("samples_per_prompt", samples_per_prompt, 1),
            ("max_sampling_rounds", max_sampling_rounds, 1),
            ("ptx_batch_size", ptx_batch_size, 1),
            ("ptx_max_length", ptx_max_length if ptx_max_length is not None else 2, 2),
        ):
            if value < lo:
                raise ValueError(f"data.{name} must be >= {lo}, got {value}")
        if temperature <= 0:
            raise ValueError(f"data.temperature must be > 0 for training rollouts, got {temperature}")
        if top_p != 1.0 or top_k != -1:
            raise ValueError(
                "data.top_p/top_k: training rollouts must sample from the full distribution (top_p=1, "
                "top_k=-1) because the trainer's log-probs do not apply the same mask; use them only in "
                "evaluation sampling"
            )
        if template != "chat" and "{prompt}" not in template:
            raise ValueError(f"data.template must be 'chat' or contain '{{prompt}}', got {template!r}")
        self.train_files = train_files
        self.val_files = val_files
        self.prompt_key, self.answer_key, self.answer_after = prompt_key, answer_key, answer_after or None
        self.val_prompt_key = val_prompt_key or prompt_key
        self.val_answer_key = val_answer_key or answer_key
        self.val_answer_after = val_answer_after or answer_after or None
        self.template = template
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.prompts_per_step = prompts_per_step
        self.samples_per_prompt = samples_per_prompt
        self.temperature = temperature
        self.dynamic_sampling = dynamic_sampling
        self.max_sampling_rounds = max_sampling_rounds
        self.reward_terms = reward if reward is not None else [RewardTerm(name="math_verify")]
        self.reward_terms = [RewardTerm(**t) if isinstance(t, dict) else t for t in self.reward_terms]
        self.reward_fn = CompositeReward(self.reward_terms)
        self.engine_config = EngineConfig(**engine) if isinstance(engine, dict) else engine or EngineConfig()
        self.model_path = model_path
        self.greedy_baseline = greedy_baseline
        self.ptx_files = ptx_files
        self.ptx_batch_size = ptx_batch_size
        self.ptx_max_length = ptx_max_length or max_prompt_length + max_response_length
        self.ptx_ids: list[list[int]] = []  # tokenised PPO-ptx sequences
        self.ptx_loss_start: list[int] = []  # first token of each that the loss covers
        self.ptx_epoch = self.ptx_cursor = 0
        self.shuffle = shuffle
        self.seed = seed

        self.tokenizer = None
        self._engine: RolloutEngine | None = None
        self._asleep = False  # whether this DataModule put the engine to sleep (and has not woken it since)
        self.weight_version = 0  # the version of the weights the engine holds (set by sync_weights)
        self._pending_weights: Callable[[], None] | None = None  # see expect_weights
        self._weight_source: Callable[[], None] | None = None  # the same pull, kept for engines that lose weights
        self._shared_actor = None
        self._module = None  # the LightningModule, for its build_prompt / compute_reward hooks
        self.train_records: list[PromptRecord] = []
        self.train_prompt_ids: list[list[int]] = []
        self.val_records: list[PromptRecord] = []
        self.val_prompt_ids: list[list[int]] = []
        self.dropped_prompts = 0
        # data position: epoch and how many of this rank's shard have been consumed in it
        self.epoch = 0
        self.cursor = 0
        self.batches_served = 0

    # ----------------------------------------------------------------- wiring
    def connect(self, module: pl.LightningModule, actor: torch.nn.Module | None = None) -> None:
        """Take from the module what the DataModule cannot know at construction: the policy path, the
        prompt and reward hooks, whether the estimator needs greedy baselines, and (for the ``hf`` engine)
        the actor to generate with."""
        if self.model_path is None:
            self.model_path = getattr(module, "model_path", None)
        self._module = module
        self.greedy_baseline = self.greedy_baseline or bool(getattr(module, "needs_greedy_baseline", False))
        if actor is not None:
            self._shared_actor = actor

    @property
    def rank(self) -> int:
        return world()[0]

    @property
    def world_size(self) -> int:
        return world()[1]

    @property
    def prompts_per_rank(self) -> int:
        """Prompts whose rollouts each rank trains on per step (their groups whole)."""
        world = self.world_size
        if self.prompts_per_step % world:
            raise ValueError(
                f"data.prompts_per_step={self.prompts_per_step} is not divisible by the {world} ranks"
            )
        return self.prompts_per_step // world

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks that share one engine replica (vLLM tensor parallelism); 1 for the ``hf`` engine."""
        return self.engine_config.tensor_parallel_size if self.engine_config.kind == "vllm" else 1

    def replica_layout(self) -> tuple[int, int, int, int]:
        """``(replica, replicas, tp_rank, tp)``: this rank's engine replica (``rank // tp``), how many there are, its
        place in the replica's tensor-parallel group and the group's size.

        The ranks of one tensor-parallel group run one engine together: they must submit the same prompts with the
        same seeds (vLLM's ``external_launcher`` keeps them in step by identical scheduling). So prompts, step seeds
        and engine seeds are dealt per replica, and after generation each rank of the group keeps its share of the
        prompts' groups to score and train on (``share``); every rank still trains on ``prompts_per_rank`` prompts.
        """
        rank, world = self.rank, self.world_size
        tp = self.tensor_parallel_size
        if world % tp:
            raise ValueError(f"data.engine.tensor_parallel_size={tp} does not divide the {world} ranks")
        return rank // tp, world // tp, rank % tp, tp

    def share(self, n: int) -> slice:
        """The part of ``n`` prompts generated by this rank's replica that this rank keeps (all of them at TP 1)."""
        _, _, tp_rank, tp = self.replica_layout()
        return slice(tp_rank * n // tp, (tp_rank + 1) * n // tp)

    def deal(self, indices: Sequence[int]) -> list[int]:
        """``indices`` dealt round-robin to the engine replicas: this rank's replica's part (its whole
        tensor-parallel group gets the same list)."""
        replica, replicas, _, _ = self.replica_layout()
        return list(indices)[replica::replicas]

    def load_tokenizer(self):
        """The policy's tokenizer (from ``data.model_path``), loaded on first use and kept."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self._model_dir())
        return self.tokenizer

    def _tokenize(self, records: list[PromptRecord]) -> tuple[list[PromptRecord], list[list[int]], int]:
        tok = self.load_tokenizer()
        if self._module is not None and hasattr(self._module, "build_prompt"):
            texts = [self._module.build_prompt(r, tok, self.template) for r in records]
        else:
            texts = [render_prompt(tok, r.prompt, self.template) for r in records]
        ids = tok(texts, add_special_tokens=self.template != "chat")["input_ids"]
        kept = [(replace(r, rendered=text), i) for r, text, i in zip(records, texts, ids)
                if len(i) <= self.max_prompt_length]
        dropped = len(records) - len(kept)
        return [r for r, _ in kept], [i for _, i in kept], dropped

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and self.trainer.lightning_module is not None and self._module is None:
            self.connect(self.trainer.lightning_module)
        if stage in ("validate", "test"):  # evaluation only: the held-out prompts
            if not self.val_files:
                raise ValueError("data.val_files is not set: an evaluation run evaluates the held-out prompts")
            if not self.val_prompt_ids:
                self._setup_val()
            return
        if self.train_prompt_ids:
            return
        if not self.train_files:
            raise ValueError("data.train_files is not set: training needs prompts")
        records = load_prompts(self.train_files, self.prompt_key, self.answer_key, self.answer_after)
        self.train_records, self.train_prompt_ids, self.dropped_prompts = self._tokenize(records)
        if self.dropped_prompts:
            log.warning("dropped %d prompts longer than max_prompt_length=%d", self.dropped_prompts,
                        self.max_prompt_length)
        if not self.train_prompt_ids:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length}: every training prompt is longer")
        if len(self.train_prompt_ids) < self.prompts_per_step:
            raise ValueError(
                f"data.prompts_per_step={self.prompts_per_step} exceeds the {len(self.train_prompt_ids)} "
                "usable training prompts"
            )
        if self.val_files:
            self._setup_val()
        if self.ptx_files:
            self._setup_ptx()

    def _setup_ptx(self) -> None:
        """Tokenise the PPO-ptx rows: ``text`` rows train on every token, ``prompt`` + ``response`` rows on the
        response (its prompt rendered like a rollout's), each ending with EOS, cut to ``ptx_max_length``."""
        from vapo_pl.prompts import DataError, _read_rows

        tok = self.load_tokenizer()
        eos = tok.eos_token_id
        for p in [self.ptx_files] if isinstance(self.ptx_files, str) else self.ptx_files:
            if not Path(p).exists():
                raise DataError(f"data.ptx_files: {p} does not exist")
            for loc, row in _read_rows(Path(p)):
                if isinstance(row.get("text"), str) and row["text"].strip():
                    head, body = [], tok(row["text"], add_special_tokens=False)["input_ids"]
                elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                    rendered = render_prompt(tok, row["prompt"], self.template)
                    head = tok(rendered, add_special_tokens=self.template != "chat")["input_ids"]
                    body = tok(row["response"], add_special_tokens=False)["input_ids"]
                else:
                    raise DataError(f"{loc}: a PPO-ptx row needs a non-empty 'text', or 'prompt' and 'response'")
                ids = (head + body + ([eos] if eos is not None else []))[: self.ptx_max_length]
                if len(ids) - max(len(head), 1) < 1:
                    continue  # nothing left to train on after the cut
                self.ptx_ids.append(ids)
                self.ptx_loss_start.append(max(len(head), 1))
        if len(self.ptx_ids) < self.ptx_batch_size:
            raise DataError(f"data.ptx_files: {len(self.ptx_ids)} usable sequences, fewer than "
                            f"data.ptx_batch_size={self.ptx_batch_size}")

    def next_ptx_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """This rank's share of the next PPO-ptx batch: right-padded ``(ids, attention_mask, loss_mask)``, where
        ``loss_mask[:, t]`` marks the tokens whose log-prob is trained (predicted from position ``t - 1``). The
        order is a seeded permutation per pass over the data; the position is checkpointed."""
        if not self.ptx_ids:
            return None
        world = self.world_size
        if self.ptx_batch_size % world:
            raise ValueError(f"data.ptx_batch_size={self.ptx_batch_size} is not divisible by the {world} ranks")
        per_pass = len(self.ptx_ids) - len(self.ptx_ids) % self.ptx_batch_size
        if self.ptx_cursor + self.ptx_batch_size > per_pass:
            self.ptx_epoch, self.ptx_cursor = self.ptx_epoch + 1, 0
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0x9771, self.ptx_epoch))
        order = torch.randperm(len(self.ptx_ids), generator=g).tolist()
        chosen = order[self.ptx_cursor : self.ptx_cursor + self.ptx_batch_size][self.rank :: world]
        self.ptx_cursor += self.ptx_batch_size
        seqs = [torch.tensor(self.ptx_ids[i]) for i in chosen]
        ids = pad_sequence(seqs, batch_first=True, padding_value=self._pad_id())
        lengths = torch.tensor([len(s) for s in seqs])
        cols = torch.arange(ids.shape[1])[None, :]
        attention = (cols < lengths[:, None]).long()
        loss_mask = (cols >= torch.tensor([self.ptx_loss_start[i] for i in chosen])[:, None]) & attention.bool()
        return ids, attention, loss_mask

    def _setup_val(self) -> None:
        val = load_prompts(self.val_files, self.val_prompt_key, self.val_answer_key, self.val_answer_after)
        self.val_records, self.val_prompt_ids, dropped = self._tokenize(val)
        if dropped:
            log.warning("dropped %d held-out prompts longer than max_prompt_length=%d", dropped, self.max_prompt_length)

    def val_dataloader(self) -> Any:
        """One placeholder item for ``vapo-pl validate`` (the ``Evaluation`` callbacks generate through
        ``evaluate``); nothing during ``fit``, whose evaluations run from the callbacks between RL steps."""
        from lightning.pytorch.trainer.states import TrainerFn

        if self.trainer is not None and self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return DataLoader([0], batch_size=None)
        return []

    test_dataloader = val_dataloader

    # ----------------------------------------------------------------- the engine's life
    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine, built on first use (after the process group and the actor exist). Read-only:
        generate through ``next_batch``/``evaluate`` and load weights through ``sync_weights``."""
        if self._engine is None:
            from vapo_pl.rollout.factory import build_engine

            cfg = self.engine_config
            if cfg.kind == "vllm" and cfg.max_model_len is None:
                from transformers import AutoConfig

                limit = getattr(AutoConfig.from_pretrained(self._model_dir()), "max_position_embeddings", None)
                need = self.max_prompt_length + self.max_response_length
                cfg = cfg.with_overrides(max_model_len=min(need, limit) if limit else need)
            replica = self.replica_layout()[0]
            seed = derive_seed(self.seed, replica) % 2**31  # vLLM seeds numpy, which takes 32 bits
            self._engine = build_engine(cfg, self._model_dir(), seed=seed, rank=self.rank,
                                        local_rank=self._device_index(), shared_model=self._shared_actor)
            self._asleep = False
        return self._engine

    def attach_engine(self, engine: RolloutEngine) -> None:
        """Generate with ``engine`` instead of one built from ``data.engine`` (tests, an engine shared by
        several DataModules, a remote engine). It must be awake; from here on this DataModule owns it."""
        self._engine, self._asleep = engine, False

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype the engine holds its weights in; ``sync_weights`` callers cast to it."""
        return self.engine.weight_dtype

    @property
    def weight_sync_bucket_bytes(self) -> int:
        return self.engine_config.weight_sync_bucket_bytes

    def sync_weights(self, items: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load the trainer's weights (``(name, tensor)`` pairs, consumed lazily) into the engine; batches
        generated from now on carry ``version``. A sleeping engine takes the weights without waking its KV
        cache (vLLM wakes only the weights); the next generate call wakes the rest."""
        self._pending_weights = None
        self.engine.update_weights(items)
        self.weight_version = version

    def expect_weights(self, pull: Callable[[], None]) -> None:
        """The engine must hold the trainer's weights before it next generates: the first generate call (or
        ``ensure_weights``) calls ``pull``, which must end in ``sync_weights``. The module registers this at
        fit start, so a callback that generates in ``on_train_start`` (value pretraining, an evaluation at
        start) sees the restored weights after a resume, whatever order Lightning runs the hooks in."""
        self._pending_weights = pull
        self._weight_source = pull

    def ensure_weights(self) -> None:
        """Run the pull registered by ``expect_weights`` if no weights arrived since."""
        pull, self._pending_weights = self._pending_weights, None
        if pull is not None:
            pull()

    def _awake_engine(self) -> RolloutEngine:
        self.ensure_weights()
        engine = self.engine
        if getattr(engine, "weights_lost", False):  # a level-2 sleep discarded them (after an evaluation, say)
            if self._weight_source is None:
                raise RuntimeError("the engine's weights were released by a level-2 sleep and no weight source is "
                                   "registered (expect_weights)")
            self._weight_source()
        if self._asleep:
            engine.wake_up()
            self._asleep = False
        return engine

    def _sleep_engine(self) -> None:
        """Hand the engine's accelerator memory to the trainer (GPU; a no-op on CPU) until it is next needed."""
        if self._engine is not None and not self._asleep:
            self._engine.sleep()
            self._asleep = True

    def _precision_context(self):
        """The trainer's forward precision context (bf16 autocast under ``bf16-mixed``) for the ``hf`` engine, which
        generates with the trainer's own actor also from callbacks (evaluation, value pretraining), outside the
        ``training_step`` Lightning wraps. vLLM keeps its own dtype."""
        if self.trainer is None or self.engine_config.kind != "hf":
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    def _device_index(self) -> int | None:
        """The index of the accelerator the trainer put this rank on (its local rank on CPU); None without a trainer.
        Not ``LOCAL_RANK``: with ``trainer.devices=[2, 3]`` local rank 0 trains on ``cuda:2``."""
        trainer = self.trainer
        if trainer is None:
            return None
        device = trainer.strategy.root_device
        return device.index if device.type != "cpu" and device.index is not None else trainer.local_rank

    def _model_dir(self) -> str:
        return str(require_model_dir(self.model_path, "data.model_path"))

    # ----------------------------------------------------------------- sharding and position
    def _shard_order(self, epoch: int) -> list[int]:
        """This rank's replica's prompt indices for ``epoch``: one global permutation (same on every rank), dealt
        round-robin to the engine replicas, so replicas never share a prompt within an epoch."""
        n = len(self.train_prompt_ids)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        replica, replicas, _, _ = self.replica_layout()
        usable = n - n % replicas  # equal shard sizes keep ranks in lockstep
        return order[replica:usable:replicas]

    def _take_prompts(self, k: int) -> list[int] | None:
        shard = self._shard_order(self.epoch)
        if self.cursor + k > len(shard):
            return None
        idx = shard[self.cursor : self.cursor + k]
        self.cursor += k
        return idx

    def start_new_epoch(self) -> None:
        self.epoch += 1
        self.cursor = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches_served": self.batches_served,
                "ptx_epoch": self.ptx_epoch, "ptx_cursor": self.ptx_cursor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]
        self.cursor = state_dict["cursor"]
        self.batches_served = state_dict["batches_served"]
        self.ptx_epoch = state_dict.get("ptx_epoch", 0)
        self.ptx_cursor = state_dict.get("ptx_cursor", 0)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream already yields whole batches; workers=0: the engine lives here.
        return DataLoader(_RolloutStream(self), batch_size=None, num_workers=0, collate_fn=_identity)

    # ----------------------------------------------------------------- generation
    def training_sampling(self, seed: int) -> Sampling:
        return Sampling(n=self.samples_per_prompt, temperature=self.temperature,
                        max_tokens=self.max_response_length, seed=seed)

    def next_batch(self) -> RolloutBatch | None:
        """Generate, score and (optionally) filter one step's rollouts with the engine's current weights."""
        need = self.prompts_per_rank  # what this rank keeps; its replica generates need * tp prompts per round
        replica, _, _, tp = self.replica_layout()
        step_seed = derive_seed(self.seed, replica, self.epoch, self.batches_served)
        t0 = time.perf_counter()
        kept: list[RolloutBatch] = []
        spare: list[RolloutBatch] = []  # filtered-out groups, used to fill the batch if rounds run out
        round_stats: list[dict[str, float]] = []  # one per generation round (kept and spare share a round's)
        n_kept = n_seen = rounds = 0
        while True:
            idx = self._take_prompts(need * tp)
            if idx is None:
                if rounds == 0:
                    return None
                break
            rounds += 1
            batch = self._generate(idx, self.training_sampling(derive_seed(step_seed, rounds)),
                                   self.train_records, self.train_prompt_ids, greedy_baseline=self.greedy_baseline)
            n_seen += need
            round_stats.append(batch.stats)
            if not self.dynamic_sampling:
                kept.append(batch)
                n_kept = need
            else:
                informative = _informative_groups(batch.scores, batch.group_index, need)
                keep_rows = informative[batch.group_index]
                kept.append(batch.select(keep_rows.nonzero().squeeze(1)))
                spare.append(batch.select((~keep_rows).nonzero().squeeze(1)))
                n_kept += int(informative.sum())
            # every rank runs the same number of rounds so engines and collectives stay in lockstep
            more = int(n_kept < need and rounds < self.max_sampling_rounds)
            if not max_across_ranks(more):
                break
        self._sleep_engine()  # GPU: the trainer gets the engine's memory until the next generate call
        out = _concat_groups(kept + spare, need, self._pad_id())
        out.stats = _merge_stats(round_stats)
        out.stats["perf/generate_tokens_per_s"] = out.stats["rollout/generated_tokens"] / max(
            out.stats["perf/generate_s"], 1e-9)
        out.stats.update({
            "rollout/sampling_rounds": float(rounds),
            "rollout/dropped_long_prompts": float(self.dropped_prompts),
            "perf/rollout_s": time.perf_counter() - t0,
        })
        if self.dynamic_sampling:
            out.stats["rollout/dynamic_sampling_kept_share"] = n_kept / max(n_seen, 1)
            out.stats["rollout/dynamic_sampling_filled"] = float(max(need - n_kept, 0))
        self.batches_served += 1
        return out

    def concat(self, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """One batch of all rows of ``batches`` (re-padded to the widest prompt and response; groups renumbered)."""
        return _concat_groups(list(batches), sum(len(b) for b in batches), self._pad_id())

    def evaluate(self, indices: list[int], sampling: Callable[[int], Sampling], prompts_per_call: int
                 ) -> Iterator[RolloutBatch]:
        """Scored rollouts of the held-out prompts ``indices``, ``prompts_per_call`` at a time; ``sampling(first)``
        gives the sampling of the call starting at held-out prompt ``first``. ``indices`` must be the same on every
        rank of a tensor-parallel group (``deal``); each rank gets its share of every call's prompts. No greedy
        baselines (those are for training batches). The engine sleeps again when the iteration ends or is abandoned."""
        try:
            starts = list(range(0, len(indices), prompts_per_call))
            # A sharded hf actor gathers weights in every forward: every rank makes as many generate calls as the
            # rank with the most (agreed before the first call, itself a collective); the extra ones are dropped.
            lockstep = getattr(self.engine, "max_calls_across_ranks", None)
            calls = lockstep(len(starts)) if lockstep is not None else len(starts)
            for i in range(calls):
                if i >= len(starts):
                    self._awake_engine()
                    with self._precision_context():
                        self.engine.generate([self.val_prompt_ids[0]], sampling(0))
                    continue
                idx = indices[starts[i] : starts[i] + prompts_per_call]
                batch = self._generate(idx, sampling(idx[0]), self.val_records, self.val_prompt_ids,
                                       greedy_baseline=False)
                if batch is not None:
                    yield batch
        finally:
            self._sleep_engine()

    def _generate(self, idx: list[int], sampling: Sampling, records: list[PromptRecord],
                  prompt_ids: list[list[int]], greedy_baseline: bool) -> RolloutBatch | None:
        """Rollouts for prompts ``idx`` of ``records``: generate (the whole tensor-parallel group submits ``idx``),
        keep this rank's share, decode, score, pad."""
        engine = self._awake_engine()
        version = self.weight_version
        mine = self.share(len(idx))
        t0 = time.perf_counter()
        with self._precision_context():
            outs = engine.generate([prompt_ids[i] for i in idx], sampling)[mine]
        t_gen = time.perf_counter() - t0
        if not outs:  # a tensor-parallel rank whose share of a short evaluation call is empty
            return None
        baseline = None
        if greedy_baseline:
            greedy = Sampling(n=1, temperature=0.0, max_tokens=sampling.max_tokens)
            with self._precision_context():
                g_outs = engine.generate([prompt_ids[i] for i in idx], greedy)[mine]
            g_batch = self._score(idx[mine], g_outs, records, prompt_ids, version)
            baseline = g_batch.scores.repeat_interleave(sampling.n)
        t1 = time.perf_counter()
        batch = self._score(idx[mine], outs, records, prompt_ids, version)
        batch.baseline_scores = baseline
        batch.stats.update({
            "perf/generate_s": t_gen,
            "perf/score_s": time.perf_counter() - t1,
            "rollout/generated_tokens": float(batch.lengths.sum()),
        })
        return batch

    def _pad_id(self) -> int:
        tok = self.load_tokenizer()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _score(self, idx: list[int], outs: list[list[Completion]], records: list[PromptRecord],
               prompt_ids: list[list[int]], version: int) -> RolloutBatch:
        tok = self.load_tokenizer()
        n = len(outs[0])
        comps = [c for group in outs for c in group]
        sample_prompt = [i for i in idx for _ in range(n)]
        texts = tok.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
        lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.long)
        truncated = torch.tensor([c.truncated for c in comps], dtype=torch.bool)
        group_index = torch.arange(len(idx)).repeat_interleave(n)
        prompts_text = [records[i].prompt for i in sample_prompt]
        reward_input = RewardInput(
            prompts=prompts_text,
            rendered_prompts=[records[i].rendered for i in sample_prompt],
            responses=texts,
            answers=[records[i].answer for i in sample_prompt],
            group_index=group_index,
            lengths=lengths,
            truncated=truncated,
            max_response_length=self.max_response_length,
            metadata=[records[i].extra for i in sample_prompt],
        )
        if self._module is not None and hasattr(self._module, "compute_reward"):
            result = complete_reward(self._module.compute_reward(reward_input, self.reward_fn), len(comps),
                                     f"{type(self._module).__name__}.compute_reward")
        else:
            result = complete_reward(self.reward_fn(reward_input), len(comps), "reward")
        pad = self._pad_id()
        prompt_t = pad_sequence([torch.tensor(prompt_ids[i]) for i in sample_prompt], batch_first=True,
                                padding_value=pad, padding_side="left")
        resp_t = pad_sequence([torch.tensor(c.token_ids, dtype=torch.long) for c in comps], batch_first=True,
                              padding_value=pad)
        logp_t = pad_sequence([torch.tensor(c.logprobs, dtype=torch.float32) for c in comps], batch_first=True)
        width = resp_t.shape[1]
        response_mask = torch.arange(width)[None, :] < lengths[:, None]
        prompt_lens = torch.tensor([len(prompt_ids[i]) for i in sample_prompt])
        prompt_mask = torch.arange(prompt_t.shape[1])[None, :] >= (prompt_t.shape[1] - prompt_lens)[:, None]
        extracted = result.extracted or [None] * len(comps)
        metadata = [
            {"prompt": prompts_text[j], "response": texts[j], "answer": records[sample_prompt[j]].answer,
             "extracted": extracted[j], "source": records[sample_prompt[j]].source}
            for j in range(len(comps))
        ]
        stats = dict(result.stats)
        return RolloutBatch(
            input_ids=torch.cat([prompt_t, resp_t], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1).long(),
            response_mask=response_mask,
            rollout_logprobs=logp_t,
            scores=result.scores.float(),
            correct=result.correct.bool(),
            lengths=lengths,
            truncated=truncated,
            group_index=group_index,
            weight_version=version,
            reward_terms=dict(result.terms),
            metadata=metadata,
            stats=stats,
        )


def _identity(x: Any) -> Any:
    return x


def _informative_groups(scores: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G,) bool: groups whose rewards are not all equal (DAPO's dynamic-sampling filter)."""
    hi = torch.full((n_groups,), -torch.inf).scatter_reduce(0, group_index, scores, "amax")
    lo = torch.full((n_groups,), torch.inf).scatter_reduce(0, group_index, scores, "amin")
    return hi > lo


def _concat_groups(parts: list[RolloutBatch], n_groups: int, pad_id: int) -> RolloutBatch:
    """Concatenate batches group by group (renumbering groups), keeping the first ``n_groups``."""
    parts = [p for p in parts if len(p)]
    pw = max(p.prompt_width for p in parts)
    rw = max(p.response_mask.shape[1] for p in parts)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "response_mask", "rollout_logprobs")}
    offset = 0
    groups, rest = [], []
    for p in parts:
        lp, lr = pw - p.prompt_width, rw - p.response_mask.shape[1]
        ids = torch.nn.functional.pad(p.input_ids[:, : p.prompt_width], (lp, 0), value=pad_id)
        resp = torch.nn.functional.pad(p.responses, (0, lr), value=pad_id)
        cols["input_ids"].append(torch.cat([ids, resp], 1))
        am = p.attention_mask
        cols["attention_mask"].append(torch.cat([
            torch.nn.functional.pad(am[:, : p.prompt_width], (lp, 0)),
            torch.nn.functional.pad(am[:, p.prompt_width :], (0, lr))], 1))
        cols["response_mask"].append(torch.nn.functional.pad(p.response_mask, (0, lr)))
        cols["rollout_logprobs"].append(torch.nn.functional.pad(p.rollout_logprobs, (0, lr)))
        _, new_gi = torch.unique(p.group_index, sorted=True, return_inverse=True)
        groups.append(new_gi + offset)
        offset += int(new_gi.max()) + 1
        rest.append(p)
    group_index = torch.cat(groups)
    keep = (group_index < n_groups).nonzero().squeeze(1)
    cat = lambda name: torch.cat([getattr(p, name) for p in rest])  # noqa: E731
    baseline = None if rest[0].baseline_scores is None else cat("baseline_scores")
    merged = RolloutBatch(
        input_ids=torch.cat(cols["input_ids"]),
        attention_mask=torch.cat(cols["attention_mask"]),
        response_mask=torch.cat(cols["response_mask"]),
        rollout_logprobs=torch.cat(cols["rollout_logprobs"]),
        scores=cat("scores"), correct=cat("correct"), lengths=cat("lengths"), truncated=cat("truncated"),
        group_index=group_index,
        weight_version=rest[0].weight_version,
        reward_terms={k: torch.cat([p.reward_terms[k] for p in rest]) for k in rest[0].reward_terms},
        baseline_scores=baseline,
        metadata=[m for p in rest for m in p.metadata],
    )
    if len(parts) == 1 and len(keep) == len(group_index):
        return merged
    return merged.select(keep)


def _merge_stats(rounds: list[dict[str, float]]) -> dict[str, float]:
    """One step's stats from its generation rounds: seconds and generated tokens add up, every other value
    (shares, fractions; the rounds are of equal size) is averaged over the rounds that report it."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for s in rounds for k in s):
        values = [s[k] for s in rounds if k in s]
        summed = k.endswith("_s") or k == "rollout/generated_tokens"
        out[k] = float(sum(values)) if summed else float(sum(values) / len(values))
    return out
