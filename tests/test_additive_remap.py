"""``additive`` with redrawn index maps (``remap_every``): a twin with explicit one-hot factors and
``torch.optim.AdamW``, the fixed map before the first redraw, resume, checkpoint contents, skipped
steps, modes and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, NonFiniteGradientWarning
from lora_optim.moment_rules import apply_moment_rule_
from lora_optim.projections import get_projection
from lora_optim.projections.additive import class_maps


def _model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    return model, x, y


def _one_hot(classes: torch.Tensor, rank: int) -> torch.Tensor:
    return (classes.unsqueeze(1) == torch.arange(rank)).to(torch.float64)


def test_class_maps_keep_class_sizes_and_draw_zero_is_the_fixed_map():
    rows, columns = class_maps(10, 13, 3, seed=5, draw=0)
    assert torch.equal(rows, torch.arange(10) % 3) and torch.equal(columns, torch.arange(13) % 3)
    for draw in (1, 2):
        rows, columns = class_maps(10, 13, 3, seed=5, draw=draw)
        assert torch.equal(torch.bincount(columns, minlength=3), torch.bincount(torch.arange(13) % 3, minlength=3))
        assert torch.equal(torch.bincount(rows, minlength=3), torch.bincount(torch.arange(10) % 3, minlength=3))
    assert not torch.equal(class_maps(10, 13, 3, seed=5, draw=1)[1], class_maps(10, 13, 3, seed=5, draw=2)[1])
    assert torch.equal(class_maps(10, 13, 3, seed=5, draw=1)[1], class_maps(10, 13, 3, seed=5, draw=1)[1])


@pytest.mark.parametrize("rule", ["keep", "reset", "transport"])
def test_remapped_additive_follows_an_explicit_twin(rule):
    """``W_t = W_{t−1} + s·(dA·P_t + Q_t·dB)`` with ``(P_t, Q_t)`` the one-hot maps of the draw in use,
    ``(dA, dB)`` an AdamW step (``torch.optim.AdamW``) on factors that restart at zero at each redraw,
    gradients ``s·G·P_tᵀ`` and ``s·Q_tᵀ·G`` by autograd, moments carried by ``rule``; float64, to 1e-10."""
    every, rank, steps, alpha, lr = 3, 3, 10, 6.0, 0.05
    model, x, y = _model()
    twin_model, _, _ = _model()
    weight = model[0].weight
    opt = LoRAAdam([{"params": [weight], "rank": rank, "alpha": alpha},
                    {"params": [p for p in model.parameters() if p is not weight], "rank": None}],
                   lr=lr, projection="additive", remap_every=every, moment_rule=rule, weight_decay=0.0)
    scale = alpha / rank
    W = twin_model[0].weight
    A = torch.zeros(10, rank, dtype=torch.float64, requires_grad=True)
    B = torch.zeros(rank, 12, dtype=torch.float64, requires_grad=True)
    twin = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0, foreach=False)
    others = torch.optim.AdamW([p for p in twin_model.parameters() if p is not W], lr=lr, weight_decay=0.0,
                               foreach=False)
    seed = None
    for step in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        seed = opt.state[weight]["seed"] if seed is None else seed
        draw = step // every
        rows, columns = class_maps(10, 12, rank, seed, draw)
        Q, P = _one_hot(rows, rank), _one_hot(columns, rank).t()
        if step and step % every == 0:  # a redraw: moments by the rule, factors restart at zero
            old_rows, old_columns = class_maps(10, 12, rank, seed, draw - 1)
            state = {"exp_avg_A": twin.state[A]["exp_avg"], "exp_avg_sq_A": twin.state[A]["exp_avg_sq"],
                     "exp_avg_B": twin.state[B]["exp_avg"], "exp_avg_sq_B": twin.state[B]["exp_avg_sq"],
                     "step": torch.zeros(())}
            apply_moment_rule_(rule, state, (_one_hot(old_rows, rank), _one_hot(old_columns, rank).t()), (Q, P))
            if rule == "reset":
                twin.state[A]["step"].zero_()
                twin.state[B]["step"].zero_()
            with torch.no_grad():
                A.zero_()
                B.zero_()
        W_before = W.detach().clone()
        A_before, B_before = A.detach().clone(), B.detach().clone()
        nn.functional.cross_entropy(twin_model(x), y).backward()
        G = W.grad
        A.grad, B.grad = scale * G @ P.t(), scale * Q.t() @ G
        W.grad = None
        twin.step()
        others.step()
        others.zero_grad()
        with torch.no_grad():
            W.copy_(W_before + scale * ((A - A_before) @ P + Q @ (B - B_before)))
        torch.testing.assert_close(weight.detach(), W.detach(), rtol=1e-10, atol=1e-12)
    assert opt.state[weight]["draws"] == 4 and opt.state[weight]["age"] == 1


def test_before_the_first_redraw_it_is_plain_additive_bit_for_bit():
    runs = []
    for options in ({}, {"remap_every": 50}):
        model, x, y = _model()
        opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, **options)
        for _ in range(6):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_resume_mid_period_equals_the_uninterrupted_run(tmp_path):
    """The maps are regenerated from the seed and the draw counter: a state dict saved between
    redraws (loaded with ``weights_only=True`` into a fresh optimizer) continues exactly."""
    options = dict(rank=3, projection="additive", lr=0.02, remap_every=2, moment_rule="transport")
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), **options)
    _train(model, opt, x, y, 9)
    expected = [p.detach().clone() for p in model.parameters()]

    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), **options)
    _train(model, opt, x, y, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = _model(seed=1)[0]
    model.load_state_dict(saved["model"])
    opt = LoRAAdam(model.parameters(), **options)
    opt.load_state_dict(saved["opt"])
    _train(model, opt, x, y, 4)
    for a, b in zip(expected, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["per_layer", "activation"])
def test_modes_equal_the_plain_mode(mode):
    runs = []
    for use_mode in (False, True):
        model, x, y = _model()
        opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=2)
        if use_mode:
            opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)
        _train(model, opt, x, y, 7)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_drift_probe_follows_the_remapped_writes():
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=2, drift_probes=4)
    _train(model, opt, x, y, 7)
    for report in opt.drift_report().values():
        assert report.relative_to_change < 1e-10 and report.change_norm > 0


def test_export_is_exact_before_the_first_redraw_and_unknown_after():
    model, x, y = _model()
    weight = model[0].weight
    W0 = weight.detach().clone()
    opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=3)
    _train(model, opt, x, y, 3)
    L, R = opt.weight_change_factors(weight)
    torch.testing.assert_close(weight.detach() - W0, opt.factor_scale(weight) * L @ R, rtol=1e-10, atol=1e-13)
    _train(model, opt, x, y, 1)
    assert opt.weight_change_factors(weight) is None


def test_remap_with_a_masked_drift_probe_is_refused():
    model, _, _ = _model()
    with pytest.raises(ValueError, match="remap_every=2 with preserve_sparsity=True and drift_probes=2"):
        LoRAAdam(model.parameters(), rank=3, projection="additive", remap_every=2, preserve_sparsity=True,
                 drift_probes=2)


def test_state_holds_only_tensors_and_numbers_after_redraws(tmp_path):
    """After redraws the state is tensors, ints and floats only (the maps are not stored: they are
    regenerated from ``seed`` and ``draws``), so ``torch.load(weights_only=True)`` reads it."""
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=2, moment_rule="transport")
    _train(model, opt, x, y, 5)
    state = opt.state_dict()
    for entry in state["state"].values():
        for key, value in entry.items():
            assert isinstance(value, (torch.Tensor, int, float)), (key, type(value))
    assert state["state"][0]["draws"] == 3 and state["state"][0]["age"] == 1
    torch.save(state, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["state"][0]["draws"] == 3


def test_a_loaded_copy_does_not_share_the_maps_with_the_original():
    """Two optimizers from one state dict continue independently and identically (the map cache is
    keyed by each optimizer's own factor tensors, not shared like GaLore's projector objects)."""
    options = dict(rank=3, projection="additive", lr=0.02, remap_every=2)
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), **options)
    _train(model, opt, x, y, 3)
    twin_model = _model(seed=1)[0]
    twin_model.load_state_dict(model.state_dict())
    twin = LoRAAdam(twin_model.parameters(), **options)
    twin.load_state_dict(opt.state_dict())
    _train(model, opt, x, y, 4)  # the original goes through two more redraws first
    _train(twin_model, twin, x, y, 4)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
    assert twin.state[twin_model[0].weight]["draws"] == opt.state[model[0].weight]["draws"] == 4


def _assert_a_skipped_step_changes_nothing(remap_every: int, steps_before: int, age: int, steps_after: int) -> None:
    """Train ``steps_before`` steps, then (in the second run) skip one step for a NaN gradient,
    check the maps' counters did not move (``draws`` 1, ``age`` as given), train ``steps_after``
    more: the two runs end bit-identical."""
    runs = []
    for bad in (False, True):
        model, x, y = _model()
        opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=remap_every)
        _train(model, opt, x, y, steps_before)
        if bad:
            for p in model.parameters():
                p.grad = torch.full_like(p, float("nan"))
            with pytest.warns(NonFiniteGradientWarning, match="skipped a step"):
                opt.step()
            opt.zero_grad()
            assert opt.state[model[0].weight]["draws"] == 1 and opt.state[model[0].weight]["age"] == age
        _train(model, opt, x, y, steps_after)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_skipped_step_does_not_advance_the_maps():
    """A NaN gradient skips the step (``nonfinite="skip"``): no redraw is committed, and the run then
    equals one without the bad step."""
    _assert_a_skipped_step_changes_nothing(remap_every=2, steps_before=2, age=2, steps_after=3)  # a redraw was due


def test_a_skipped_step_between_redraws_does_not_count_toward_the_next():
    """With redrawn maps the step is decided on the host (``host_decides``), so a skipped step that is
    not a redraw leaves ``age`` as it was too: the run equals one without the bad step."""
    _assert_a_skipped_step_changes_nothing(remap_every=3, steps_before=1, age=1, steps_after=5)


def test_default_additive_decides_on_the_device_and_remapped_on_the_host():
    """``remap_every=0`` commits nothing and reads nothing on the host (the step compiles whole,
    ``tests/test_compile.py``); ``remap_every>0`` is decided on the host every step."""
    model, x, y = _model()
    weight = model[0].weight
    plain = LoRAAdam([weight], rank=3, projection="additive")
    remapped = LoRAAdam([weight], rank=3, projection="additive", remap_every=2)
    for opt in (plain, remapped):
        weight.grad = torch.ones_like(weight)
        opt.step()
    additive = get_projection("additive")
    assert not additive.host_decides(plain.state[weight], plain.param_groups[0])
    assert additive.host_decides(remapped.state[weight], remapped.param_groups[0])


def test_a_compiled_step_with_redrawn_maps_equals_the_eager_step():
    """``torch.compile(opt.step)`` (not ``fullgraph``: the step reads its flags on the host and the
    maps are host objects) through three redraws equals the eager step."""
    import torch._dynamo

    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model, x, y = _model()
        opt = LoRAAdam(model.parameters(), rank=3, projection="additive", lr=0.02, remap_every=2,
                       moment_rule="transport")
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(7):
            nn.functional.cross_entropy(model(x), y).backward()
            step()
            opt.zero_grad()
        assert opt.state[model[0].weight]["draws"] == 4
        runs.append([p.detach().clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)  # traced Adam (plain ops) against the fused kernel
