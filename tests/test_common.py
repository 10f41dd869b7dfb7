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
