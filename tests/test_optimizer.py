"""LoRAAdam as a torch.optim.Optimizer: dense groups equal AdamW, state sizes, the usual API."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, available_projections, optimizer_state_bytes

#: The divergence guard's state per low-rank matrix: 6 fp32 numbers (lora_optim.divergence).
GUARD_BYTES = 6 * 4


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).to(dtype)


def _data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(20, 6, generator=gen, dtype=dtype), torch.randint(0, 4, (20,), generator=gen)


def _train(model, opt, steps, x, y, scheduler=None):
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rank_none_equals_adamw_bit_for_bit(weight_decay):
    x, y = _data()
    ours_model, ref_model = _mlp(), _mlp()
    ours = LoRAAdam(ours_model.parameters(), lr=3e-3, rank=None, betas=(0.8, 0.99), eps=1e-7,
                    weight_decay=weight_decay)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7,
                            weight_decay=weight_decay, fused=True)
    for _ in range(30):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b)


def test_vectors_in_a_low_rank_group_get_adamw():
    gen = torch.Generator().manual_seed(0)
    bias, matrix = nn.Parameter(torch.randn(7, dtype=torch.float64)), nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    ref_bias = nn.Parameter(bias.detach().clone())
    matrix_before = matrix.detach().clone()
    ours = LoRAAdam([bias, matrix], lr=1e-2, rank=2, weight_decay=0.05)
    ref = torch.optim.AdamW([ref_bias], lr=1e-2, weight_decay=0.05, fused=True)
    for _ in range(10):
        g = torch.randn(7, generator=gen, dtype=torch.float64)
        bias.grad, ref_bias.grad = g.clone(), g.clone()
        matrix.grad = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        ours.step()
        ref.step()
        assert torch.equal(bias, ref_bias)
    change = matrix.detach() - matrix_before
    assert torch.linalg.matrix_rank(change, rtol=1e-10).item() == 2  # factorised, not AdamW


@pytest.mark.parametrize(
    "projection,options,factor_sets",
    [("lora", {}, 3), ("additive", {}, 3), ("random", {"resample_every": 4}, 3), ("random", {"resample_every": 1}, 2)],
)
def test_state_bytes_match_formula(projection, options, factor_sets):
    """Per matrix: ``factor_sets·r·(out+in)`` fp32 numbers (factors, if stored, plus 2 moments each),
    plus the 4-byte step count the fused Adam kernel reads, the 8-byte skip count (``random``:
    and its two 8-byte draw counters) and the divergence guard's 6 fp32 numbers."""
    weight = nn.Parameter(torch.zeros(4096, 4096))
    weight.grad = torch.randn(4096, 4096) * 1e-3
    opt = LoRAAdam([weight], rank=8, projection=projection, **options)
    opt.step()
    counters = 8 + (16 if projection == "random" else 0)
    expected = factor_sets * 8 * (4096 + 4096) * 4 + 4 + counters + GUARD_BYTES
    assert optimizer_state_bytes(opt) == expected
    adamw = torch.optim.AdamW([weight])
    adamw.step()
    assert optimizer_state_bytes(adamw) == 2 * 4096 * 4096 * 4 + 4  # exp_avg, exp_avg_sq, step (fp32 scalar)
    if factor_sets == 3:
        assert expected - 4 - counters - GUARD_BYTES == 0.75 * 2**20  # the 0.75 MiB against AdamW's 128 MiB


@pytest.mark.parametrize("projection", ["lora", "random", "additive"])
def test_small_matrices_clip_rank_and_record_it(projection):
    weight = nn.Parameter(torch.randn(3, 20, dtype=torch.float64))
    opt = LoRAAdam([weight], rank=8, projection=projection)
    weight.grad = torch.randn_like(weight)
    opt.step()
    assert opt.state[weight]["rank"] == 3
    A, B = opt.get_factors(weight)
    assert A.shape == (3, 3) and B.shape == (3, 20)


@pytest.mark.parametrize("projection", available_projections())
def test_grad_is_never_modified(projection):
    model = _mlp()
    x, y = _data()
    opt = LoRAAdam(model.parameters(), rank=3, projection=projection, weight_decay=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("projection", available_projections())
def test_non_contiguous_conv_weight_is_updated_in_place(projection):
    conv = nn.Conv2d(3, 5, 3).double().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    assert not conv.weight.is_contiguous()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    opts = [LoRAAdam(m.parameters(), rank=2, projection=projection, lr=1e-2) for m in (conv, reference)]
    for _ in range(3):
        for m, opt in zip((conv, reference), opts):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-12, atol=1e-14)
    assert not torch.equal(conv.weight, copy.deepcopy(conv).weight * 0)


def test_closure_scheduler_zero_grad_and_param_groups():
    x, y = _data()
    model = _mlp()
    opt = LoRAAdam([{"params": [model[0].weight], "rank": 2, "lr": 1e-2}], lr=5e-3)
    opt.add_param_group({"params": [model[2].weight], "rank": 3, "alpha": 6.0})
    opt.add_param_group({"params": [model[0].bias, model[2].bias], "rank": None})
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-3, 5e-3]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(6):
        losses.append(opt.step(closure).item())
        scheduler.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("projection", available_projections())
def test_state_dict_round_trips_with_weights_only(projection):
    x, y = _data()
    model = _mlp()
    options = {"resample_every": 2} if projection == "random" else {}
    opt = LoRAAdam(model.parameters(), rank=2, projection=projection, **options)
    _train(model, opt, 3, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _mlp()
    resumed_model.load_state_dict(saved["model"])
    resumed = LoRAAdam(resumed_model.parameters(), rank=2, projection=projection, **options)
    resumed.load_state_dict(saved["opt"])
    _train(model, opt, 4, x, y)
    _train(resumed_model, resumed, 4, x, y)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_loaded_state_keeps_fp32_factors_of_a_bf16_weight():
    weight = nn.Parameter(torch.randn(16, 12).to(torch.bfloat16))
    weight.grad = torch.randn_like(weight)
    opt = LoRAAdam([weight], rank=4)
    opt.step()
    state_dict = opt.state_dict()
    assert state_dict["state"][0]["A"].dtype == torch.float32
    fresh = LoRAAdam([weight], rank=4)
    fresh.load_state_dict(state_dict)
    for key in ("A", "B", "exp_avg_A", "exp_avg_sq_B"):
        assert fresh.state[weight][key].dtype == torch.float32
        assert torch.equal(fresh.state[weight][key], opt.state[weight][key])
        assert fresh.state[weight][key].data_ptr() != opt.state[weight][key].data_ptr()
    assert fresh.state[weight]["seed"] == opt.state[weight]["seed"]


def test_set_factors_keeps_w_and_is_used():
    weight = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    before = weight.detach().clone()
    opt = LoRAAdam([weight], rank=2, alpha=4.0, lr=1e-2)
    A = torch.randn(6, 2, dtype=torch.float64)
    B = torch.randn(2, 5, dtype=torch.float64)
    opt.set_factors(weight, A, B)
    assert torch.equal(weight, before)
    got_A, got_B = opt.get_factors(weight)
    assert torch.equal(got_A, A) and torch.equal(got_B, B)
    G = torch.randn(6, 5, dtype=torch.float64)
    weight.grad = G
    opt.step()
    new_A, new_B = opt.get_factors(weight)
    # first Adam step moves every factor entry by lr·sign(g) (|g| >> eps), g = s·G·Bᵀ, s·Aᵀ·G
    torch.testing.assert_close(new_A - A, -1e-2 * torch.sign(2 * G @ B.t()))
    torch.testing.assert_close(weight - before, 2 * (new_A @ new_B - A @ B))


@pytest.mark.parametrize(
    "A_shape,B_shape",
    [((6, 3), (3, 5)), ((5, 2), (2, 5)), ((6, 2), (2, 4))],
)
def test_set_factors_rejects_wrong_shapes(A_shape, B_shape):
    weight = nn.Parameter(torch.randn(6, 5))
    opt = LoRAAdam([weight], rank=2)
    with pytest.raises(ValueError, match="must have shape"):
        opt.set_factors(weight, torch.zeros(A_shape), torch.zeros(B_shape))


def test_factors_of_dense_parameters_are_an_error():
    bias = nn.Parameter(torch.zeros(4))
    opt = LoRAAdam([bias], rank=2)
    with pytest.raises(ValueError, match="plain AdamW"):
        opt.get_factors(bias)
