"""Bad arguments: one table.

Every row raises ``ValueError`` or ``TypeError`` whose message names the argument and the
offending value, at construction where possible (group options also through
``add_param_group``, sparse gradients at ``step``), and leaves every parameter, gradient, param
group and optimizer state exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam

NAN, INF = float("nan"), float("inf")

# (options, error, pattern): group options, each tried in the constructor and in add_param_group.
BAD_OPTIONS = [
    (dict(lr=-1.0), ValueError, r"lr.*-1\.0"),
    (dict(lr=NAN), ValueError, r"lr.*nan"),
    (dict(lr="fast"), ValueError, r"lr.*'fast'"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"lr.*shape \(2,\)"),
    (dict(betas=(1.0, 0.999)), ValueError, r"beta.*1\.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"beta.*-0\.1"),
    (dict(betas=(0.9, NAN)), ValueError, r"beta.*nan"),
    (dict(betas=(0.9,)), ValueError, r"betas.*\(0\.9,\)"),
    (dict(betas=0.9), ValueError, r"betas.*0\.9"),
    (dict(eps=0.0), ValueError, r"eps.*0\.0"),
    (dict(eps=-1e-8), ValueError, r"eps.*-1e-08"),
    (dict(eps=NAN), ValueError, r"eps.*nan"),
    (dict(weight_decay=-0.5), ValueError, r"weight_decay.*-0\.5"),
    (dict(weight_decay=NAN), ValueError, r"weight_decay.*nan"),
    (dict(rank=0), ValueError, r"rank.*0"),
    (dict(rank=-2), ValueError, r"rank.*-2"),
    (dict(rank=2.5), ValueError, r"rank.*2\.5"),
    (dict(rank=True), ValueError, r"rank.*True"),
    (dict(rank="8"), ValueError, r"rank.*'8'"),
    (dict(alpha=0.0), ValueError, r"alpha.*0\.0"),
    (dict(alpha=-1.0), ValueError, r"alpha.*-1\.0"),
    (dict(alpha=INF), ValueError, r"alpha.*inf"),
    (dict(alpha=NAN), ValueError, r"alpha.*nan"),
    (dict(projection="svd-typo"), ValueError, r"projection.*'svd-typo'"),
    (dict(projection=3), ValueError, r"projection.*3"),
    (dict(precision="fp8-magic"), ValueError, r"precision.*'fp8-magic'"),
    (dict(precision=16), ValueError, r"precision.*16"),
    (dict(projection="random", resample_every=0), ValueError, r"resample_every.*0"),
    (dict(projection="random", resample_every=-1), ValueError, r"resample_every.*-1"),
    (dict(projection="random", resample_every=1.5), ValueError, r"resample_every.*1\.5"),
    (dict(projection="random", resample_every=True), ValueError, r"resample_every.*True"),
    (dict(projection="random", moment_rule="forget"), ValueError, r"moment_rule.*'forget'"),
    (dict(init="orthogonal"), ValueError, r"init.*'orthogonal'"),
    (dict(seed=-3), ValueError, r"seed.*-3"),
    (dict(seed=1.5), ValueError, r"seed.*1\.5"),
    (dict(nonfinite="ignore"), ValueError, r"nonfinite.*'ignore'"),
    (dict(nonfinite=None), ValueError, r"nonfinite.*None"),
    (dict(drift_probes=-1), ValueError, r"drift_probes.*-1"),
    (dict(drift_probes=1.5), ValueError, r"drift_probes.*1\.5"),
    (dict(drift_probes=True), ValueError, r"drift_probes.*True"),
    # Infinite values used to be accepted.
    (dict(lr=INF), ValueError, r"lr.*inf"),
    (dict(lr=torch.tensor(INF)), ValueError, r"lr.*inf"),
    (dict(eps=INF), ValueError, r"eps.*inf"),
    (dict(weight_decay=INF), ValueError, r"weight_decay.*inf"),
    # Options of another projection than the group's used to be accepted and ignored.
    (dict(resample_every=0), ValueError, r"resample_every.*0"),
    (dict(resample_every=2), ValueError, r"resample_every.*random"),
    (dict(projection="random", init="bogus"), ValueError, r"init.*'bogus'"),
    (dict(projection="random", init="symmetric"), ValueError, r"init.*lora"),
    # (additive has its own moment_rule since its index maps can be redrawn: issue 19)
    (dict(projection="additive", refresh_every=5), ValueError, r"refresh_every.*svd"),
    (dict(remap_every=2), ValueError, r"remap_every.*additive"),
    (dict(projection="additive", remap_every=-1), ValueError, r"remap_every.*-1"),
    (dict(update_scale="mup"), ValueError, r"update_scale.*'mup'"),
]


@dataclass
class World:
    """A trained optimizer with state, and spare parameters; everything a bad call could touch."""

    opt: LoRAAdam
    params: list[nn.Parameter]
    spare: list[nn.Parameter] = field(default_factory=list)

    @classmethod
    def make(cls) -> World:
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(5, 4, generator=gen)), nn.Parameter(torch.randn(3, generator=gen))]
        opt = LoRAAdam(params, rank=2, drift_probes=1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        spare = [nn.Parameter(torch.randn(4, 3, generator=gen))]
        spare[0].grad = torch.randn(4, 3, generator=gen)
        return cls(opt, params, spare)

    def snapshot(self) -> dict:
        tensors = [*self.params, *self.spare]
        return {
            "values": [p.detach().clone() for p in tensors],
            "grads": [None if p.grad is None else p.grad.to_dense().clone() for p in tensors],
            "groups": [
                {k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()} for g in self.opt.param_groups
            ],
            "state": {id(p): copy.deepcopy(dict(s)) for p, s in self.opt.state.items()},
        }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # nan options compare equal to themselves


def _ctor(options: dict) -> Callable[[World], None]:
    return lambda world: LoRAAdam(world.spare, **options)


def _group(options: dict) -> Callable[[World], None]:
    return lambda world: world.opt.add_param_group({"params": world.spare, **options})


def _with_sparse_grad(world: World) -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    world.spare.append(embedding.weight)
    world.opt.add_param_group({"params": [embedding.weight]})  # after the dense ones, which have grads too


def _complex(world: World) -> None:
    LoRAAdam([*world.spare, torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)])


def _integer(world: World) -> None:
    world.opt.add_param_group({"params": [torch.zeros(3, 3, dtype=torch.int64)]})


def _in_two_groups(world: World) -> None:
    LoRAAdam([{"params": world.spare}, {"params": world.spare, "lr": 1e-2}])


def _already_in_a_group(world: World) -> None:
    world.opt.add_param_group({"params": [world.params[0]]})


CASES = [
    *[pytest.param(_ctor(o), e, p, id=f"init-{o}") for o, e, p in BAD_OPTIONS],
    *[pytest.param(_group(o), e, p, id=f"group-{o}") for o, e, p in BAD_OPTIONS],
    pytest.param(lambda w: LoRAAdam(w.spare, resample_evry=3), TypeError, r"resample_evry", id="unknown-keyword"),
    pytest.param(lambda w: w.opt.add_param_group({"params": w.spare, "lr_scale": 2.0}), ValueError,
                 r"unknown key.*'lr_scale'", id="unknown-group-key"),
    pytest.param(lambda w: LoRAAdam([{"params": w.spare, "momentum": 0.9}]), ValueError, r"unknown key.*'momentum'",
                 id="unknown-group-key-init"),
    pytest.param((_with_sparse_grad, lambda w: w.opt.step()), TypeError, r"sparse.*layout torch\.sparse_coo",
                 id="sparse-grad"),
    pytest.param(_complex, TypeError, r"params.*dtype torch\.complex64", id="complex-param"),
    pytest.param(_integer, TypeError, r"params.*dtype torch\.int64", id="integer-param"),
    pytest.param(_in_two_groups, ValueError, r"params.*shape \(4, 3\).*more than one parameter group", id="param-in-two-groups"),
    pytest.param(_already_in_a_group, ValueError, r"params.*shape \(5, 4\).*more than one.*group 0", id="param-already-in-a-group"),
    pytest.param(lambda w: LoRAAdam([{"params": []}]), ValueError, r"params.*empty", id="empty-group-init"),
    pytest.param(lambda w: w.opt.add_param_group({"params": []}), ValueError, r"params.*empty", id="empty-group-add"),
    pytest.param(lambda w: LoRAAdam([]), ValueError, r"empty parameter list", id="no-params"),
    pytest.param(lambda w: LoRAAdam([w.spare[0] * 2]), ValueError, r"non-leaf", id="non-leaf-tensor"),
]


@pytest.mark.parametrize("call,error,pattern", CASES)
def test_bad_argument_raises_naming_it_and_changes_nothing(call, error, pattern):
    """``call`` is the bad call, or ``(setup, bad call)``."""
    world = World.make()
    if isinstance(call, tuple):
        setup, call = call
        setup(world)
    before = world.snapshot()
    with pytest.raises(error, match=pattern):
        call(world)
    assert _same(before, world.snapshot())
