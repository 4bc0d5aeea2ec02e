"""LoRAAdam against explicit graph twins trained by torch.optim.AdamW, float64, step by step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam
from twins import GraphTwin, additive_delta, lora_delta

STEPS = 100
TOL = 1e-10


class ConvNet(nn.Module):
    """A Conv2d followed by a Linear stack: both 4-D and 2-D weights are factorised."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _setup(projection: str, **options):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ConvNet().double()
    ours = copy.deepcopy(model)
    x = torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=gen)
    named = dict(ours.named_parameters())
    groups = [
        {"names": ["conv.weight", "fc1.weight"], "rank": 3, "alpha": 6.0, "lr": 2e-2, "weight_decay": 0.1},
        {"names": ["fc2.weight", "fc3.weight"], "rank": 2, "alpha": 2.0, "lr": 1e-2, "weight_decay": 0.05},
        {"names": ["conv.bias", "fc1.bias", "fc2.bias", "fc3.bias"], "rank": None, "lr": 1e-2, "weight_decay": 0.01},
    ]
    opt = LoRAAdam(
        [{"params": [named[n] for n in g["names"]], **{k: v for k, v in g.items() if k != "names"}} for g in groups],
        projection=projection, betas=(0.9, 0.99), eps=1e-8, **options,
    )
    factors = {}
    for group in groups[:2]:
        for name in group["names"]:
            A, B = opt.get_factors(named[name])
            factors[name] = (A, B, group["alpha"] / group["rank"])
    twin_groups = [{"names": g["names"], "lr": g["lr"], "weight_decay": g["weight_decay"], "betas": (0.9, 0.99),
                    "eps": 1e-8} for g in groups]
    delta = additive_delta if projection == "additive" else lora_delta
    twin = GraphTwin(model, factors, groups[2]["names"], twin_groups, delta=delta)
    loss_fn = lambda logits: nn.functional.cross_entropy(logits, y)  # noqa: E731
    return ours, opt, twin, loss_fn, x, named, factors


@pytest.mark.parametrize(
    "projection,options",
    [("lora", {}), ("lora", {"init": "symmetric"}), ("additive", {})],
    ids=["lora-peft-init", "lora-symmetric", "additive"],
)
def test_matches_graph_twin_step_by_step(projection, options):
    ours, opt, twin, loss_fn, x, named, factors = _setup(projection, **options)
    first_loss = None
    for step in range(STEPS):
        loss = loss_fn(ours(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        twin_loss = twin.step(loss_fn, x)
        first_loss = twin_loss if first_loss is None else first_loss
        assert abs(loss.item() - twin_loss) <= TOL * abs(twin_loss), (step, loss.item(), twin_loss)
        weights = twin.weights()
        for name, param in named.items():
            assert _rel(param, weights[name]) <= TOL, (step, name, _rel(param, weights[name]))
            if name in factors:
                base = twin.base[name]
                learnt = _rel(param - base, weights[name] - base)
                # the learnt change itself, not just W, agrees (zero at step 0 for the PEFT init)
                assert learnt <= 1e-9 or (weights[name] - base).norm() == 0, (step, name, learnt)
                A, B = opt.get_factors(param)
                assert _rel(A, twin.A[name]) <= 1e-9 and _rel(B, twin.B[name]) <= 1e-9, (step, name)
    assert twin_loss < 0.8 * first_loss  # it trained
