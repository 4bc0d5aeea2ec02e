"""The random projection: the sampler's moments, seeding, RNG hygiene, redraw semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam
from lora_optim.projections.random import draw_factors
from lora_optim.seeding import derive_seed

# Family-wise bound: with z = 6 a single N(0,1) entry exceeds it with probability 2e-9, so even
# thousands of entries checked at once leave a false alarm negligible (and seeds are fixed).
Z = 6.0


@pytest.mark.parametrize("out_features,in_features,rank", [(24, 16, 1), (24, 16, 4), (12, 40, 8)])
def test_sampler_second_moments_are_identity(out_features, in_features, rank):
    draws = 4000
    sum_AAt = torch.zeros(out_features, out_features, dtype=torch.float64)
    sum_BtB = torch.zeros(in_features, in_features, dtype=torch.float64)
    for draw in range(draws):
        A, B = draw_factors(out_features, in_features, rank, seed=123, draw=draw,
                            dtype=torch.float64, device=torch.device("cpu"))
        sum_AAt += A @ A.t()
        sum_BtB += B.t() @ B
    for total, size in ((sum_AAt, out_features), (sum_BtB, in_features)):
        mean = total / draws
        eye = torch.eye(size, dtype=torch.float64)
        # (AAᵀ)_ii = Σ_k A_ik², A_ik ~ N(0, 1/r): variance 2/r; off-diagonal: variance 1/r.
        diag_sd = math.sqrt(2.0 / rank / draws)
        off_sd = math.sqrt(1.0 / rank / draws)
        diag_err = (mean.diagonal() - 1).abs().max().item()
        off_err = (mean - eye).fill_diagonal_(0).abs().max().item()
        assert diag_err <= Z * diag_sd, (diag_err, Z * diag_sd)
        assert off_err <= Z * off_sd, (off_err, Z * off_sd)


def test_sampler_variance_is_one_over_rank():
    A, B = draw_factors(2000, 3000, 8, seed=5, draw=0, dtype=torch.float64, device=torch.device("cpu"))
    for tensor in (A, B):
        n = tensor.numel()
        # sample variance of n N(0, 1/8) numbers has sd ≈ (1/8)·√(2/n)
        assert abs(tensor.var().item() - 1 / 8) <= Z * (1 / 8) * math.sqrt(2 / n)


def test_same_seed_same_draws_and_different_keys_differ():
    kwargs = dict(dtype=torch.float32, device=torch.device("cpu"))
    A1, B1 = draw_factors(10, 12, 3, seed=7, draw=2, **kwargs)
    A2, B2 = draw_factors(10, 12, 3, seed=7, draw=2, **kwargs)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    A3, _ = draw_factors(10, 12, 3, seed=7, draw=3, **kwargs)
    A4, _ = draw_factors(10, 12, 3, seed=derive_seed(0, 1), draw=2, **kwargs)
    assert not torch.allclose(A1, A3) and not torch.allclose(A1, A4)


def _model():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    return model, x, y


def _train(model, opt, x, y, steps, before_step=None):
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_parameters_and_draws_get_different_factors():
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), rank=2, projection="random", resample_every=1)
    first = opt.get_factors(model[0].weight)[0]
    second = opt.get_factors(model[2].weight)[0]
    assert not torch.allclose(first, second)
    _train(model, opt, x, y, 1)
    assert not torch.allclose(opt.get_factors(model[0].weight)[0], first)


def test_same_seed_same_run_and_global_rng_untouched():
    runs = []
    for _ in range(2):
        model, x, y = _model()
        torch.manual_seed(1234)
        rng_before = torch.get_rng_state()
        opt = LoRAAdam(model.parameters(), rank=2, projection="random", resample_every=2, seed=42)
        _train(model, opt, x, y, 7)
        assert torch.equal(torch.get_rng_state(), rng_before)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), rank=2, projection="random", resample_every=2, seed=43)
    _train(model, opt, x, y, 7)
    assert not torch.equal(model[0].weight, runs[0][0])


def test_redraw_does_not_move_w():
    """``W_t − W_0 = s·Σ_draws (A_end·B_end − A_start·B_start)``: only factor steps move ``W``,
    a redraw does not (an implementation that recomposed ``W0 + s·A·B`` would fail this)."""
    model, x, y = _model()
    weight = model[2].weight
    W0 = weight.detach().clone()
    every, scale = 3, 1.5
    opt = LoRAAdam(model.parameters(), rank=2, alpha=3.0, projection="random", resample_every=every)
    expected = torch.zeros_like(W0)
    for step in range(4 * every):
        nn.functional.cross_entropy(model(x), y).backward()
        if step % every == 0:  # this step uses a new draw: number 0, then 1, 2, ...
            draw = step // every
        opt.step()
        opt.zero_grad()
        state = opt.state[weight]
        if step % every == 0:
            start = draw_factors(12, 12, 2, state["seed"], draw, dtype=torch.float64, device=torch.device("cpu"))
        if (step + 1) % every == 0:
            A_end, B_end = opt.get_factors(weight)
            expected += scale * (A_end @ B_end - start[0] @ start[1])
    torch.testing.assert_close(weight.detach() - W0, expected, rtol=1e-10, atol=1e-13)
    assert state["draws"] == 4


def test_each_step_with_fresh_draws_is_low_rank():
    """With ``resample_every=1`` every step moves ``W`` by ``s·(A'B' − AB)``: rank ≤ 2r."""
    model, x, y = _model()
    weight = model[2].weight
    opt = LoRAAdam(model.parameters(), rank=2, projection="random", resample_every=1)
    for _ in range(3):
        before = weight.detach().clone()
        _train(model, opt, x, y, 1)
        change = weight.detach() - before
        assert change.abs().max() > 0
        # W itself rounds at ~1e-16·|W| per write, so count singular values above 1e-10 relative
        assert torch.linalg.matrix_rank(change, rtol=1e-10).item() <= 4


def test_moment_rules_at_a_redraw():
    model, x, y = _model()
    weight = model[2].weight
    results = {}
    for rule in ("keep", "reset", "transport"):
        model, x, y = _model()
        weight = model[2].weight
        opt = LoRAAdam(model.parameters(), rank=2, projection="random", resample_every=2, moment_rule=rule)
        _train(model, opt, x, y, 2)
        state = opt.state[weight]
        before = {k: state[k].clone() for k in ("exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B")}
        old_A, old_B = opt.get_factors(weight)
        new_A, new_B = draw_factors(12, 12, 2, state["seed"], 1, dtype=torch.float64, device=torch.device("cpu"))
        nn.functional.cross_entropy(model(x), y).backward()
        captured = {}
        import lora_optim.engine as engine_module

        real_adamw = engine_module.adamw_

        # Capture the moments right after the redraw, before Adam folds in the new gradient.
        def spy(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, grad_scale=None, found_inf=None):
            for index, exp_avg in enumerate(exp_avgs):
                if exp_avg is state["exp_avg_A"]:
                    captured.update(exp_avg_A=exp_avg.clone(), exp_avg_sq_A=exp_avg_sqs[index].clone(),
                                    step=steps[index].item())
                if exp_avg is state["exp_avg_B"]:
                    captured.update(exp_avg_B=exp_avg.clone(), exp_avg_sq_B=exp_avg_sqs[index].clone())
            return real_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, grad_scale, found_inf)

        engine_module.adamw_ = spy
        try:
            opt.step()
        finally:
            engine_module.adamw_ = real_adamw
        results[rule] = captured
        if rule == "keep":
            for k, v in before.items():
                assert torch.equal(captured[k], v), k
            assert captured["step"] == 3
        elif rule == "reset":
            for k in before:
                assert captured[k].abs().max() == 0, k
            assert captured["step"] == 1
        else:
            to_A = torch.linalg.pinv(old_B @ old_B.t()) @ old_B @ new_B.t()
            to_B = new_A.t() @ old_A @ torch.linalg.pinv(old_A.t() @ old_A)
            torch.testing.assert_close(captured["exp_avg_A"], before["exp_avg_A"] @ to_A)
            torch.testing.assert_close(captured["exp_avg_B"], to_B @ before["exp_avg_B"])
            assert torch.equal(captured["exp_avg_sq_A"], before["exp_avg_sq_A"])  # v kept: never negative
            assert (captured["exp_avg_sq_B"] >= 0).all()


def test_transport_is_exact_for_a_gradient_in_the_old_subspace():
    """If ``m_A = s·Ḡ·B_oldᵀ`` with ``Ḡ`` in ``B_old``'s row space, transport gives ``s·Ḡ·B_newᵀ``."""
    from lora_optim.moment_rules import apply_moment_rule_

    gen = torch.Generator().manual_seed(3)
    old = draw_factors(40, 32, 4, seed=1, draw=0, dtype=torch.float64, device=torch.device("cpu"))
    new = draw_factors(40, 32, 4, seed=1, draw=1, dtype=torch.float64, device=torch.device("cpu"))
    G_rows = torch.randn(40, 4, generator=gen, dtype=torch.float64) @ old[1]  # rows in B_old's row space
    G_cols = old[0] @ torch.randn(4, 32, generator=gen, dtype=torch.float64)  # columns in A_old's span
    state = {
        "exp_avg_A": 2.0 * G_rows @ old[1].t(), "exp_avg_sq_A": torch.ones(40, 4, dtype=torch.float64),
        "exp_avg_B": 2.0 * old[0].t() @ G_cols, "exp_avg_sq_B": torch.ones(4, 32, dtype=torch.float64),
        "step": 5,
    }
    apply_moment_rule_("transport", state, old, new)
    torch.testing.assert_close(state["exp_avg_A"], 2.0 * G_rows @ new[1].t())
    torch.testing.assert_close(state["exp_avg_B"], 2.0 * new[0].t() @ G_cols)


def test_transport_does_not_blow_up_the_moments():
    """Regression: transporting through ``B_old·B_newᵀ`` alone scaled ``m`` by ~√(in/r) per redraw
    (|m| reached 1e8 within 100 steps here)."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(40, 32, generator=gen) * 0.1)
    opt = LoRAAdam([weight], rank=4, lr=1e-3, projection="random", resample_every=4, moment_rule="transport")
    largest_grad = 0.0
    for _ in range(100):
        weight.grad = torch.randn(40, 32, generator=gen)
        largest_grad = max(largest_grad, weight.grad.abs().max().item())
        opt.step()
    state = opt.state[weight]
    # an EMA of projected gradients: |s·G·Bᵀ| is at most ~‖G row‖·‖B col‖; allow a wide margin
    bound = 10 * largest_grad * 32**0.5
    assert state["exp_avg_A"].abs().max().item() < bound
    assert state["exp_avg_B"].abs().max().item() < 10 * largest_grad * 40**0.5
    assert torch.isfinite(weight).all()
