"""The per-rank side of ``tests/test_distributed.py``: started by ``torch.multiprocessing.spawn``
with the gloo backend on the CPU; writes what each rank saw to ``<out>/<scenario>-rank<k>.pt``.

Every scenario trains the same float64 model as the test's single-process reference: rank ``k``
gets rows ``k::world`` of each batch, so that averaging over the ranks (DDP, FSDP2's
reduce-scatter) gives the gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_optim import LoRAAdam  # noqa: E402

# (name, optimizer options): every projection; random with stored factors; the precision modes.
CASES = {
    "lora": dict(projection="lora"),
    "lora-symmetric": dict(projection="lora", init="symmetric"),
    "random": dict(projection="random"),
    "random-K3-reset": dict(projection="random", resample_every=3, moment_rule="reset"),
    "additive": dict(projection="additive"),
    "lora-compensated": dict(projection="lora", precision="compensated"),
    "lora-stochastic": dict(projection="lora", precision="stochastic"),
    "lora-sparse": dict(projection="lora", preserve_sparsity=True),
}
STEPS = 4
DCP_CASES = ["lora", "random", "additive", "lora-compensated"]


class Net(nn.Module):
    """Out dims 7, 5, 3: not divisible by 2 (uneven shards); a rank-4 factor over 3 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 7), nn.Linear(7, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_model() -> Net:
    """The model, with a third of each weight's entries exactly zero (for ``preserve_sparsity``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net().double()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            layer.weight[:, ::3] = 0
    return model


def batches(count: int = STEPS + 4, rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (rows,), generator=generator)) for _ in range(count)]


def make_optimizer(model: nn.Module, options: dict) -> LoRAAdam:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return LoRAAdam([{"params": weights, "rank": 4, "alpha": 8.0, "weight_decay": 0.1},
                     {"params": biases, "rank": None, "weight_decay": 0.01}],
                    lr=2e-2, betas=(0.9, 0.99), seed=5, **options)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([full(p.detach()).reshape(-1) for p in model.parameters()])


def train(model: nn.Module, optimizer: LoRAAdam, data, rank: int, world: int, first: int = 0, steps: int = STEPS,
          before_step=None) -> list[torch.Tensor]:
    trajectory = []
    for index in range(first, first + steps):
        x, y = data[index]
        F.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(flat_params(model))
    return trajectory


def state_snapshot(optimizer: LoRAAdam, model: nn.Module) -> dict:
    """Whole state tensors (gathered from the shards), ints, and the local sizes of each tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    snapshot = {}
    for p, state in optimizer.state.items():
        entry = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                entry[key] = full(value).clone()
                entry[key + ":local_numel"] = (value.to_local() if hasattr(value, "to_local") else value).numel()
            else:
                entry[key] = value
        snapshot[names[id(p)]] = entry
    return snapshot


def scenario_ddp(rank: int, world: int, mode: str) -> dict:
    results = {}
    data = batches()
    for name, options in CASES.items():
        model = make_model()
        optimizer = make_optimizer(model, options)
        if mode == "activation":
            optimizer.attach(model)  # before wrapping: DDP leaves the attached weights out
        ddp = nn.parallel.DistributedDataParallel(model)
        results[name] = {"trajectory": train(ddp, optimizer, data, rank, world), "state": state_snapshot(optimizer, model)}
    return results


def scenario_ddp_per_layer(rank: int, world: int) -> dict:
    model = make_model()
    optimizer = make_optimizer(model, {})
    try:
        optimizer.enable_per_layer()
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer)
    fully_shard(model)
    return model


def scenario_fsdp(rank: int, world: int, mode: str = "plain") -> dict:
    results = {}
    data = batches()
    for name, options in CASES.items():
        model = shard(make_model())
        optimizer = make_optimizer(model, options)
        if mode == "activation":
            handle = optimizer.attach(model)  # after fully_shard: the weights are DTensors
            if handle.fallback:
                raise AssertionError(f"fell back to G: {handle.fallback}")
        results[name] = {"trajectory": train(model, optimizer, data, rank, world),
                         "state": state_snapshot(optimizer, model)}
    if mode == "activation":
        return results
    # What is refused on sharded weights, before anything changes.
    model = shard(make_model())
    optimizer = make_optimizer(model, {"drift_probes": 2})
    F.cross_entropy(model(data[0][0][rank::world]), data[0][1][rank::world]).backward()
    try:
        optimizer.step()
        results["refused"] = None
    except ValueError as error:
        results["refused"] = str(error)
    refusals = {}
    model = shard(make_model())
    optimizer = make_optimizer(model, {"max_grad_norm": 1.0})
    F.cross_entropy(model(data[0][0][rank::world]), data[0][1][rank::world]).backward()
    before = flat_params(model)
    try:
        optimizer.step()
    except ValueError as error:
        refusals["max_grad_norm"] = (str(error), torch.equal(before, flat_params(model)))
    optimizer = make_optimizer(model, {})
    for what in ("set_factors", "merge_factors"):
        before = flat_params(model)
        try:
            getattr(optimizer, what)(model.fc1.weight, torch.zeros(7, 4), torch.zeros(4, 6))
        except ValueError as error:
            refusals[what] = (str(error), torch.equal(before, flat_params(model)))
    results["refusals"] = refusals
    return results


def scenario_dcp_save(rank: int, world: int, checkpoint: str) -> dict:
    """FSDP2 on ``world`` ranks: train, save model and optimizer through DCP, train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    results = {}
    data = batches()
    for name in DCP_CASES:
        model = shard(make_model())
        optimizer = make_optimizer(model, CASES[name])
        train(model, optimizer, data, rank, world, steps=2)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(checkpoint, name))
        results[name] = train(model, optimizer, data, rank, world, first=2, steps=2)
    return results


def scenario_dcp_load(rank: int, world: int, checkpoint: str) -> dict:
    """FSDP2 on ``world`` ranks: load a DCP checkpoint (made on another number of ranks), train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results = {}
    data = batches()
    for name in DCP_CASES:
        model = shard(make_model())
        optimizer = make_optimizer(model, CASES[name])
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, name))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        results[name] = train(model, optimizer, data, rank, world, first=2, steps=2)
    return results


def main(rank: int, world: int, rendezvous: str, out: str, scenario: str, extra: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to race for with other jobs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        if scenario in ("ddp-plain", "ddp-activation"):
            result = scenario_ddp(rank, world, scenario.split("-")[1])
        elif scenario == "ddp-per_layer":
            result = scenario_ddp_per_layer(rank, world)
        elif scenario == "fsdp":
            result = scenario_fsdp(rank, world)
        elif scenario == "fsdp-activation":
            result = scenario_fsdp(rank, world, "activation")
        elif scenario == "dcp-save":
            result = scenario_dcp_save(rank, world, extra)
        elif scenario == "dcp-load":
            result = scenario_dcp_load(rank, world, extra)
        else:
            raise ValueError(scenario)
        torch.save(result, os.path.join(out, f"{scenario}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
