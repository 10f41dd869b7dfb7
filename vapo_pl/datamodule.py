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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from vapo_pl.batch import RolloutBatch
from vapo_pl.common import derive_seed, require_model_dir, world
from vapo_pl.envs.base import EpisodeLimits
from vapo_pl.prompts import PromptRecord, load_prompts, render_prompt
from vapo_pl.ptx import load_ptx, next_ptx_batch
from vapo_pl.rewards.base import CompositeReward, RewardTerm
from vapo_pl.rollout.base import RolloutEngine, Sampling
from vapo_pl.rollout.config import EngineConfig
from vapo_pl.rollout.multi_turn import EnvironmentSpec, MultiTurnRollout
from vapo_pl.rollout.single_turn import SingleTurnRollout, concat_groups

log = logging.getLogger(__name__)


class _RolloutStream(IterableDataset):
    """Yields one ``RolloutBatch`` per RL step; generation happens when the batch is requested."""

    def __init__(self, dm: RolloutDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            batch = self.dm.next_training_batch()
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
        environment: multi-turn episodes instead of one response per prompt: an ``Environment`` subclass by import
            path (or ``tools`` for ``vapo_pl.envs.ToolEnvironment``), or ``{name, kwargs}``; see
            ``vapo_pl.rollout.multi_turn``. ``max_response_length`` then bounds all turns and observations together,
            and ``reward: []`` leaves the reward to the environment.
        episode: limits of a multi-turn episode (``max_turns``, ``max_total_tokens``, ``max_observation_tokens``).
        env_workers: threads that run the environments' steps of one turn concurrently.
        max_staleness: 0 (default): strictly on-policy, each step generates its batch with the weights of the
            previous update. 1: overlapped rollouts, one step off-policy: while the trainer updates on batch ``k``,
            the engine (in its own process) generates batch ``k + 1`` with the weights it last received, so every
            sample is trained on at most one weight version after the one that drew it. Needs
            ``model.algorithm.rollout_correction`` (the decoupled PPO form: clip against the trainer's log-probs at
            update time, reweight by their ratio to the sampler's) and the vllm engine on one rank.
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
        environment: str | dict | None = None,
        episode: EpisodeLimits | dict | None = None,
        env_workers: int = 8,
        max_staleness: int = 0,
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
            ("env_workers", env_workers, 1),
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
        if isinstance(max_staleness, bool) or max_staleness not in (0, 1):
            raise ValueError(f"data.max_staleness must be 0 (on-policy) or 1 (one batch generated ahead, while the "
                             f"trainer updates), got {max_staleness!r}")
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
        if not self.reward_terms and environment is None:
            raise ValueError("data.reward is empty: give at least one reward term (an empty list is for "
                             "data.environment, whose rewards are then the only ones)")
        self.reward_fn = CompositeReward(self.reward_terms) if self.reward_terms else None
        self.engine_config = EngineConfig(**engine) if isinstance(engine, dict) else engine or EngineConfig()
        self.max_staleness = max_staleness
        if max_staleness and self.engine_config.kind != "vllm":
            raise ValueError("data.max_staleness=1 needs data.engine.kind: vllm (overlapped rollouts run the engine "
                             "in its own process; the hf engine generates with the trainer's actor)")
        if max_staleness and self.engine_config.tensor_parallel_size != 1:
            raise ValueError("data.max_staleness=1 needs data.engine.tensor_parallel_size: 1")
        self._prefetch = None  # the next batch's generation, running while the trainer updates (max_staleness 1)
        self._prefetch_pool = None
        self._ahead: RolloutBatch | None = None  # a finished batch generated ahead (or restored from a checkpoint)
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
        self.episode = EpisodeLimits(**episode) if isinstance(episode, dict) else episode or EpisodeLimits()
        self.environment = None if environment is None else EnvironmentSpec.parse(environment)
        self.rollout = SingleTurnRollout(self) if self.environment is None else \
            MultiTurnRollout(self, self.environment, self.episode, env_workers)  # generation, scoring, rounds
        if self.environment is not None and self.tensor_parallel_size > 1:
            raise ValueError("data.environment: multi-turn episodes with engine.tensor_parallel_size > 1 are not "
                             "supported yet (the ranks of a tensor-parallel group would have to step the same "
                             "environments in lockstep)")

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
        self.ptx_ids, self.ptx_loss_start = load_ptx(self)

    def next_ptx_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """This rank's share of the next PPO-ptx batch (``vapo_pl.ptx.next_ptx_batch``); its position is checkpointed."""
        return next_ptx_batch(self)

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
            lora = getattr(self._module, "lora", None)
            if cfg.kind == "vllm" and lora is not None and lora.sync == "adapter":
                # vLLM takes max_lora_rank from a fixed list: the smallest one that holds the adapter's rank
                allowed = [r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= lora.rank]
                if not allowed:
                    raise ValueError(f"model.lora.rank={lora.rank}: vLLM serves adapters of rank <= 512")
                cfg = cfg.with_overrides(enable_lora=True, max_lora_rank=allowed[0])
            if cfg.kind == "vllm" and cfg.block_size is None and self.environment is not None and _cpu_only():
                cfg = cfg.with_overrides(block_size=32)  # see EngineConfig.block_size
            replica = self.replica_layout()[0]
            seed = derive_seed(self.seed, replica) % 2**31  # vLLM seeds numpy, which takes 32 bits
            if self.max_staleness:
                from vapo_pl.rollout.process_engine import ProcessEngine

                self._engine = ProcessEngine(self._model_dir(), cfg, seed=seed)
            else:
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
        self.wait_for_rollout()  # the engine finishes the batch it is generating ahead with the weights it has
        self.engine.update_weights(items)
        self.weight_version = version

    def sync_adapter(self, items: Iterable[tuple[str, torch.Tensor]], peft_config: dict[str, Any], version: int
                     ) -> None:
        """LoRA: load the actor's adapter (peft names and config) into the engine as adapter ``version``; the base
        weights stay as the engine has them. The adapter goes to the engine as a peft directory written atomically
        under a private temporary directory (vLLM loads adapters from directories); an engine that shares the
        trainer's actor (``hf``) has it already."""
        self._pending_weights = None
        self.wait_for_rollout()
        engine = self.engine
        if not hasattr(engine, "load_adapter"):
            raise ValueError(f"model.lora.sync=adapter: the {type(engine).__name__} engine cannot load adapters; "
                             "set model.lora.sync: merged")
        engine.load_adapter(items, peft_config, version)
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
        """The data position; with ``max_staleness`` 1 also the batch generated ahead (its prompts are already
        counted in the position), so a resumed run trains on exactly the batch the uninterrupted run would have."""
        state = {"epoch": self.epoch, "cursor": self.cursor, "batches_served": self.batches_served,
                 "ptx_epoch": self.ptx_epoch, "ptx_cursor": self.ptx_cursor}
        if self.max_staleness:
            self.wait_for_rollout()
            state["ahead"] = None if self._ahead is None else batch_state(self._ahead)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]
        self.cursor = state_dict["cursor"]
        self.batches_served = state_dict["batches_served"]
        self.ptx_epoch = state_dict.get("ptx_epoch", 0)
        self.ptx_cursor = state_dict.get("ptx_cursor", 0)
        ahead = state_dict.get("ahead")
        if self.max_staleness:
            self._ahead = None if ahead is None else RolloutBatch(**ahead)
        elif ahead is not None:
            raise ValueError("the checkpoint was written with data.max_staleness=1 (it holds a batch generated ahead); "
                             "resume it with the same setting")

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream already yields whole batches; workers=0: the engine lives here.
        return DataLoader(_RolloutStream(self), batch_size=None, num_workers=0, collate_fn=_identity)

    # ----------------------------------------------------------------- generation
    def training_sampling(self, seed: int) -> Sampling:
        return Sampling(n=self.samples_per_prompt, temperature=self.temperature,
                        max_tokens=self.max_response_length, seed=seed)

    def next_batch(self) -> RolloutBatch | None:
        """Generate, score and (optionally) filter one step's rollouts with the engine's current weights; None when
        this rank's shard of the epoch is used up."""
        out = self.rollout.step()
        if out is not None:
            self.batches_served += 1
        return out

    def next_training_batch(self) -> RolloutBatch | None:
        """The next RL step's batch. On-policy (``max_staleness`` 0): ``next_batch``, generated now. Overlapped: the
        batch generated ahead during the previous step (generated now only when there is none: the first step, a new
        epoch), and the generation of the one after it started in the background with the engine's current weights;
        ``sync_weights`` waits for that generation before it loads new weights."""
        if not self.max_staleness:
            return self.next_batch()
        self.wait_for_rollout()
        batch, self._ahead = self._ahead, None
        if batch is None:
            batch = self.next_batch()
            if batch is None:
                return None
        if self._prefetch_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch_pool = ThreadPoolExecutor(1, thread_name_prefix="vapo-rollout")
        self._prefetch = self._prefetch_pool.submit(self.next_batch)
        return batch

    def wait_for_rollout(self) -> None:
        """Wait for a generation running ahead (``max_staleness`` 1) and keep its batch; its error, if it failed,
        is raised here."""
        future, self._prefetch = self._prefetch, None
        if future is not None:
            self._ahead = future.result()

    def teardown(self, stage: str | None = None) -> None:
        """Finish (and drop) a generation running ahead and stop an engine that runs in its own process."""
        if self._prefetch is not None:
            try:
                self.wait_for_rollout()
            except Exception as e:  # noqa: BLE001 - the run is over; its own error, if any, is already raised
                log.warning("the rollout generated ahead failed at the end of the run: %s", e)
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown()
            self._prefetch_pool = None
        close = getattr(self._engine, "close", None)
        if self.max_staleness and close is not None:
            close()
            self._engine = None

    def concat(self, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """One batch of all rows of ``batches`` (re-padded to the widest prompt and response; groups renumbered)."""
        return concat_groups(list(batches), sum(len(b) for b in batches), self._pad_id())

    def evaluate(self, indices: list[int], sampling: Callable[[int], Sampling], prompts_per_call: int
                 ) -> Iterator[RolloutBatch]:
        """Scored rollouts of the held-out prompts ``indices``, ``prompts_per_call`` at a time; ``sampling(first)``
        gives the sampling of the call starting at held-out prompt ``first``. ``indices`` must be the same on every
        rank of a tensor-parallel group (``deal``); each rank gets its share of every call's prompts. No greedy
        baselines (those are for training batches). The engine sleeps again when the iteration ends or is abandoned."""
        self.wait_for_rollout()
        return self.rollout.evaluate(indices, sampling, prompts_per_call)

    def _generate(self, idx: list[int], sampling: Sampling, records: list[PromptRecord],
                  prompt_ids: list[list[int]], greedy_baseline: bool) -> RolloutBatch | None:
        """One generation call (``SingleTurnRollout.generate``): the seam every rollout of this DataModule goes
        through."""
        return self.rollout.generate(idx, sampling, records, prompt_ids, greedy_baseline)

    def _pad_id(self) -> int:
        tok = self.load_tokenizer()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

def batch_state(batch: RolloutBatch) -> dict[str, Any]:
    """``batch`` as a plain dict of CPU tensors and primitives (a checkpoint loads it with ``weights_only``)."""
    from dataclasses import fields

    cpu = batch.to("cpu")
    return {f.name: getattr(cpu, f.name) for f in fields(cpu) if f.name != "host"}


def _cpu_only() -> bool:
    return not torch.cuda.is_available()


def _identity(x: Any) -> Any:
    return x


