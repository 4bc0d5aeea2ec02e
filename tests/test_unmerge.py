"""``unmerge_`` puts the weights back to their base; task switching on one base model.

Unmerging moves the factors back to their initial values with the write of a normal step, so it
is exact up to the rounding of the writes: in fp32 to a few float32 ulps of the change (measured
worst 3.9e-7 relative after 100 steps that moved ``W`` by 95%), and for bf16 weights with the
``compensated`` writer the Kahan buffer carries what every write rounded away, so ``W₀`` comes back
bit for bit for ≥ 99.6% of the elements (relative error 8e-7 measured) where ``nearest`` writes
leave 4e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import interop_models as im
from lora_optim import LoRAAdam, export_peft_adapter, load_peft_adapter, unmerge_


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    return model.to(dtype)


def _train_mlp(dtype, steps=100, **options):
    torch.set_num_threads(1)
    model = _mlp(dtype)
    base = copy.deepcopy(model)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    opt = LoRAAdam([{"params": weights, "rank": 8, "alpha": 16}], lr=1e-3, **options)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 64, generator=gen), torch.randn(64, 8, generator=gen)
    for _ in range(steps):
        (model(x.to(dtype)).float() - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    pairs = [(m.weight, b.weight) for m, b in zip(model, base) if isinstance(m, nn.Linear)]
    assert max(im.relative(w.detach().float(), w0.float()) for w, w0 in pairs) > 0.1  # W moved a lot
    return model, opt, pairs


@pytest.mark.parametrize("init", ["peft", "symmetric"])
def test_fp32_unmerge_restores_the_base_to_float_rounding(init):
    model, opt, pairs = _train_mlp(torch.float32, init=init, keep_initial_factors=True)
    restored = unmerge_(model, opt)
    assert restored == ["0.weight", "2.weight", "4.weight"]
    for w, w0 in pairs:
        assert im.relative(w.detach(), w0) <= 2e-6


@pytest.mark.parametrize("init", ["peft", "symmetric"])
def test_bf16_compensated_unmerge_gives_the_base_back_bit_for_bit_almost_everywhere(init):
    model, opt, pairs = _train_mlp(torch.bfloat16, init=init, keep_initial_factors=True, precision="compensated")
    unmerge_(model, opt)
    for w, w0 in pairs:
        exact = (w == w0).float().mean().item()
        assert exact >= 0.99, f"only {exact:.4f} of the elements are W0's"
        assert im.relative(w.detach().float(), w0.float()) <= 1e-5


def test_bf16_stochastic_unmerge_leaves_unbiased_rounding_noise():
    """The default for bf16: every write is rounded stochastically, so after 100 steps and the
    unmerge W is W0 plus the rounding noise of 101 writes (measured 2.4–2.8% relative, against
    4.0–4.5% for ``nearest``), with a zero mean; W0 bit for bit takes ``compensated``. (The noise
    is not independent of the trained change: the gradients see the noisy W, so the factors
    partly answer it; only its mean is tested.)"""
    model, opt, pairs = _train_mlp(torch.bfloat16)
    unmerge_(model, opt)
    for w, w0 in pairs:
        error = w.detach().double() - w0.double()
        assert im.relative(w.detach().float(), w0.float()) <= 3.5e-2
        assert abs(error.sum() / error.square().sum().sqrt()) < 5  # ~N(0, 1) for zero-mean errors


def test_bf16_nearest_writes_lose_the_base():
    """The contrast that makes the compensated writer the one for exact unmerging: with
    round-to-nearest writes the same unmerge is 1000x further from W0."""
    model, opt, pairs = _train_mlp(torch.bfloat16, precision="nearest")
    unmerge_(model, opt)
    assert min(im.relative(w.detach().float(), w0.float()) for w, w0 in pairs) > 1e-2


def test_after_unmerge_training_continues_and_the_adapter_is_empty(tmp_path):
    model = im.make_small()
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, dense=())
    im.train(model, opt)
    unmerge_(model, opt)
    report = export_peft_adapter(model, opt, tmp_path / "empty")
    loaded = im.load_with_peft(base, tmp_path / "empty")
    with torch.no_grad():
        x = im.inputs(model, seed=3)
        assert im.relative(loaded(*x), base(*x)) <= 1e-12
    assert all(module.route == "exact" for module in report.modules)
    im.train(model, opt, seed=20)  # the optimizer trains on from the base
    assert im.relative(model.lin.weight.detach(), base.lin.weight) > 1e-3


@pytest.mark.parametrize("case", ["random", "symmetric-not-kept", "dense-strict"])
def test_unmerge_refuses_what_it_cannot_undo_and_changes_nothing(case):
    model = im.make_small()
    options = {"random": dict(projection="random"), "symmetric-not-kept": dict(init="symmetric")}.get(case, {})
    opt = im.optimizer_for(model, dense=("head.weight",) if case == "dense-strict" else (), **options)
    im.train(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match={"random": "random", "symmetric-not-kept": "keep_initial_factors",
                                          "dense-strict": "strict=False"}[case]):
        unmerge_(model, opt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if case == "dense-strict":
        assert unmerge_(model, opt, strict=False) == list(im.LOW_RANK)
        assert torch.equal(model.head.weight, before["head.weight"])


def test_task_switching_on_one_base_model(tmp_path):
    """Seed 000's recipe: train task 1, export it, unmerge, train task 2, export it; then either
    adapter can be put on the same base (subtract one s·A·B, add the other), and taken off again.
    The head is task-specific (trained densely, saved whole by the adapters)."""
    model = im.make_small()
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, dense=("head.weight", "head.bias"))
    x = im.inputs(model, seed=7)
    im.train(model, opt, seed=100)  # task 1
    export_peft_adapter(model, opt, tmp_path / "task1")
    with torch.no_grad():
        task1 = model(*x)
    unmerge_(model, opt, strict=False)
    im.train(model, opt, seed=200, steps=4)  # task 2
    export_peft_adapter(model, opt, tmp_path / "task2")
    with torch.no_grad():
        task2 = model(*x)
    assert im.relative(task1, task2) > 1e-3
    for name, expected in (("task1", task1), ("task2", task2), ("task1", task1)):
        load_peft_adapter(model, opt, tmp_path / name)
        with torch.no_grad():
            assert im.relative(model(*x), expected) <= 1e-10, name
    unmerge_(model, opt, strict=False)
    for name in im.LOW_RANK:
        assert im.relative(model.get_parameter(name).detach(), base.get_parameter(name)) <= 1e-12, name


def test_unmerge_and_load_refuse_between_backward_and_step(tmp_path):
    """In the per-layer mode the projected pieces of the coming step were made with the current
    factors: moving the factors then would step with stale sums. Both refuse, changing nothing."""
    model = im.make_small()
    opt = im.optimizer_for(model, dense=())
    im.train(model, opt)
    export_peft_adapter(model, opt, tmp_path)
    # A piece for the last low-rank weight only, as a per-layer hook adds it: the others would be
    # moved first if the check came late.
    opt.accumulate_grad_(model.conv.weight, torch.ones_like(model.conv.weight))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="conv.weight.*nothing was changed"):
        unmerge_(model, opt)
    with pytest.raises(RuntimeError, match="conv.*nothing was changed"):
        load_peft_adapter(model, opt, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
