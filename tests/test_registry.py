"""A fourth projection is one class, registered by name; the optimizer loop does not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, Projection, available_projections, get_projection, register_projection
from lora_optim.projections import unregister_projection
from lora_optim.options import Option, real


class FrozenBProjection(Projection):
    """LoRA-FA: ``B`` is a fixed random matrix, only ``A`` trains (``ΔW = A·B``)."""

    name = "test-lora-fa"
    options = (Option("fa_bound", 0.5, real(0.0, inclusive=False), doc="bound of the fixed B"),)

    def init_state(self, weight, rank, seed, factor_dtype, group):
        gen = torch.Generator().manual_seed(seed)
        B = (torch.rand(rank, weight.shape[1], generator=gen, dtype=factor_dtype) * 2 - 1) * group["fa_bound"]
        return {"A": torch.zeros(weight.shape[0], rank, dtype=factor_dtype), "B": B}

    def current_factors(self, state, group):
        return state["A"], state["B"]

    def project(self, grad, A, B):
        return grad @ B.t(), torch.zeros_like(B)

    def add_delta_(self, target, change, scale, row_start=0):
        rows = slice(row_start, row_start + target.shape[0])
        target.add_(change.dA[rows] @ change.B, alpha=scale)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_projection(FrozenBProjection)
    yield
    unregister_projection(FrozenBProjection.name)


def test_new_variant_trains_through_the_unchanged_loop():
    assert "test-lora-fa" in available_projections()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 2, (30,))
    opt = LoRAAdam(model.parameters(), rank=2, projection="test-lora-fa", fa_bound=0.25, lr=3e-2)
    assert opt.param_groups[0]["fa_bound"] == 0.25
    B0 = opt.get_factors(model[0].weight)[1]
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(opt.get_factors(model[0].weight)[1], B0)  # B never trained
    assert B0.abs().max() <= 0.25


def test_variant_options_are_validated_per_group():
    weight = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="fa_bound"):
        LoRAAdam([weight], projection="test-lora-fa", fa_bound=-1.0)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown projection 'nope'.*additive"):
        get_projection("nope")
    with pytest.raises(TypeError, match="Projection subclass"):
        register_projection(int)

    class Clash(FrozenBProjection):
        name = "lora"

    with pytest.raises(ValueError, match="already registered"):
        register_projection(Clash)
    with pytest.raises(TypeError, match="unexpected keyword"):
        LoRAAdam([nn.Parameter(torch.zeros(2, 2))], resample_evry=3)
