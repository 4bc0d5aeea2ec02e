"""Per-layer mode (each low-rank G projected in backward and freed) against the plain mode, float64."""

from __future__ import annotations

import io
import weakref

import pytest
import torch

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
from lora_optim import PerLayerStep
from lora_optim.state_keys import ACCUMULATOR_KEYS


def _assert_same_trajectory(expected, got):
    assert len(expected) == len(got)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) <= TOL, f"step {step + 1}: relative difference {rel(a, b):.3e}"


# Every case with accumulation over 3 micro-batches; the registered defaults also without.
CASES = [(*case, 3) for case in PROJECTION_CASES] + [(name, {}, 1) for name in MODE_PROJECTIONS]
CASE_IDS = [f"{case_id}-micro3" for case_id in PROJECTION_IDS] + [f"{name}-micro1" for name in MODE_PROJECTIONS]


@pytest.mark.parametrize("projection,options,micro_batches", CASES, ids=CASE_IDS)
def test_matches_plain_mode(projection, options, micro_batches):
    (plain_model, plain_opt), (model, opt) = twin_runs("net", projection, options)
    batches = make_batches("net")
    expected = train(plain_model, plain_opt, batches, micro_batches=micro_batches)
    opt.enable_per_layer()
    got = train(model, opt, batches, micro_batches=micro_batches)
    _assert_same_trajectory(expected, got)
    assert rel(got[-1], flat(make_model())) > 1e-3  # it trained


@pytest.mark.parametrize("projection", ["lora", "additive"])
def test_weight_sharing_matches_plain_mode(projection):
    (plain_model, plain_opt), (model, opt) = twin_runs("shared", projection, {})
    batches = make_batches("shared")
    expected = train(plain_model, plain_opt, batches, micro_batches=2)
    opt.enable_per_layer()
    _assert_same_trajectory(expected, train(model, opt, batches, micro_batches=2))


def test_projects_during_backward_and_frees_each_gradient():
    model = make_model()
    opt = make_optimizer(model)
    before = flat(model)
    low_rank = [p for p in model.parameters() if p.ndim >= 2]
    # Registered before the mode's hooks, so it runs first: it sees the gradient being handled.
    alive: list[weakref.ref] = []
    most_alive = []

    def count(p):
        alive.append(weakref.ref(p.grad))
        most_alive.append(sum(ref() is not None for ref in alive))

    for p in low_rank:
        p.register_post_accumulate_grad_hook(count)
    opt.enable_per_layer()
    loss_fn(model, make_batches("net")[0]).backward()
    assert len(most_alive) == len(low_rank)
    assert max(most_alive) == 1, f"live full gradients at the hooks: {most_alive}"
    assert all(p.grad is None for p in low_rank)
    assert all(p.grad is not None for p in model.parameters() if p.ndim < 2)  # dense: p.grad as usual
    assert torch.equal(flat(model), before)  # nothing steps before step()
    assert all(ACCUMULATOR_KEYS[0] in opt.state[p] for p in low_rank)
    opt.step()
    assert rel(flat(model), before) > 0


def test_gradient_count_check_can_fail_in_plain_mode():
    # The same counting hook sees every gradient alive at the end of a plain backward.
    model = make_model()
    alive: list[weakref.ref] = []
    most_alive = []

    def count(p):
        alive.append(weakref.ref(p.grad))
        most_alive.append(sum(ref() is not None for ref in alive))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)
    loss_fn(model, make_batches("net")[0]).backward()
    assert max(most_alive) == len(list(model.parameters()))


@pytest.mark.parametrize("projection,options", [("random", {}), ("lora", {})], ids=["random", "lora"])
def test_zero_grad_discards_the_accumulation_as_in_plain_mode(projection, options):
    (plain_model, plain_opt), (model, opt) = twin_runs("net", projection, options)
    batches = make_batches("net")
    opt.enable_per_layer()
    for m, o in ((plain_model, plain_opt), (model, opt)):
        loss_fn(m, batches[0]).backward()
        o.zero_grad()  # discard the first micro-batch
        loss_fn(m, batches[1]).backward()
        loss_fn(m, batches[2]).backward()
        o.step()
        o.zero_grad()
    assert rel(flat(model), flat(plain_model)) <= TOL


@pytest.mark.parametrize("projection,options", PROJECTION_CASES, ids=PROJECTION_IDS)
def test_state_dict_round_trip_during_accumulation(projection, options):
    (plain_model, plain_opt), (model, opt) = twin_runs("net", projection, options)
    # Dense parameters keep summing in p.grad, which no state_dict holds (as in the plain mode):
    # only the low-rank ones train here, whose projected sums are in the optimizer state.
    for m in (plain_model, model):
        for p in m.parameters():
            p.requires_grad_(p.ndim >= 2)
    batches = make_batches("net")
    expected = train(plain_model, plain_opt, batches, micro_batches=3, steps=3, schedule=False)

    opt.enable_per_layer()
    train(model, opt, batches, micro_batches=3, steps=1, schedule=False)
    (loss_fn(model, batches[3]) / 3).backward()  # first micro-batch of step 2, then save
    assert any(ACCUMULATOR_KEYS[0] in s for s in opt.state_dict()["state"].values())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model = make_model()
    resumed_model.load_state_dict(saved["model"])
    for p in resumed_model.parameters():
        p.requires_grad_(p.ndim >= 2)
    resumed_opt = make_optimizer(resumed_model, projection, **options)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_opt.enable_per_layer()
    for index in (4, 5):
        (loss_fn(resumed_model, batches[index]) / 3).backward()
    assert all(p.grad is None for p in resumed_model.parameters())  # projected inside backward
    resumed_opt.step()
    resumed_opt.zero_grad()
    got = [flat(resumed_model)]
    got += train(resumed_model, resumed_opt, batches, micro_batches=3, steps=1, schedule=False, first_batch=6)
    _assert_same_trajectory(expected[1:], got)
    # After a step and zero_grad the state is the plain mode's: no accumulators, same values.
    resumed_state, plain_state = resumed_opt.state_dict()["state"], plain_opt.state_dict()["state"]
    assert resumed_state.keys() == plain_state.keys()
    for index, state in resumed_state.items():
        assert set(state) == set(plain_state[index])
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert (value - plain_state[index][key]).abs().max() <= TOL * (1 + value.abs().max()), key
            else:
                assert value == plain_state[index][key], key


def test_closure_and_remove():
    (plain_model, plain_opt), (model, opt) = twin_runs("net", "lora", {})
    batch = make_batches("net")[0]

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = loss_fn(m, batch)
            loss.backward()
            return loss
        return closure

    handle = opt.enable_per_layer()
    assert isinstance(handle, PerLayerStep)
    for _ in range(2):
        expected_loss = plain_opt.step(closure_for(plain_model, plain_opt))
        loss = opt.step(closure_for(model, opt))
        assert torch.equal(loss, expected_loss)
    assert rel(flat(model), flat(plain_model)) <= TOL
    handle.remove()
    loss_fn(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters())  # plain again


def test_enabling_twice_raises_and_remove_unregisters():
    opt = make_optimizer(make_model())
    with opt.enable_per_layer() as handle:
        assert opt.grad_modes == (handle,)
        with pytest.raises(ValueError, match="already enabled"):
            opt.enable_per_layer()
    assert opt.grad_modes == ()
    opt.enable_per_layer().remove()


@pytest.mark.parametrize("mode", ["per_layer", "activation"])
def test_nonfinite_gradient_is_skipped_or_refused(mode):
    from lora_optim.nonfinite import NonFiniteGradientError, NonFiniteGradientWarning

    model = make_model()
    opt = make_optimizer(model)
    opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)
    x, y = make_batches("net")[0]
    bad = (x.clone().index_fill_(0, torch.tensor([1]), float("nan")), y)
    before = flat(model)
    with pytest.warns(NonFiniteGradientWarning):
        loss_fn(model, bad).backward()
        opt.step()
    opt.zero_grad()
    assert torch.equal(flat(model), before)
    assert opt.nonfinite_skips() == len(list(model.parameters()))
    loss_fn(model, (x, y)).backward()  # a finite micro-batch steps as usual
    opt.step()
    opt.zero_grad()
    assert not torch.equal(flat(model), before)
    for group in opt.param_groups:
        group["nonfinite"] = "raise"
    with pytest.raises(NonFiniteGradientError):
        loss_fn(model, bad).backward()
        opt.step()
