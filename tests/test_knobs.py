"""``max_grad_norm``, ``loraplus_lr_ratio``, ``use_rslora`` against a graph twin, in every mode, float64.

The oracle is an explicit graph LoRA (``W = W0 − s·A0B0 + s·A·B`` through
``torch.func.functional_call``, :mod:`tests.twins`) trained by ``torch.optim.AdamW`` with
``torch.nn.utils.clip_grad_norm_`` over all its trainable tensors (factors *and* the dense biases
of the clipped group), ``A`` at ``lr × ratio``, and ``s = alpha/√r`` for rsLoRA. The MiniLM
comparison with PEFT itself is ``tests/test_knobs_peft.py``; here the dense parameters take part
in the clip, and the per-layer and activation-side modes (which step with projected sums) are
checked against the plain mode.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grad_modes import flat, loss_fn, make_batches, make_model, rel, train
from lora_optim import LoRAAdam
from twins import GraphTwin

TOL = 1e-10
RANK, ALPHA = 3, 6.0


def _ours(model, *, projection="lora", clip_dense=True, **knobs) -> LoRAAdam:
    weights = [p for p in model.parameters() if p.ndim >= 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    dense = {"params": biases, "rank": None, "weight_decay": 0.01}
    if clip_dense and "max_grad_norm" in knobs:
        dense["max_grad_norm"] = knobs["max_grad_norm"]
    return LoRAAdam([{"params": weights, "rank": RANK, "alpha": ALPHA, "weight_decay": 0.1, **knobs}, dense],
                    lr=2e-2, betas=(0.9, 0.99), projection=projection, seed=3)


def _twin(model, opt: LoRAAdam, *, ratio: float, rslora: bool) -> GraphTwin:
    """The graph twin of ``opt`` (which trains ``model``), on a copy of ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    scale = ALPHA / (math.sqrt(RANK) if rslora else RANK)
    factors = {names[id(p)]: (*opt.get_factors(p), scale) for p in opt.param_groups[0]["params"]}
    dense = [names[id(p)] for p in opt.param_groups[1]["params"]]
    twin = GraphTwin(copy.deepcopy(model), factors, dense, [{"names": list(factors), "lr": 2e-2, "betas": (0.9, 0.99),
                                              "weight_decay": 0.1}])
    hyper = dict(betas=(0.9, 0.99), foreach=False)
    twin.optimizer = torch.optim.AdamW([
        {"params": list(twin.A.values()), "lr": 2e-2 * ratio, "weight_decay": 0.1},
        {"params": list(twin.B.values()), "lr": 2e-2, "weight_decay": 0.1},
        {"params": list(twin.dense.values()), "lr": 2e-2, "weight_decay": 0.01},
    ], **hyper)
    return twin


@pytest.mark.parametrize("knobs", [
    {"max_grad_norm": 0.1},
    {"loraplus_lr_ratio": 8.0},
    {"use_rslora": True},
    {"max_grad_norm": 0.1, "loraplus_lr_ratio": 8.0, "use_rslora": True},
], ids=["clip", "loraplus", "rslora", "all"])
def test_matches_graph_twin_step_by_step(knobs):
    model = make_model()
    opt = _ours(model, **knobs)
    twin = _twin(model, opt, ratio=knobs.get("loraplus_lr_ratio", 1.0), rslora=knobs.get("use_rslora", False))
    batches = make_batches("net")
    clipped = 0
    for step in range(6):
        batch = batches[step % len(batches)]
        twin.optimizer.zero_grad()
        twin.loss(lambda out: _ce(out, batch), batch[0]).backward()
        if "max_grad_norm" in knobs:
            params = [*twin.A.values(), *twin.B.values(), *twin.dense.values()]
            clipped += torch.nn.utils.clip_grad_norm_(params, knobs["max_grad_norm"]).item() > knobs["max_grad_norm"]
        twin.optimizer.step()
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        theirs = twin.weights()
        for name, p in model.named_parameters():
            assert rel(p.detach(), theirs[name].detach()) <= TOL, f"step {step + 1}: {name} differs"
    if "max_grad_norm" in knobs:
        assert clipped >= 3, "the clip should act"


def _ce(logits, batch):
    _, y = batch
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_clip_counts_only_the_groups_that_set_it():
    """A dense group without max_grad_norm is neither clipped nor counted: its gradient stays as
    autograd left it, and the low-rank group equals a run of the twin clipped over the factors only."""
    model = make_model()
    opt = _ours(model, clip_dense=False, max_grad_norm=0.1)
    twin = _twin(model, opt, ratio=1.0, rslora=False)
    batch = make_batches("net")[0]
    loss_fn(model, batch).backward()
    biases_before = [p.grad.clone() for p in opt.param_groups[1]["params"]]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(opt.param_groups[1]["params"], biases_before))
    twin.loss(lambda out: _ce(out, batch), batch[0]).backward()
    assert torch.nn.utils.clip_grad_norm_([*twin.A.values(), *twin.B.values()], 0.1) > 0.1
    twin.optimizer.step()
    theirs = twin.weights()
    for name, p in model.named_parameters():
        assert rel(p.detach(), theirs[name].detach()) <= TOL, name


@pytest.mark.parametrize("projection", ["lora", "additive", "random"])
@pytest.mark.parametrize("mode", ["per_layer", "activation"])
def test_modes_with_knobs_match_the_plain_mode(projection, mode):
    knobs = dict(max_grad_norm=0.3, loraplus_lr_ratio=4.0, use_rslora=True)
    model = make_model()
    other = copy.deepcopy(model)
    batches = make_batches("net")
    expected = train(model, _ours(model, projection=projection, **knobs), batches, micro_batches=2)
    opt = _ours(other, projection=projection, **knobs)
    handle = opt.enable_per_layer() if mode == "per_layer" else opt.attach(other)
    got = train(other, opt, batches, micro_batches=2)
    handle.remove()
    for step, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) <= TOL, f"step {step + 1}: relative difference {rel(a, b):.3e}"
    assert rel(got[-1], flat(make_model())) > 1e-3


def test_clip_under_grad_scaler_equals_the_unscaled_run():
    """The norm is taken on unscaled gradients: a GradScaler (a power of two, exact) changes nothing."""
    model = make_model()
    other = copy.deepcopy(model)
    batches = make_batches("net")
    expected = train(model, _ours(model, max_grad_norm=0.3), batches, schedule=False)
    opt = _ours(other, max_grad_norm=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(len(expected)):
        scaler.scale(loss_fn(other, batches[step])).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert rel(flat(other), expected[step]) <= 1e-13, f"step {step + 1}"


@given(ratio=st.floats(0.25, 16.0), alpha=st.floats(0.5, 32.0), rank=st.integers(1, 6), rslora=st.booleans())
def test_scale_and_ratio_options(ratio, alpha, rank, rslora):
    model = torch.nn.Linear(8, 7)
    opt = LoRAAdam(model.parameters(), rank=rank, alpha=alpha, use_rslora=rslora, loraplus_lr_ratio=ratio)
    expected = alpha / (math.sqrt(rank) if rslora else rank)
    assert opt.factor_scale(model.weight) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match="factor_scale"):
        opt.factor_scale(model.bias)


@pytest.mark.parametrize("option,value", [
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("max_grad_norm", float("inf")), ("max_grad_norm", "1"),
    ("loraplus_lr_ratio", 0.0), ("loraplus_lr_ratio", None), ("use_rslora", 1), ("use_rslora", "yes"),
    ("keep_initial_factors", 0),
])
def test_bad_knob_values_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        LoRAAdam(torch.nn.Linear(3, 2).parameters(), **{option: value})
    with pytest.raises(ValueError, match=option):
        LoRAAdam([{"params": torch.nn.Linear(3, 2).parameters(), option: value}])


def test_boolean_options_take_numpy_bools():
    import numpy as np

    opt = LoRAAdam(torch.nn.Linear(3, 2).parameters(), use_rslora=np.True_, keep_initial_factors=np.False_)
    assert opt.param_groups[0]["use_rslora"] is True and opt.param_groups[0]["keep_initial_factors"] is False


def test_knobs_round_trip_through_state_dict_with_weights_only():
    model = make_model()
    opt = _ours(model, max_grad_norm=0.5, loraplus_lr_ratio=2.0, use_rslora=True, keep_initial_factors=True,
                init="symmetric")
    train(model, opt, make_batches("net"), steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = _ours(copy.deepcopy(model), max_grad_norm=1.0, loraplus_lr_ratio=1.0, use_rslora=False,
                  keep_initial_factors=True, init="symmetric")
    fresh.load_state_dict(loaded)
    group = fresh.param_groups[0]
    assert (group["max_grad_norm"], group["loraplus_lr_ratio"], group["use_rslora"]) == (0.5, 2.0, True)
    p = fresh.param_groups[0]["params"][0]
    A0, B0 = fresh.initial_factors(p)
    assert torch.equal(A0, opt.initial_factors(opt.param_groups[0]["params"][0])[0])
