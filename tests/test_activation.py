"""Activation-side mode (factor gradients from X and δY, no G) against the plain mode, float64."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from grad_modes import (
    MODE_PROJECTIONS,
    PROJECTION_CASES,
    PROJECTION_IDS,
    TOL,
    flat,
    loss_fn,
    make_batches,
    make_model,
    make_optimizer,
    rel,
    train,
    twin_runs,
)
from lora_optim import ActivationSide, LoRAAdam, available_projections, get_projection
from lora_optim.state_keys import ACCUMULATOR_KEYS
from lora_optim.precision import factor_dtype


def _assert_same_trajectory(expected, got):
    assert len(expected) == len(got)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) <= TOL, f"step {step + 1}: relative difference {rel(a, b):.3e}"


@given(
    rows=st.integers(1, 9), out_features=st.integers(1, 11), in_features=st.integers(1, 11),
    rank=st.integers(1, 6), name=st.sampled_from(available_projections()), seed=st.integers(0, 2**16),
)
def test_project_activations_equals_project_of_G(rows, out_features, in_features, rank, name, seed):
    rank = min(rank, out_features, in_features)
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, in_features, generator=generator, dtype=torch.float64)
    dY = torch.randn(rows, out_features, generator=generator, dtype=torch.float64)
    A = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
    B = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
    projection = get_projection(name)
    expected = projection.project(dY.t() @ X, A, B)
    got = projection.project_activations(X, dY, A, B)
    for e, g in zip(expected, got):
        if e is None:  # a factor that does not train (``svd``'s frozen basis): no gradient either way
            assert g is None
            continue
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# Every case with accumulation over 3 micro-batches; the registered defaults also without.
CASES = [(*case, 3) for case in PROJECTION_CASES] + [(name, {}, 1) for name in MODE_PROJECTIONS]
CASE_IDS = [f"{case_id}-micro3" for case_id in PROJECTION_IDS] + [f"{name}-micro1" for name in MODE_PROJECTIONS]


@pytest.mark.parametrize("projection,options,micro_batches", CASES, ids=CASE_IDS)
def test_matches_plain_mode(projection, options, micro_batches):
    (plain_model, plain_opt), (model, opt) = twin_runs("net", projection, options)
    batches = make_batches("net")
    expected = train(plain_model, plain_opt, batches, micro_batches=micro_batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight is handled: no fallback warning
        handle = opt.attach(model)
    assert handle.fallback == {}
    assert sorted(handle.attached) == sorted(n for n, p in model.named_parameters() if p.ndim >= 2)
    got = train(model, opt, batches, micro_batches=micro_batches)
    _assert_same_trajectory(expected, got)
    assert rel(got[-1], flat(make_model())) > 1e-3  # it trained


@pytest.mark.parametrize("projection", ["lora", "random", "additive"])
def test_weight_sharing_matches_plain_mode(projection):
    (plain_model, plain_opt), (model, opt) = twin_runs("shared", projection, {})
    batches = make_batches("shared")
    expected = train(plain_model, plain_opt, batches, micro_batches=2)
    opt.attach(model)
    _assert_same_trajectory(expected, train(model, opt, batches, micro_batches=2))


def test_weights_do_not_require_grad_until_detached():
    model = make_model()
    opt = make_optimizer(model)
    weights = [p for p in model.parameters() if p.ndim >= 2]
    with opt.attach(model) as handle:
        assert isinstance(handle, ActivationSide)
        assert not any(p.requires_grad for p in weights)
        loss_fn(model, make_batches("net")[0]).backward()
        assert all(p.grad is None for p in weights)  # G never formed
        assert all(p.grad is not None for p in model.parameters() if p.ndim < 2)  # biases: usual path
        assert any(ACCUMULATOR_KEYS[0] in opt.state[p] for p in weights)
        opt.step()
        opt.zero_grad()
    assert all(p.requires_grad for p in weights)
    loss_fn(model, make_batches("net")[0]).backward()
    assert all(p.grad is not None for p in weights)


def test_frozen_inputs_and_first_layer():
    # Only the attached weights train: no input of fc1 requires grad, yet its factors must learn.
    (plain_model, plain_opt), (model, opt) = twin_runs("net", "lora", {"init": "symmetric"})
    for m in (plain_model, model):
        for p in m.parameters():
            p.requires_grad_(p.ndim >= 2)
    batches = make_batches("net")
    expected = train(plain_model, plain_opt, batches)
    opt.attach(model)
    _assert_same_trajectory(expected, train(model, opt, batches))


def test_conv_falls_back_to_G_with_a_warning():
    (plain_model, plain_opt), (model, opt) = twin_runs("conv", "lora", {})
    batches = make_batches("conv")
    expected = train(plain_model, plain_opt, batches, micro_batches=2)
    with pytest.warns(UserWarning, match=r"conv\.weight"):
        handle = opt.attach(model)
    assert list(handle.fallback) == ["conv.weight"]
    assert sorted(handle.attached) == ["fc1.weight", "fc2.weight"]
    assert model.conv.weight.requires_grad
    _assert_same_trajectory(expected, train(model, opt, batches, micro_batches=2))


def test_functional_and_tied_weights_fall_back():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.attention = nn.MultiheadAttention(6, 2)
            self.decoder = nn.Linear(6, 10, bias=False)
            self.decoder.weight = self.embed.weight  # tied
            self.proj = nn.Linear(6, 6)

    model = Model()
    opt = make_optimizer(model)
    with pytest.warns(UserWarning, match="full-gradient") as record:
        handle = opt.attach(model)
    assert handle.attached == ["proj.weight"]
    assert set(handle.fallback) == {"embed.weight", "attention.in_proj_weight", "attention.out_proj.weight"}
    assert "attention.out_proj.weight" in str(record[0].message)
    handle.detach()
    with pytest.raises(TypeError, match="nn.Module"):
        opt.attach([model])


def test_state_dict_round_trip_during_accumulation():
    (plain_model, plain_opt), (model, opt) = twin_runs("net", "random", {})
    for m in (plain_model, model):
        for p in m.parameters():
            p.requires_grad_(p.ndim >= 2)  # dense p.grad is in no state_dict, as in the plain mode
    batches = make_batches("net")
    expected = train(plain_model, plain_opt, batches, micro_batches=2, steps=3, schedule=False)
    opt.attach(model)
    train(model, opt, batches, micro_batches=2, steps=1, schedule=False)
    (loss_fn(model, batches[2]) / 2).backward()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    for p in resumed.parameters():
        p.requires_grad_(p.ndim >= 2)
    resumed_opt = make_optimizer(resumed, "random")
    resumed_opt.load_state_dict(saved["opt"])
    resumed_opt.attach(resumed)
    (loss_fn(resumed, batches[3]) / 2).backward()
    resumed_opt.step()
    resumed_opt.zero_grad()
    got = [flat(resumed)] + train(resumed, resumed_opt, batches, micro_batches=2, steps=1, schedule=False,
                                  first_batch=4)
    _assert_same_trajectory(expected[1:], got)
    assert not any(ACCUMULATOR_KEYS[0] in s for s in resumed_opt.state_dict()["state"].values())


def test_zero_grad_discards_and_no_grad_forward_is_ignored():
    (plain_model, plain_opt), (model, opt) = twin_runs("net", "lora", {})
    batches = make_batches("net")
    opt.attach(model)
    for m, o in ((plain_model, plain_opt), (model, opt)):
        loss_fn(m, batches[0]).backward()
        o.zero_grad()  # discarded
        with torch.no_grad():
            m(batches[1][0])  # evaluation in between
        loss_fn(m, batches[2]).backward()
        o.step()
        o.zero_grad()
    assert rel(flat(model), flat(plain_model)) <= TOL


def test_in_place_input_change_raises_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = make_optimizer(model)
    opt.attach(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    hidden = model[1](model[0](x))
    out = model[2](hidden)
    with torch.no_grad():
        hidden.mul_(2)  # the input of model[2] is changed after it was used
    with pytest.raises(RuntimeError, match=r"2\.weight: the layer's input was modified in place"):
        out.sum().backward()


def _second_backward_run(attach: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = make_optimizer(model)
    if attach:
        opt.attach(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()  # a plain backward adds G to W.grad a second time
    opt.step()
    return flat(model)


def test_second_backward_through_a_retained_graph_adds_again_like_the_plain_mode():
    assert rel(_second_backward_run(attach=True), _second_backward_run(attach=False)) <= TOL


class _CheckpointedNet(nn.Module):
    """Two blocks of Linear layers, each under non-reentrant activation checkpointing."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@pytest.mark.parametrize("projection,options", PROJECTION_CASES, ids=PROJECTION_IDS)
def test_activation_checkpointing_recomputes_x_and_equals_the_plain_mode(projection, options):
    """Under non-reentrant checkpointing the tap's saved ``X`` is freed and recomputed like any
    saved tensor (the recomputed forward's taps never reach the loss), and training equals the
    plain mode without checkpointing."""
    runs = []
    for attach, checkpointed in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = _CheckpointedNet(checkpointed).double()
        opt = LoRAAdam([{"params": [m.weight for m in model.modules() if isinstance(m, nn.Linear)]},
                        {"params": [m.bias for m in model.modules() if isinstance(m, nn.Linear)], "rank": None}],
                       lr=1e-2, rank=2, projection=projection, **options)
        if attach:
            opt.attach(model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append(flat(model))
    assert rel(runs[1], runs[0]) <= TOL


def test_attach_under_checkpointing_keeps_no_input_alive():
    """The tap keeps ``X`` only as a saved tensor, so after a checkpointed forward the inputs of the
    attached layers inside the blocks are freed (they are recomputed in the backward); without
    checkpointing they are kept, as autograd keeps them."""
    from torch.multiprocessing.reductions import StorageWeakRef

    for checkpointed, expect_alive in ((True, False), (False, True)):
        model = _CheckpointedNet(checkpointed).double()
        opt = make_optimizer(model)
        opt.attach(model)
        inputs = []
        hooks = [block[2].register_forward_hook(lambda m, args, out: inputs.append(StorageWeakRef(args[0].untyped_storage())))
                 for block in model.blocks]
        x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        out = model(x)
        alive = [not ref.expired() for ref in inputs[:2]]  # the forward's, not the recomputation's
        assert alive == [expect_alive] * 2, (checkpointed, alive)
        out.sum().backward()
        opt.step()
        for hook in hooks:
            hook.remove()
