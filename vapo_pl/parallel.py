"""Strategy-specific pieces: FSDP2 sharding, full weights for the rollout engine, and a DeepSpeed strategy
that trains Hugging Face models correctly (``HFDeepSpeedStrategy``; select it in the strategy config).

All of it is exercised on CPU by ``tests/distributed`` (gloo, two processes): DDP, FSDP2 through Lightning's
``ModelParallelStrategy``, and DeepSpeed ZeRO-2/3 through ``HFDeepSpeedStrategy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (``model.layers`` under any prefix)."""
    for name in ("model", "backbone", "transformer"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "layers"):
            return list(inner.layers)
        if inner is not None and hasattr(inner, "model") and hasattr(inner.model, "layers"):
            return list(inner.model.layers)
    if hasattr(model, "layers"):
        return list(model.layers)
    return []


def fully_shard_model(model: nn.Module, mesh, *, bf16: bool = False, cpu_offload: bool = False) -> None:
    """FSDP2: shard every decoder layer, then the whole model, over the data-parallel mesh.

    ``bf16`` (``trainer.precision: bf16-mixed``): the decoder layers are all-gathered and computed in bfloat16 and
    their gradients reduce-scattered in float32 (``MixedPrecisionPolicy``), which halves the all-gather traffic and
    the unsharded layer's memory; the root (embeddings, final norm, output head) stays in float32, since the
    log-probs are read from the head. ``cpu_offload``: sharded parameters, gradients and the optimizer step live on
    the host (``CPUOffloadPolicy``); the accelerator holds only the layers being computed."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    layer_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=layer_mp, offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, offload_policy=offload)


def full_state_items(model: nn.Module, strategy) -> Iterator[tuple[str, Tensor]]:
    """Full (unsharded) weights with Hugging Face names, on every rank: ``stream_state_items`` without a cast, with
    ZeRO-3 gathering everything at once. For checks on small models; to save, use ``full_state_on_rank0``."""
    return stream_state_items(model, strategy)


SAVE_BUCKET_BYTES = 256 * 2**20


def full_state_on_rank0(model: nn.Module, strategy, *, bucket_bytes: int = SAVE_BUCKET_BYTES
                        ) -> dict[str, Tensor] | None:
    """The full weights as CPU tensors on global rank 0 (for saving), None on the other ranks.

    Every rank must call it (the gathers are collectives), but only rank 0 keeps anything, and it keeps host copies:
    FSDP2 gathers one tensor at a time and ZeRO-3 one bucket of ``bucket_bytes`` at a time, each moved to the CPU as
    it arrives and dropped at once on the other ranks, so no rank holds the whole model on its accelerator.
    """
    import torch.distributed as dist

    keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out: dict[str, Tensor] | None = {} if keep else None
    for name, t in stream_state_items(model, strategy, bucket_bytes=bucket_bytes):
        if out is not None:
            out[name] = t.detach().to("cpu", copy=True)
    return out


def _buckets(items: list[tuple[str, Tensor]], bucket_bytes: int | None, size_of) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive groups of ``items`` of at most ``bucket_bytes`` each (a larger tensor alone); one group if None."""
    if bucket_bytes is None:
        yield items
        return
    bucket, total = [], 0
    for item in items:
        n = size_of(item[1])
        if bucket and total + n > bucket_bytes:
            yield bucket
            bucket, total = [], 0
        bucket.append(item)
        total += n
    if bucket:
        yield bucket


def stream_state_items(model: nn.Module, strategy, *, dtype: torch.dtype | None = None,
                       bucket_bytes: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """Full (unsharded) weights with Hugging Face names, produced lazily one bucket at a time.

    Nothing is materialised for the whole model (unless ``bucket_bytes`` is None under ZeRO-3): FSDP2 shards are
    gathered tensor by tensor (``DTensor.full_tensor``), ZeRO-3 partitions bucket by bucket (``GatheredParameters``
    over at most ``bucket_bytes`` of full-size parameters), and each gathered tensor is cast to ``dtype`` (the
    engine's) as it goes, so the extra memory a weight sync holds at once is about one bucket (plus what the consumer
    keeps). Weights a rank holds whole (no strategy, DDP, FSDP2 tensors that are not sharded) are yielded as views in
    their own dtype, never copied: every engine's ``update_weights`` copies into its own parameters, and that copy
    casts. Every rank must consume the whole iterator in the same order: the gathers are collectives.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    def cast(t: Tensor) -> Tensor:
        t = t.detach()
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
        state_names = list(model.state_dict().keys())
        entries = [(name, params.get(name)) for name in state_names]

        def full_bytes(p):
            if p is None:
                return 0
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            return numel * p.element_size()

        for bucket in _buckets(entries, bucket_bytes, full_bytes):
            group = list({id(p): p for _, p in bucket if p is not None}.values())
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                buffers = None
                for name, p in bucket:
                    if p is None:  # a buffer (not partitioned by ZeRO-3)
                        if buffers is None:
                            buffers = dict(model.named_buffers())
                        yield name, cast(buffers[name])
                    else:
                        yield name, cast(p).clone() if dtype is None or p.dtype == dtype else cast(p)
        return
    # No torch.no_grad() here: a generator would hold it across its yields and, if not run to the end, leave the
    # caller's grad mode off. state_dict() tensors are detached already.
    state = model.state_dict()
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.tensor import DTensor

        for name, t in state.items():
            yield name, cast(t.full_tensor()) if isinstance(t, DTensor) else t.detach()
        return
    for name, t in state.items():
        yield name, t.detach()


def any_nonfinite(model: nn.Module, reduce) -> bool:
    """Whether any rank holds a non-finite weight of ``model`` (each rank checks its shards; ``reduce`` sums a flag
    over ranks)."""
    flag = None
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if flag is None:
                flag = torch.zeros((), device=local.device)
            if local.numel() and not bool(torch.isfinite(local).all()):
                flag = flag + 1
                break
    return flag is not None and float(reduce(flag)) > 0


def load_full_state(model: nn.Module, state: dict[str, Tensor], strategy, *,
                    bucket_bytes: int = SAVE_BUCKET_BYTES) -> None:
    """Load full (unsharded) weights into ``model``, sharded or not; every rank passes the same ``state``.

    FSDP2: ``set_model_state_dict`` shards them. ZeRO-3: parameters are partitioned (``load_state_dict`` would see
    empty placeholders and fail on their sizes), so they are gathered a bucket at a time, filled from ``state`` and
    partitioned back; a key ``state`` lacks, or one ``model`` lacks, is an error as with a strict load.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers())
        names = list(model.state_dict().keys())
        missing = [n for n in names if n not in state]
        unexpected = [n for n in state if n not in params and n not in buffers]
        if missing or unexpected:
            raise RuntimeError(f"load_full_state: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")

        def full_bytes(p):
            return 0 if p is None else (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()

        entries = [(n, params.get(n)) for n in names]
        with torch.no_grad():
            for bucket in _buckets(entries, bucket_bytes, full_bytes):
                group = list({id(p): p for _, p in bucket if p is not None}.values())
                with deepspeed.zero.GatheredParameters(group, modifier_rank=0):
                    for n, p in bucket:
                        target = buffers[n] if p is None else p
                        target.copy_(state[n].to(device=target.device, dtype=target.dtype))
        return
    model.load_state_dict(state)


@contextmanager
def gradient_sync(module, sync: bool):
    """Backward passes inside add their gradients without communicating unless ``sync``: the last micro-batch of an
    optimizer step syncs what all of them accumulated. DDP (Lightning wraps the whole LightningModule): ``no_sync``.
    FSDP2 with ``gradient_sync: step``: ``set_requires_gradient_sync(False)`` on each sharded model. DeepSpeed manages
    its own accumulation boundary (``HFDeepSpeedStrategy``); nothing changes there or without a strategy."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if sync or strategy is None:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    wrapped = getattr(strategy, "model", None)
    if isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
        return
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "gradient_sync", "micro_batch") == "step":
        models = [m for m in (module.actor, module.critic) if hasattr(m, "set_requires_gradient_sync")]
        for m in models:
            m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for m in models:
                m.set_requires_gradient_sync(True)
        return
    yield


@contextmanager
def gathered_for_init(module: nn.Module):
    """Let in-place initialisation of ``module``'s parameters take effect under ZeRO-3.

    Inside ``deepspeed.zero.Init`` (Lightning's ZeRO-3 ``configure_model``) parameters are partitioned when
    created, so ``nn.init.zeros_(head.weight)`` writes into an empty placeholder and the head keeps its
    random init. This gathers them, and rank 0's values are partitioned back on exit. No-op otherwise.
    """
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over every rank: Lightning's ``ModelParallelStrategy`` with the mesh data-parallel
    training needs whatever the device count.

    Lightning's ``data_parallel_size="auto"`` means "the number of nodes" (it expects tensor parallelism inside a
    node), so ``ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)`` fails its
    "dp x tp = world size" check as soon as a node has two devices. vapo-pl applies no tensor-parallel plan to the
    trainer's models (the rollout engine has its own ``data.engine.tensor_parallel_size``), so here the
    data-parallel dimension is always the whole world and the tensor-parallel one has size 1.

    Args:
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory (FSDP2's
            ``CPUOffloadPolicy``); the GPU holds only the layers being computed. For models whose sharded training
            state does not fit next to the rollout engine (the 32B config; see ``vapo-pl plan``).
        gradient_sync: ``step`` (default): gradients are reduce-scattered once per optimizer step, on the last
            micro-batch's backward; the earlier micro-batches accumulate unsharded gradients locally (one reduce-scatter
            instead of one per micro-batch, at the cost of holding every layer's full gradient between micro-batches).
            ``micro_batch``: reduce-scatter after every micro-batch's backward, so gradients stay sharded (for models
            whose full gradient does not fit on one GPU).
        save_distributed_checkpoint, process_group_backend, timeout: Lightning's.
    """

    def __init__(self, cpu_offload: bool = False, gradient_sync: str = "step", save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        from torch.distributed.constants import default_pg_timeout

        if gradient_sync not in ("step", "micro_batch"):
            raise ValueError(f"trainer.strategy.gradient_sync must be 'step' or 'micro_batch', got {gradient_sync!r}")
        if not isinstance(cpu_offload, bool):
            raise ValueError(f"trainer.strategy.cpu_offload must be true or false, got {cpu_offload!r}")  # noqa: TRY004
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout or default_pg_timeout)
        self.cpu_offload = cpu_offload
        self.gradient_sync = gradient_sync

    def setup_environment(self) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator

        if self.cpu_offload and isinstance(self.accelerator, CPUAccelerator):
            raise ValueError("trainer.strategy.init_args.cpu_offload: FSDP2 offloads from GPUs to the host; on CPU "
                             "the states are in host memory already, set it to false")
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class _ZeRO3Config:
    """All that ``transformers`` reads of a live ``HfDeepSpeedConfig``: ``is_zero3()`` and ``config``.
    The real class also insists on ``accelerate`` being installed, which nothing else here needs."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


class HFDeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` for Hugging Face models; also runs on CPU (DeepSpeed's CPU backend).

    Same arguments as Lightning's. Four departures, all found by running it (``tests/distributed``):

    - ZeRO-3 loading: Lightning builds the model inside ``deepspeed.zero.Init``, so every parameter is
      partitioned the moment it is created. ``transformers`` loads a checkpoint into partitioned parameters
      only when it knows ZeRO-3 is on (an ``HfDeepSpeedConfig`` registered); otherwise ``from_pretrained``
      fails in its weight init (``IndexError: index 0 is out of bounds for dimension 0 with size 0``). This
      strategy registers the config from model construction until ``teardown``.
    - CPU: Lightning refuses any accelerator but CUDA (``RuntimeError: The DeepSpeed strategy is only
      supported on CUDA GPUs``), requires CUDA device indices (``The selected device indices [None, None]
      don't match the local rank values``) and hands DeepSpeed ``device_rank=None`` (``TypeError: '>='
      not supported between instances of 'NoneType' and 'int'``). DeepSpeed itself supports CPU; on CPU
      this strategy uses the local rank where Lightning used the CUDA index. On GPUs nothing changes.
    - Gradient accumulation: ``managed_gradient_accumulation: false`` unless the config says otherwise
      (see ``setup``). With DeepSpeed's default, ZeRO-2 applied about half the gradient of a two-micro-batch
      step (only the last micro-batch survives).
    - Micro-steps: DeepSpeed ends a micro-step at each ``DeepSpeedEngine.forward``, which Lightning calls
      once per ``training_step``; this strategy ends one before every backward instead (``pre_backward``).
      Without it ZeRO-3 kept only the last micro-batch's gradient of each optimizer step.
    """

    _hf_config = None  # what transformers sees as the HfDeepSpeedConfig (it keeps only a weak reference)

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(self.accelerator, CPUAccelerator):
            DDPStrategy.setup_environment(self)  # Lightning's own, minus the CUDA-only check
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def setup(self, trainer) -> None:
        self._init_config_if_needed()
        # VAPOModule runs several backward passes (micro-batches) per optimizer step. DeepSpeed's default
        # ("managed") accumulation counts one backward per step when gradient_accumulation_steps is 1, and
        # ZeRO-2 then keeps only the last micro-batch's gradient; unmanaged, every step() is the boundary.
        self.config.setdefault("managed_gradient_accumulation", False)
        super().setup(trainer)

    def pre_backward(self, closure_loss) -> None:
        super().pre_backward(closure_loss)
        # DeepSpeed closes a micro-step in DeepSpeedEngine.forward (clear_backward_seen_flag); Lightning calls
        # that forward once per training_step, but VAPOModule runs one forward/backward per micro-batch
        # inside it. Without this, ZeRO-3 overwrites instead of accumulating the micro-batch gradients.
        optimizer = getattr(self.model, "optimizer", None)
        if hasattr(optimizer, "clear_backward_seen_flag"):
            optimizer.clear_backward_seen_flag()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import argparse

        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    @contextmanager
    def model_sharded_context(self):
        if self.zero_stage_3 and self._hf_config is None:
            from transformers.integrations.deepspeed import set_hf_deepspeed_config

            self._init_config_if_needed()
            self._hf_config = _ZeRO3Config(self.config)
            set_hf_deepspeed_config(self._hf_config)
        with super().model_sharded_context():
            yield

    def teardown(self) -> None:
        super().teardown()
        if self._hf_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # later models in this process are not built for ZeRO-3
            self._hf_config = None
