"""Bad arguments raise ValueError/TypeError naming the argument and the value, and change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam


def _weight():
    return nn.Parameter(torch.ones(4, 3))


CASES = [
    (dict(lr=-1.0), ValueError, r"lr.*-1\.0"),
    (dict(betas=(1.0, 0.999)), ValueError, r"beta.*1\.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"beta.*-0\.1"),
    (dict(eps=0.0), ValueError, r"eps.*0\.0"),
    (dict(weight_decay=-0.5), ValueError, r"weight_decay.*-0\.5"),
    (dict(rank=0), ValueError, r"rank.*0"),
    (dict(rank=2.5), ValueError, r"rank.*2\.5"),
    (dict(rank=True), ValueError, r"rank.*True"),
    (dict(alpha=0.0), ValueError, r"alpha.*0\.0"),
    (dict(projection="svd-typo"), ValueError, r"projection.*svd-typo"),
    (dict(precision="fp8-magic"), ValueError, r"precision.*fp8-magic"),
    (dict(projection="random", resample_every=0), ValueError, r"resample_every.*0"),
    (dict(projection="random", moment_rule="forget"), ValueError, r"moment_rule.*forget"),
    (dict(init="orthogonal"), ValueError, r"init.*orthogonal"),
    (dict(seed=-3), ValueError, r"seed.*-3"),
]


@pytest.mark.parametrize("kwargs,error,pattern", CASES, ids=[next(iter(c[0])) + "=" + repr(c[0][next(iter(c[0]))]) for c in CASES])
def test_bad_constructor_arguments(kwargs, error, pattern):
    weight = _weight()
    with pytest.raises(error, match=pattern):
        LoRAAdam([weight], **kwargs)
    assert torch.equal(weight, torch.ones(4, 3))


def test_bad_group_leaves_optimizer_unchanged():
    opt = LoRAAdam([_weight()], rank=2)
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [_weight()], "rank": -1})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="no params"):
        opt.add_param_group({"params": []})
    weight = opt.param_groups[0]["params"][0]
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [weight]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_non_real_float_parameters_are_rejected(dtype):
    tensor = torch.zeros(3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).split(".")[-1]):
        LoRAAdam([tensor])


def test_sparse_gradients_are_rejected_before_any_change():
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = LoRAAdam(emb.parameters(), rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)
