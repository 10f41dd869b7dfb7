"""Building the trainer's models without holding a whole copy on any rank.

Under FSDP2 every rank used to build actor, critic and reference model whole, in float32, on the CPU, and only then
shard them: for a 32B actor and critic that is about 262 GB of host memory per rank. Here the models are built with
their parameters on the meta device (``parameters_on_meta``: shapes only; buffers such as the rotary frequencies stay
real), sharded while still empty, and then ``materialize`` gives every parameter its local shard and reads exactly
that shard's rows from the checkpoint's safetensors files (``SafetensorsFile``, positioned reads rather than a memory
map): each rank reads and holds about 1/N of each weight.

What a model needs to be filled this way is a ``CheckpointSource`` (set by ``empty_from_pretrained``): where its
safetensors files are and how its parameter names map to the file's keys. Parameters that are not on the meta device
(a critic's new value head, drawn from the seed) keep their values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

SOURCE_ATTR = "_vapo_checkpoint_source"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside goes to the meta device (buffers do not): a model built here costs no
    memory for its weights, and its non-persistent buffers (computed in ``__init__``) are real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass
class CheckpointSource:
    """The safetensors files a module's meta parameters are filled from.

    ``prefixes``: tried in order before a parameter's name to find its key (``""`` first; a bare backbone built from
    a causal-LM checkpoint finds ``layers.0...`` under ``model.``). ``renames``: explicit keys for some parameter
    names; a name mapped to ``None`` is filled with zeros."""

    path: Path
    prefixes: tuple[str, ...] = ("",)
    renames: dict[str, str | None] = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        """Tensor key -> the file that holds it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.path / f for k, f in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json (sharded "
                                    "loading reads safetensors checkpoints only)")
        f = SafetensorsFile(single)
        f.close()
        return dict.fromkeys(f.header, single)

    def key_for(self, name: str, keys: dict[str, Path]) -> str | None:
        if name in self.renames:
            return self.renames[name]
        if ".lora_" in name:  # a LoRA adapter (``vapo_pl.lora``): not in the base checkpoint, initialised after
            return None
        if ".base_layer." in name:  # the base weight of a LoRA-adapted projection, under its checkpoint name
            name = name.replace(".base_layer.", ".")
        for prefix in self.prefixes:
            key = f"{prefix}{name}"
            if key in keys:
                return key
        raise KeyError(f"{self.path}: the checkpoint has no tensor for parameter {name!r} (tried "
                       f"{[p + name for p in self.prefixes]})")


def empty_from_pretrained(auto_class, path: str | Path, dtype: torch.dtype, prefixes: tuple[str, ...] | None = None,
                          **kwargs) -> nn.Module:
    """``auto_class.from_config`` of ``path``'s config with its parameters on the meta device and a
    ``CheckpointSource`` attached, to be sharded and then filled by ``materialize``. ``kwargs`` go to the config
    (e.g. ``num_labels``) or, for ``attn_implementation``, to ``from_config``."""
    from transformers import AutoConfig

    attn = kwargs.pop("attn_implementation", None)
    config = AutoConfig.from_pretrained(str(path), **kwargs)
    extra = {} if attn is None else {"attn_implementation": attn}
    with parameters_on_meta():
        model = auto_class.from_config(config, dtype=dtype, **extra)
    if prefixes is None:
        base = getattr(model, "base_model_prefix", "")
        # a head model's names already carry the prefix; a bare backbone's are found under it
        prefixes = ("", f"{base}.") if base and not hasattr(model, base) else ("",)
    setattr(model, SOURCE_ATTR, CheckpointSource(Path(path), prefixes))
    return model


def has_meta_parameters(model: nn.Module) -> bool:
    return any(_local(p).is_meta for p in model.parameters())


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_slices(p: Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of ``p`` in the full tensor (everything for a tensor held whole)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """Reads parts of tensors from one safetensors file with positioned reads (``os.pread``), not a memory map: a
    mapped file's pages count in the reading process's resident memory for as long as the map lives, so reading
    1/N of every tensor through a map still showed most of the file in each rank's RSS."""

    def __init__(self, path: Path) -> None:
        import os

        self.fd = os.open(path, os.O_RDONLY)
        header_len = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        self.header = json.loads(os.pread(self.fd, header_len, 8))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_len

    def close(self) -> None:
        import os

        os.close(self.fd)

    def read(self, key: str, index: tuple[slice, ...]) -> Tensor:
        """``tensor[index]`` for slices along the first dimension only (the others whole), as FSDP2 shards."""
        import os

        entry = self.header[key]
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        begin, _ = entry["data_offsets"]
        if any(s != slice(0, n) for s, n in zip(index[1:], shape[1:])):
            raise ValueError(f"{key}: only the first dimension can be sliced, got {index}")
        rows = index[0] if index else slice(0, 1)
        row_bytes = torch.tensor([], dtype=dtype).element_size() * math.prod(shape[1:])
        count = max(0, rows.stop - rows.start) if shape else 1
        buf = bytearray(count * row_bytes)
        if buf:
            view, offset, done = memoryview(buf), self.data_start + begin + rows.start * row_bytes, 0
            while done < len(buf):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"{key}: short read from the checkpoint")
                done += n
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return flat.view([count, *shape[1:]] if shape else [])


def materialize(model: nn.Module, device: torch.device, on_read: Callable[[str, int], None] | None = None) -> None:
    """Allocate ``model``'s meta parameters on ``device`` (each rank its shard, when sharded) and fill them from the
    ``CheckpointSource`` of the module that owns them; everything that was real keeps its value. ``on_read(key,
    bytes)`` is told of every read (for tests and measurements)."""
    sources = [(prefix, m, getattr(m, SOURCE_ATTR)) for prefix, m in model.named_modules() if hasattr(m, SOURCE_ATTR)]
    meta = {name for name, p in model.named_parameters() if _local(p).is_meta}
    if not meta:
        return
    kept = {name: _local(t).detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if name not in meta}
    model.to_empty(device=device)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for name, value in kept.items():
            _local(state[name]).copy_(value)
        with ExitStack() as stack:
            handles: dict[Path, SafetensorsFile] = {}
            for owner_prefix, _owner, source in sorted(sources, key=lambda s: -len(s[0])):
                keys = source.files()
                base = f"{owner_prefix}." if owner_prefix else ""
                for name in sorted(n for n in meta if n.startswith(base)):
                    key = source.key_for(name[len(base):], keys)
                    p = state[name]
                    local = _local(p)
                    if key is None:
                        local.zero_()
                    else:
                        if keys[key] not in handles:
                            handles[keys[key]] = SafetensorsFile(keys[key])
                            stack.callback(handles[keys[key]].close)
                        piece = handles[keys[key]].read(key, _shard_slices(p))
                        local.copy_(piece.to(local.dtype))
                        if on_read is not None:
                            on_read(key, piece.numel() * piece.element_size())
                    meta.discard(name)
    if meta:
        raise RuntimeError(f"materialize: no checkpoint source for parameters {sorted(meta)[:5]}")
