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


def test_in_place_input_change_and_second_backward_raise():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = make_optimizer(model)
    opt.attach(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    hidden = model[1](model[0](x))
    out = model[2](hidden)
    with torch.no_grad():
        hidden.mul_(2)  # the input of model[2] is changed after it was used
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_attaching_twice_raises():
    model = make_model()
    opt = make_optimizer(model)
    opt.attach(model)
    with pytest.raises(ValueError, match="already attached"):
        opt.attach(copy.copy(model))


def test_tiny_bert_all_modes_agree():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = transformers.BertModel(config, add_pooling_layer=False).double()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 50, (3, 8), generator=generator) for _ in range(4)]
    probe = torch.randn(16, 3, generator=generator, dtype=torch.float64)

    def weights_of(model):
        return torch.cat([m.weight.detach().reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)])

    def run(mode):
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        for p in weights:
            p.requires_grad_(True)
        opt = LoRAAdam(weights, lr=1e-2, rank=2, alpha=4.0, init="symmetric")
        if mode == "per_layer":
            opt.enable_per_layer()
        elif mode == "activation":
            opt.attach(model)
        for step in range(2):
            for k in range(2):
                hidden = model(input_ids=ids[2 * step + k]).last_hidden_state
                ((hidden @ probe).pow(2).mean() / 2).backward()
            opt.step()
            opt.zero_grad()
        return weights_of(model)

    plain = run("plain")
    assert rel(plain, weights_of(base)) > 1e-3
    for mode in ("per_layer", "activation"):
        assert rel(run(mode), plain) <= TOL, mode


def test_factor_dtype_for_low_precision_layers():
    # bf16 layers: X and δY are converted to the fp32 factor dtype before the products.
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = make_optimizer(model)
    opt.attach(model)
    model(torch.randn(5, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    state = opt.state[model[0].weight]
    assert state[ACCUMULATOR_KEYS[0]].dtype == factor_dtype(torch.bfloat16) == torch.float32
    before = model[0].weight.detach().clone()
    opt.step()
    assert state["step"] == 1 and ACCUMULATOR_KEYS[0] not in state
    assert not torch.equal(model[0].weight, before)


class _OutputShapedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op results of one shape that own new memory (views and aliases are not counted)."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.made: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        for t in results:
            if (isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape
                    and t.untyped_storage().data_ptr() not in inputs):
                self.made.append(str(func))
        return out


def test_attach_makes_no_output_sized_tensor_and_no_reduction():
    """The mode's tap adds no output-sized tensor in the forward and no reduction over ``δY`` in the
    backward: the same output-shaped results as a layer whose weight is frozen (which was not so
    with ``Y' = Y + a``: an add in the forward, a sum in the backward, per layer call)."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5, bias=False).double()
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)

    def counted() -> list[str]:
        with _OutputShapedTensors((3, 4, 5)) as mode:
            y = layer(x)
            torch.relu_(y)
            y.square().sum().backward()
        return sorted(op for op in mode.made if op != "aten.relu_.default")

    layer.weight.requires_grad_(False)
    frozen = counted()
    layer.weight.requires_grad_(True)
    opt = LoRAAdam(layer.parameters(), rank=2)
    with opt.attach(layer):
        attached = counted()
    assert attached == frozen
    assert opt.state[layer.weight]  # the piece was taken
