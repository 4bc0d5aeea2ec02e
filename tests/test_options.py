"""Option values are normalised and checked once, so nothing fails later at ``step()``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam
from lora_optim.option_table import COMMON_OPTIONS, STRUCTURAL_OPTIONS


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_numpy_scalars_become_plain_numbers():
    """``seed=np.int64(3)`` used to reach the state as a NumPy int (``weights_only`` loading then
    failed), and ``rank=np.int64(2)`` failed at ``step()`` after other parameters had stepped."""
    gen = torch.Generator().manual_seed(0)
    weights = [nn.Parameter(torch.randn(6, 5, generator=gen)) for _ in range(2)]
    opt = LoRAAdam(weights, lr=np.float32(1e-2), rank=np.int64(2), alpha=np.float64(4.0), seed=np.int64(3),
                   betas=(np.float64(0.9), np.float32(0.99)), eps=np.float64(1e-8), weight_decay=np.float32(0.1),
                   drift_probes=np.int32(1), projection="random", resample_every=np.int64(2))
    group = opt.param_groups[0]
    for name in ("rank", "seed", "drift_probes", "resample_every"):
        assert type(group[name]) is int, name
    for name in ("lr", "alpha", "eps", "weight_decay"):
        assert type(group[name]) is float, name
    assert all(type(beta) is float for beta in group["betas"])
    for _ in range(3):
        for w in weights:
            w.grad = torch.randn(6, 5, generator=gen)
        opt.step()
    assert all(type(opt.state[w]["seed"]) is int for w in weights)
    fresh = LoRAAdam(weights, lr=1e-2, rank=2, alpha=4.0, seed=3, drift_probes=1, projection="random", resample_every=2)
    fresh.load_state_dict(_round_trip(opt.state_dict()))
    assert fresh.state[weights[0]]["seed"] == opt.state[weights[0]]["seed"]


def test_numpy_options_in_a_group_dict_are_normalised_too():
    weight = nn.Parameter(torch.randn(6, 5))
    opt = LoRAAdam([{"params": [weight], "rank": np.int16(3), "lr": np.float16(0.5)}])
    assert type(opt.param_groups[0]["rank"]) is int and opt.param_groups[0]["rank"] == 3
    assert type(opt.param_groups[0]["lr"]) is float


def test_a_group_lists_only_the_options_of_its_projection():
    lora, random = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    opt = LoRAAdam([{"params": [lora]}, {"params": [random], "projection": "random"}], resample_every=3)
    assert "resample_every" not in opt.param_groups[0] and "init" in opt.param_groups[0]
    assert opt.param_groups[1]["resample_every"] == 3 and "init" not in opt.param_groups[1]


def test_weight_with_a_zero_size_dim_steps_as_a_dense_no_op():
    """A (5, 0) weight used to raise ZeroDivisionError at ``step()``."""
    empty, weight = nn.Parameter(torch.zeros(5, 0)), nn.Parameter(torch.randn(5, 4))
    opt = LoRAAdam([empty, weight], rank=2)
    empty.grad, weight.grad = torch.zeros(5, 0), torch.randn(5, 4)
    opt.step()
    assert not opt.is_low_rank(empty) and opt.is_low_rank(weight)
    assert opt.state[empty]["exp_avg"].shape == (5, 0)


def test_set_factors_when_a_redraw_is_due_is_kept():
    """With ``random`` and stored factors, a ``set_factors`` made when a redraw was due used to be
    thrown away by that redraw; it now starts a new period with the factors set."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 6, generator=gen))
    opt = LoRAAdam([weight], rank=2, projection="random", resample_every=2, lr=1e-3)
    for _ in range(2):  # the current draw has had its two steps: a redraw is due
        weight.grad = torch.randn(8, 6, generator=gen)
        opt.step()
    A, B = torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen)
    opt.set_factors(weight, A, B)
    weight.grad = torch.randn(8, 6, generator=gen)
    opt.step()
    A_after, B_after = opt.get_factors(weight)
    assert (A_after - A).abs().max() < 2e-3 and (B_after - B).abs().max() < 2e-3  # one Adam step of lr 1e-3 away


def test_structural_options_are_marked_in_the_table():
    assert set(STRUCTURAL_OPTIONS) == {"rank", "projection", "precision", "drift_probes", "preserve_sparsity"}
    assert all(option.doc for option in COMMON_OPTIONS.values())


def test_set_factors_during_an_accumulation_raises_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = LoRAAdam(model.parameters(), rank=2)
    opt.enable_per_layer()
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    before = opt.get_factors(model[0].weight)
    with pytest.raises(RuntimeError, match="set_factors"):
        opt.set_factors(model[0].weight, torch.ones(3, 2), torch.ones(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, opt.get_factors(model[0].weight)))
