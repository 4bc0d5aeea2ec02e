"""Factor inits of ``lora`` (PiSSA, MiLoRA's minor components, LoRS's gradient init) and the
truncated SVDs they use, against exact float64 statements and explicit computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lora_optim import LoRAAdam
from lora_optim.projections.lora import gradient_init_factors, singular_factors
from lora_optim.truncated_svd import DEFAULT_NITER, bottom_singular, top_singular
from twins import GraphTwin

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _decaying(rows: int, cols: int, seed: int, dtype=torch.float64, decay: float = 0.7) -> torch.Tensor:
    """A matrix with singular values decay^i and random singular vectors (a clear spectral gap)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64)).Q
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.t()).to(dtype)


# ----------------------------------------------------------------------------- truncated SVD

@given(rows=st.integers(2, 40), cols=st.integers(2, 40), rank=st.integers(1, 8), niter=st.integers(0, 4),
       seed=st.integers(0, 2**31), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_randomized_svd_is_torch_svd_lowrank_with_a_seeded_draw(rows, cols, rank, niter, seed, dtype):
    rank = min(rank, rows, cols)
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(matrix, q=rank, niter=niter)
    u, s, v = top_singular(matrix, rank, niter=niter, seed=seed, oversample=0)
    assert torch.equal(u, U) and torch.equal(s, S) and torch.equal(v, V)


def test_truncated_svd_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    top_singular(torch.randn(30, 20, generator=torch.Generator().manual_seed(0)), 4, niter=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


@given(rows=st.integers(2, 30), cols=st.integers(2, 30), rank=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_exact_top_and_bottom_triplets_reconstruct_the_matrix(rows, cols, rank, seed):
    rank = min(rank, rows, cols)
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    S_all = torch.linalg.svdvals(matrix)
    U, S, V = top_singular(matrix, rank, niter=None)
    assert torch.allclose(S, S_all[:rank], rtol=1e-12, atol=1e-12)
    u, s, v = bottom_singular(matrix, rank)
    assert torch.allclose(s, S_all[-rank:], rtol=1e-12, atol=1e-12)
    # orthonormal columns and A·v = σ·u for every triplet
    for left, values, right in ((U, S, V), (u, s, v)):
        torch.testing.assert_close(left.t() @ left, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(matrix @ right, left * values, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_randomized_svd_converges_on_a_decaying_spectrum(shape):
    matrix = _decaying(*shape, seed=3)
    exact = top_singular(matrix, 5, niter=None)[1]
    errors = [(top_singular(matrix, 5, niter=n, seed=1)[1] - exact).abs().max().item() for n in (0, 2, DEFAULT_NITER)]
    assert errors[2] <= 1e-12 < errors[0], errors  # decay 0.7, q = r + 8: (0.7^13/0.7^4)^(2·16) ≈ 1e-22
    assert errors[1] < errors[0]


def test_svd_niter_option_is_validated():
    weight = nn.Parameter(torch.randn(6, 5))
    for bad in (-1, 1.5, "4", True):
        with pytest.raises(ValueError, match="svd_niter"):
            LoRAAdam([weight], rank=2, init="pissa", svd_niter=bad)
    LoRAAdam([weight], rank=2, init="pissa", svd_niter=None)
    with pytest.raises(ValueError, match="init"):
        LoRAAdam([weight], rank=2, init="principal")


# ----------------------------------------------------------------------------- PiSSA and minor

@given(rows=st.integers(2, 24), cols=st.integers(2, 24), rank=st.integers(1, 6), alpha=st.floats(0.25, 32.0),
       seed=st.integers(0, 2**31), which=st.sampled_from(["pissa", "minor"]))
def test_pissa_and_minor_factors_satisfy_eckart_young(rows, cols, rank, alpha, seed, which):
    """``s·A0·B0`` is the best rank-r approximation (PiSSA) or the minor part (MiLoRA): the residual's
    squared norm equals the sum of the other singular values squared, and W is not changed."""
    weight = nn.Parameter(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    before = weight.detach().clone()
    opt = LoRAAdam([weight], rank=rank, alpha=alpha, init=which, svd_niter=None)
    A, B = opt.get_factors(weight)
    assert torch.equal(weight, before)
    rank = min(rank, rows, cols)
    scale = alpha / opt.param_groups[0]["rank"]
    S = torch.linalg.svdvals(before)
    kept = S[:rank] if which == "pissa" else S[-rank:]
    residual = (before - scale * A @ B).norm().square().item()
    expected = (S.square().sum() - kept.square().sum()).item()
    assert abs(residual - expected) <= 1e-10 * S.square().sum().item(), (residual, expected)
    # PiSSA's balance: both factors carry √(S/s): AᵀA = BBᵀ = diag(S/s)
    torch.testing.assert_close(A.t() @ A, torch.diag(kept / scale), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(B @ B.t(), torch.diag(kept / scale), rtol=1e-9, atol=1e-12)


def test_pissa_fails_the_eckart_young_check_when_the_scale_is_not_folded():
    """The check above can fail: factors without the 1/s fold leave a residual far from the tail."""
    weight = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A, B = singular_factors(weight, 3, 1.0, niter=None)  # folded for s = 1, used at s = 4
    S = torch.linalg.svdvals(weight)
    residual = (weight - 4.0 * A @ B).norm().square().item()
    assert abs(residual - S[3:].square().sum().item()) > 1e-3


def test_pissa_fast_svd_is_close_to_exact_and_seeded():
    weight = nn.Parameter(_decaying(48, 32, seed=1))
    exact = LoRAAdam([weight], rank=4, alpha=8.0, init="pissa", svd_niter=None)
    fast = LoRAAdam([weight], rank=4, alpha=8.0, init="pissa", seed=7)
    again = LoRAAdam([weight], rank=4, alpha=8.0, init="pissa", seed=7)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    A_exact, B_exact = exact.get_factors(weight)
    A_fast, B_fast = fast.get_factors(weight)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip((A_fast, B_fast), again.get_factors(weight)))
    assert _rel(A_fast @ B_fast, A_exact @ B_exact) <= 1e-10  # decay 0.7: converged at niter 16


def test_pissa_matches_peft_pissa_init():
    """PEFT's ``init_lora_weights="pissa"`` (exact SVD, fp32) gives the same factors: our ``A`` is its
    ``lora_B``, our ``B`` its ``lora_A``; its residual base weight is ``W − s·lora_B·lora_A``."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 10))
    ours = copy.deepcopy(model)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                                  init_lora_weights="pissa"))
    opt = LoRAAdam([ours[0].weight, ours[2].weight], rank=4, alpha=8.0, init="pissa", svd_niter=None)
    for index in (0, 2):
        layer = peft_model.base_model.model[index]
        A, B = opt.get_factors(ours[index].weight)
        assert _rel(A, layer.lora_B["default"].weight.detach()) <= 1e-6
        assert _rel(B, layer.lora_A["default"].weight.detach()) <= 1e-6
        residual = ours[index].weight.detach() - 2.0 * A @ B
        assert _rel(residual, layer.base_layer.weight.detach()) <= 1e-6


def _net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=generator)
    return model, x, y


def _follow_graph_twin(ours, opt, twin, loss_fn, x, named, steps=40):
    """``steps`` steps of ``opt`` on ``ours`` and of the graph ``twin``, asserting after each that the
    losses and every parameter agree to ``TOL``; returns the twin's losses."""
    twin_losses = []
    for step in range(steps):
        loss = loss_fn(ours(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        twin_loss = twin.step(loss_fn, x)
        twin_losses.append(twin_loss)
        assert abs(loss.item() - twin_loss) <= TOL * abs(twin_loss), (step, loss.item(), twin_loss)
        weights = twin.weights()
        for name, param in named.items():
            assert _rel(param, weights[name]) <= TOL, (step, name)
    return twin_losses


@pytest.mark.parametrize("init", ["pissa", "minor"])
def test_pissa_and_minor_train_as_the_graph_twin(init):
    """``W = W_res + s·A·B`` with ``W_res = W0 − s·A0·B0`` trained by torch AdamW (autograd) equals
    LoRAAdam from the same factors, float64, step by step (measured worst 6.4e-16)."""
    model, x, y = _net()
    ours = copy.deepcopy(model)
    names = ["0.weight", "2.weight", "4.weight"]
    named = dict(ours.named_parameters())
    opt = LoRAAdam([{"params": [named[n] for n in names], "rank": 3, "alpha": 6.0, "init": init, "svd_niter": None},
                    {"params": [p for n, p in named.items() if n not in names], "rank": None}],
                   lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    factors = {n: (*opt.get_factors(named[n]), 2.0) for n in names}
    dense = [n for n in named if n not in names]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    twin = GraphTwin(model, factors, dense, [{"names": names, **hyper}, {"names": dense, **hyper}])
    loss_fn = lambda logits: nn.functional.cross_entropy(logits, y)  # noqa: E731
    twin_losses = _follow_graph_twin(ours, opt, twin, loss_fn, x, named)
    assert twin_losses[-1] < 0.9 * twin_losses[0]


# ----------------------------------------------------------------------------- gradient init

def test_gradient_init_factors_minimise_the_projection_residual():
    """``B0 = V_rᵀ`` minimises ``‖G − G·B0ᵀ·B0‖`` over orthonormal rows: the residual is the tail of G's
    spectrum, and a random orthonormal B does worse."""
    G = torch.randn(20, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A0, B0 = gradient_init_factors(G, 4, niter=None)
    assert torch.equal(A0, torch.zeros(20, 4, dtype=torch.float64))
    torch.testing.assert_close(B0 @ B0.t(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    S = torch.linalg.svdvals(G)
    residual = (G - G @ B0.t() @ B0).norm().square().item()
    assert abs(residual - S[4:].square().sum().item()) <= 1e-10 * S.square().sum().item()
    other = torch.linalg.qr(torch.randn(15, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q.t()
    assert (G - G @ other.t() @ other).norm().square().item() > residual * 1.01


def _first_gradients(model, x, y, names):
    probe = copy.deepcopy(model)
    nn.functional.cross_entropy(probe(x), y).backward()
    params = dict(probe.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


def test_gradient_init_first_step_and_trajectory_equal_the_explicit_computation():
    """LoRS's init taken from the first G: after step 1, ``B1 = B0 = V_rᵀ(G₀)`` (its gradient ``Aᵀ·G`` is
    zero), ``A1`` is Adam's first step on ``s·G·B0ᵀ`` and ``W1 − W0 = s·A1·B0``; afterwards the run
    equals the graph twin started from ``(0, B0)`` (float64, 40 steps; measured worst 1.0e-15)."""
    model, x, y = _net()
    ours = copy.deepcopy(model)
    names = ["0.weight", "2.weight", "4.weight"]
    named = dict(ours.named_parameters())
    lr, scale = 1e-2, 2.0
    opt = LoRAAdam([{"params": [named[n] for n in names], "rank": 3, "alpha": 6.0},
                    {"params": [p for n, p in named.items() if n not in names], "rank": None}],
                   lr=lr, betas=(0.9, 0.99), init="gradient", svd_niter=None)
    for n in names:
        A, B = opt.get_factors(named[n])
        assert not A.any() and not B.any()  # nothing before the first step
    first_grads = _first_gradients(model, x, y, names)
    W0 = {n: named[n].detach().clone() for n in names}
    loss_fn = lambda logits: nn.functional.cross_entropy(logits, y)  # noqa: E731
    loss_fn(ours(x)).backward()
    opt.step()
    opt.zero_grad()
    factors = {}
    for n in names:
        G = first_grads[n]
        _, _, Vh = torch.linalg.svd(G, full_matrices=False)
        B0 = Vh[:3]
        A1, B1 = opt.get_factors(named[n])
        # rows of B0 are defined up to sign; the run is invariant to it (A's column flips with it)
        signs = torch.sign((B1 * B0).sum(dim=1, keepdim=True))
        assert _rel(B1, signs * B0) <= 1e-12
        grad_A = scale * G @ B1.t()
        # Adam's first step: m̂ = g, v̂ = g², so dA = −lr·g/(|g| + ε)
        torch.testing.assert_close(A1, -lr * grad_A / (grad_A.abs() + 1e-8), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(named[n].detach() - W0[n], scale * A1 @ B1, rtol=1e-12, atol=1e-15)
        factors[n] = (torch.zeros_like(A1), B1, scale)
    # the twin from (0, B0) at W0, stepped with the same first gradient, then onwards
    dense = [n for n in named if n not in names]
    hyper = dict(lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    twin = GraphTwin(model, factors, dense, [{"names": names, **hyper}, {"names": dense, **hyper}])
    twin.step(loss_fn, x)
    _follow_graph_twin(ours, opt, twin, loss_fn, x, named)


def test_gradient_init_is_invariant_to_a_grad_scaler_and_leaves_the_rng_alone():
    """Singular vectors do not see a positive scale of G: a GradScaler run equals the plain run."""
    runs = []
    for scaled in (False, True):
        model, x, y = _net()
        model.float()
        torch.manual_seed(5)
        rng = torch.get_rng_state()
        opt = LoRAAdam(model.parameters(), rank=2, init="gradient", lr=1e-2)  # randomized SVD, seeded
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x.float()), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_init_waits_for_a_finite_gradient():
    model, x, y = _net()
    opt = LoRAAdam(model.parameters(), rank=2, init="gradient")
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(Warning, match="skipped"):
        opt.step()
    assert torch.equal(model[0].weight, before[0])
    A, B = opt.get_factors(model[0].weight)
    assert not A.any() and not B.any()  # the init is still pending
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    A, B = opt.get_factors(model[0].weight)
    torch.testing.assert_close(B @ B.t(), torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["per_layer", "activation"])
def test_gradient_init_refuses_the_modes_with_nothing_changed(mode):
    model, x, y = _net()
    opt = LoRAAdam(model.parameters(), rank=2, init="gradient")
    handle = opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="init='gradient'"):
        nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    handle.remove()


def test_gradient_init_then_a_mode_runs():
    """The documented way into the modes: a plain first step, then the per-layer mode (equal to plain)."""
    runs = []
    for use_mode in (False, True):
        model, x, y = _net()
        opt = LoRAAdam(model.parameters(), rank=2, init="gradient", svd_niter=None, lr=1e-2)
        for step in range(4):
            if step == 1 and use_mode:
                opt.enable_per_layer()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert _rel(runs[1], runs[0]) <= TOL


def test_set_factors_replaces_a_pending_gradient_init():
    weight = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    opt = LoRAAdam([weight], rank=2, init="gradient")
    A = torch.randn(6, 2, dtype=torch.float64)
    B = torch.randn(2, 5, dtype=torch.float64)
    opt.set_factors(weight, A, B)
    weight.grad = torch.randn(6, 5, dtype=torch.float64)
    opt.step()
    _, B1 = opt.get_factors(weight)
    assert _rel(B1, B) < 0.5 and math.isfinite(B1.norm().item())  # stepped from B, not from V_rᵀ
    assert (B1 - B).abs().max().item() <= 1e-3 + 1e-12  # one Adam step of lr 1e-3
