"""Shared setup of the per-layer and activation-side mode tests.

The oracle is :class:`LoRAAdam` in the plain mode (``G`` in ``p.grad``, projected in ``step()``),
itself checked against graph twins in ``test_graph_twins.py``. The same float64 model, seeds and
micro-batches are trained in another mode and compared after every step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from lora_optim import LoRAAdam, available_projections

TOL = 1e-10



def runs_without_full_gradient(name: str) -> bool:
    """Whether projection ``name`` (default options) can take its first step from projected
    pieces: a projection whose factors come from the step's full ``G`` (``svd``) raises
    ``ValueError`` in the per-layer and activation-side modes (tested in its own file), and is
    left out of the mode-equality cases below. Decided by trying, not by name."""
    weight = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    optimizer = LoRAAdam([weight], rank=1, projection=name)
    try:
        optimizer.accumulate_grad_(weight, torch.ones(3, 2, dtype=torch.float64))
    except ValueError:
        return False
    return True


#: Projections the per-layer and activation-side modes can drive from the first step.
MODE_PROJECTIONS = [name for name in available_projections() if runs_without_full_gradient(name)]

#: Every such projection with its defaults, plus option sets that change when factors are
#: drawn or stored (``random`` with stored factors and each moment rule).
PROJECTION_CASES = [(name, {}) for name in MODE_PROJECTIONS] + [
    ("lora", {"init": "symmetric"}),
    ("random", {"resample_every": 2, "moment_rule": "transport"}),
    ("random", {"resample_every": 3, "moment_rule": "reset"}),
]
PROJECTION_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in PROJECTION_CASES]


class Net(nn.Module):
    """Linear layers with biases; ``shared`` applies the square layer twice (weight sharing)."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.fc1 = nn.Linear(7, 12)
        self.fc2 = nn.Linear(12, 9)
        self.square = nn.Linear(9, 9)
        self.fc3 = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        h = torch.tanh(self.square(h))
        if self.shared:
            h = torch.tanh(self.square(h))
        return self.fc3(h)


class ConvNet(nn.Module):
    """A Conv2d (not handled by the activation-side mode) before Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.fc1 = nn.Linear(3 * 3 * 3, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def make_model(kind: str = "net") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = {"net": Net, "shared": lambda: Net(shared=True), "conv": ConvNet}[kind]()
    return model.double()


def make_batches(kind: str, count: int = 6, rows: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (rows, 2, 5, 5) if kind == "conv" else (rows, 3, 7)  # 3-D inputs: tokens per row
    batches = []
    for _ in range(count):
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 4, (rows, 3) if kind != "conv" else (rows,), generator=generator)
        batches.append((x, y))
    return batches


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(model: nn.Module, projection: str = "lora", **options) -> LoRAAdam:
    """Low-rank group for every matrix (rank 3, alpha 6, weight decay), dense group for biases."""
    weights = [p for p in model.parameters() if p.ndim >= 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    return LoRAAdam(
        [{"params": weights, "rank": 3, "alpha": 6.0, "weight_decay": 0.1},
         {"params": biases, "rank": None, "weight_decay": 0.01}],
        lr=2e-2, betas=(0.9, 0.99), projection=projection, seed=3, **options,
    )


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def train(model: nn.Module, optimizer: LoRAAdam, batches, *, steps: int = 4, micro_batches: int = 1,
          schedule: bool = True, first_batch: int = 0) -> list[torch.Tensor]:
    """The usual loop: ``micro_batches`` backward passes of ``loss / micro_batches``, ``step``,
    ``zero_grad``, an LR scheduler step (lr halves, then a third, ...). Parameters after each step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t)) if schedule else None
    trajectory = []
    index = first_batch
    for _ in range(steps):
        for _ in range(micro_batches):
            (loss_fn(model, batches[index % len(batches)]) / micro_batches).backward()
            index += 1
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(flat(model))
    return trajectory


def twin_runs(kind: str, projection: str, options: dict):
    """Two identical ``(model, optimizer)`` pairs: one for the plain mode, one for the mode under test."""
    model = make_model(kind)
    other = copy.deepcopy(model)
    return (model, make_optimizer(model, projection, **options)), (other, make_optimizer(other, projection, **options))
