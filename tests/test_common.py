"""``vapo_pl.common.fp32_forward``: a Linear that stays float32 under bf16 autocast, copy-safe."""

from __future__ import annotations

import copy

import torch

from vapo_pl.common import fp32_forward


def test_fp32_linear_under_autocast_and_after_deepcopy():
    torch.manual_seed(0)
    plain, patched = torch.nn.Linear(8, 3), fp32_forward(torch.nn.Linear(8, 3))
    patched.load_state_dict(plain.state_dict())
    x = torch.randn(5, 8)
    reference = plain(x)  # float32, outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(x).dtype == torch.bfloat16
        out = patched(x)
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    assert fp32_forward(patched) is patched and list(patched.state_dict()) == ["weight", "bias"]
    # a deep copy computes with its own weights, not the original's
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    assert torch.count_nonzero(twin(x)) == 0 and torch.count_nonzero(patched(x)) > 0


def test_collective_device_is_the_one_the_backend_serves(monkeypatch):
    """NCCL serves CUDA tensors only: the collective helpers must put their tensors on the current accelerator under
    it (a CPU tensor there fails with "No backend type associated with device type cpu"), and on the CPU under gloo
    or a mixed "cpu:gloo,cuda:nccl" group. No NCCL here: the backend name and the accelerator are stood in for."""
    import torch.distributed as dist

    from vapo_pl import common

    class Accelerator:
        type = "cuda"

    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: Accelerator())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 3)
    for backend, expected in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                              ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert common.collective_device() == expected, backend


def test_helpers_reduce_on_the_collective_device(monkeypatch):
    """``sum_across_ranks``/``max_across_ranks`` ask ``collective_device()`` where the collective's tensor must be and
    hand the collective a tensor there (the CPU stands in for the GPU here), giving the caller its own device back.
    The 2-rank group is stood in for (the real ones run in ``tests/launch``)."""
    import torch.distributed as dist

    from vapo_pl import common

    asked, seen = [], []

    def all_reduce(t, op=None, group=None):
        seen.append(t.device)
        t.mul_(2)

    def device(group=None):
        asked.append(group)
        return torch.device("cpu")

    monkeypatch.setattr(common, "world", lambda: (0, 2))
    monkeypatch.setattr(common, "collective_device", device)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    x = torch.ones(3)
    assert torch.equal(common.sum_across_ranks(x), torch.full((3,), 2.0)) and torch.equal(x, torch.ones(3))
    assert common.max_across_ranks(4) == 8
    assert len(asked) == 2 and seen == [torch.device("cpu")] * 2
