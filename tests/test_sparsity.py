"""``preserve_sparsity=True`` (LoRS): zeros stay exactly zero in every precision and mode, and the
trajectory equals an explicit masked graph twin ``W = W_res + s·Δ(A, B) ⊙ M`` in float64."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from grad_modes import MODE_PROJECTIONS, loss_fn, make_batches, make_model, rel
from lora_optim import LoRAAdam, available_writers, optimizer_state_bytes
from lora_optim.sparsity import mask_bytes, pack_mask, unpack_mask
from twins import additive_delta, lora_delta, prune_

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


class MaskedTwin:
    """``W = (W0 − s·Δ(A0, B0) ⊙ M) + s·Δ(A, B) ⊙ M`` for each factorised weight (autograd computes the
    factor gradients), other trainable parameters directly; ``torch.optim.AdamW`` (single-tensor)."""

    def __init__(self, model, factors, masks, dense, hyper, delta=lora_delta):
        self.model, self.delta, self.masks = model, delta, masks
        params = dict(model.named_parameters())
        self.scale = {n: s for n, (_, _, s) in factors.items()}
        self.base = {n: params[n].detach() - s * (delta(A, B) * masks[n]).reshape(params[n].shape)
                     for n, (A, B, s) in factors.items()}
        self.A = {n: nn.Parameter(A.clone()) for n, (A, _, _) in factors.items()}
        self.B = {n: nn.Parameter(B.clone()) for n, (_, B, _) in factors.items()}
        self.dense = {n: nn.Parameter(params[n].detach().clone()) for n in dense}
        trained = [t for n in factors for t in (self.A[n], self.B[n])] + list(self.dense.values())
        self.optimizer = torch.optim.AdamW(trained, foreach=False, **hyper)

    def weights(self):
        weights = dict(self.dense)
        for n, base in self.base.items():
            weights[n] = base + self.scale[n] * (self.delta(self.A[n], self.B[n]) * self.masks[n]).reshape(base.shape)
        return weights

    def step(self, batch) -> float:
        self.optimizer.zero_grad()
        x, y = batch
        logits = functional_call(self.model, self.weights(), (x,))
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _sparse_model():
    model = make_model()
    masks = {n: prune_(p) for n, p in model.named_parameters() if p.ndim >= 2}
    return model, masks


def _optimizer(model, projection="lora", **options):
    weights = [p for p in model.parameters() if p.ndim >= 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    return LoRAAdam([{"params": weights, "rank": 3, "alpha": 6.0, "weight_decay": 0.1},
                     {"params": biases, "rank": None, "weight_decay": 0.01}],
                    lr=2e-2, betas=(0.9, 0.99), projection=projection, preserve_sparsity=True, seed=3, **options)


def _zeros_kept(model, masks) -> bool:
    params = dict(model.named_parameters())
    return all(torch.equal(params[n][~m], torch.zeros_like(params[n][~m])) for n, m in masks.items())


@given(rows=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_pack_and_unpack_round_trip(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    assert packed.numel() == mask_bytes(rows, cols)
    assert torch.equal(unpack_mask(packed, cols), mask)
    assert torch.equal(unpack_mask(packed[rows // 2:], cols), mask[rows // 2:])


@pytest.mark.parametrize("projection,options,delta", [
    ("lora", {}, lora_delta),
    ("lora", {"init": "symmetric"}, lora_delta),
    ("lora", {"init": "pissa", "svd_niter": None}, lora_delta),
    ("additive", {}, additive_delta),
], ids=["lora", "lora-symmetric", "lora-pissa", "additive"])
def test_matches_the_masked_graph_twin(projection, options, delta):
    """18 float64 steps of a 50%-pruned net (measured worst relative difference 4.1e-16)."""
    model, masks = _sparse_model()
    ours = copy.deepcopy(model)
    opt = _optimizer(ours, projection, **options)
    named = dict(ours.named_parameters())
    factors = {n: (*opt.get_factors(named[n]), 2.0) for n in masks}
    dense = [n for n in named if n not in masks]
    # One AdamW per group in the twin: both groups' settings, as LoRAAdam has them.
    twin = MaskedTwin(model, factors, masks, [], dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
                      delta=delta)
    twin.dense = {n: nn.Parameter(named[n].detach().clone()) for n in dense}
    twin.optimizer.add_param_group({"params": list(twin.dense.values()), "weight_decay": 0.01})
    batches = make_batches("net", count=6)
    with torch.no_grad():
        first = sum(loss_fn(ours, b).item() for b in batches)
    for step in range(18):
        batch = batches[step % len(batches)]
        loss = loss_fn(ours, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        twin_loss = twin.step(batch)
        assert abs(loss.item() - twin_loss) <= TOL * abs(twin_loss), (step, loss.item(), twin_loss)
        weights = twin.weights()
        for n, p in named.items():
            assert rel(p, weights[n]) <= TOL, (step, n, rel(p, weights[n]))
        assert _zeros_kept(ours, masks)
    with torch.no_grad():
        assert sum(loss_fn(ours, b).item() for b in batches) < 0.99 * first  # it trained (random labels: slowly)
    assert all((named[n].detach() - model.state_dict()[n])[m].abs().max() > 1e-3 for n, m in masks.items())


def test_the_twin_comparison_fails_without_the_mask():
    """The same run without ``preserve_sparsity`` leaves the twin at the first step (and moves zeros)."""
    model, masks = _sparse_model()
    ours = copy.deepcopy(model)
    weights = [p for p in ours.parameters() if p.ndim >= 2]
    opt = LoRAAdam([{"params": weights, "rank": 3, "alpha": 6.0, "weight_decay": 0.1}], lr=2e-2, betas=(0.9, 0.99),
                   seed=3)
    named = dict(ours.named_parameters())
    for n, p in named.items():
        p.requires_grad_(n in masks)
    factors = {n: (*opt.get_factors(named[n]), 2.0) for n in masks}
    twin = MaskedTwin(model, factors, masks, [], dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1))
    batch = make_batches("net")[0]
    loss_fn(ours, batch).backward()
    opt.step()
    twin.step(batch)
    assert max(rel(named[n], w) for n, w in twin.weights().items()) > 1e-4
    assert not _zeros_kept(ours, masks)


@pytest.mark.parametrize("mode", ["per_layer", "activation"])
@pytest.mark.parametrize("projection", MODE_PROJECTIONS)
def test_modes_equal_the_plain_mode(mode, projection):
    """The per-layer mode masks each piece; the activation-side mode forms each piece's G and masks it."""
    model, masks = _sparse_model()
    other = copy.deepcopy(model)
    batches = make_batches("net")
    runs = []
    for m, use_mode in ((model, False), (other, True)):
        opt = _optimizer(m, projection)
        handle = None
        if use_mode:
            handle = opt.enable_per_layer() if mode == "per_layer" else opt.attach(m)
        trajectory = []
        for step in range(4):
            for micro in range(3):
                (loss_fn(m, batches[(3 * step + micro) % len(batches)]) / 3).backward()
            opt.step()
            opt.zero_grad()
            trajectory.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
        if handle is not None:
            handle.remove()
        runs.append(trajectory)
        assert _zeros_kept(m, masks)
    for step, (a, b) in enumerate(zip(*runs)):
        assert rel(b, a) <= TOL, (step, rel(b, a))


@pytest.mark.parametrize("precision", available_writers())
@pytest.mark.parametrize("projection", ["lora", "additive", "random"])
def test_zeros_stay_zero_in_every_precision_mode(precision, projection):
    model, masks = _sparse_model()
    model.to(torch.bfloat16)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _optimizer(model, projection, precision=precision)
    for step, batch in enumerate(make_batches("net", count=10)):
        x, y = batch
        logits = model(x.to(torch.bfloat16)).float()
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        p = params[n].detach()
        assert torch.equal(p[~m].view(torch.int16), torch.zeros_like(p[~m]).view(torch.int16)), n  # +0.0, bit for bit
        assert (p[m] != initial[n][m]).float().mean() > 0.05, n  # the kept entries did train
        state = opt.state[params[n]]
        if "weight_compensation" in state:
            assert not state["weight_compensation"][~m].any()


def test_mask_is_stored_not_recomputed():
    """A kept weight that lands exactly on 0 (here: set there) stays trainable: M is W₀'s, stored."""
    model, masks = _sparse_model()
    opt = _optimizer(model)
    batches = make_batches("net")
    loss_fn(model, batches[0]).backward()
    opt.step()
    opt.zero_grad()
    weight = model.fc2.weight
    index = masks["fc2.weight"].nonzero()[0].tolist()
    with torch.no_grad():
        weight[tuple(index)] = 0.0
    for batch in batches[1:]:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert weight[tuple(index)] != 0
    assert _zeros_kept(model, masks)


def test_mask_memory_and_checkpoint():
    model, masks = _sparse_model()
    plain = LoRAAdam([p for p in copy.deepcopy(model).parameters() if p.ndim >= 2], rank=3)
    opt = LoRAAdam([p for p in model.parameters() if p.ndim >= 2], rank=3, preserve_sparsity=True)
    for o, m in ((plain, None), (opt, model)):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    expected = sum(mask_bytes(*p.shape) for p in opt.param_groups[0]["params"])
    assert optimizer_state_bytes(opt) - optimizer_state_bytes(plain) == expected
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = LoRAAdam([p for p in model.parameters() if p.ndim >= 2], rank=3, preserve_sparsity=True)
    fresh.load_state_dict(saved)
    p = fresh.param_groups[0]["params"][0]
    assert torch.equal(fresh.state[p]["sparsity_mask"], opt.state[p]["sparsity_mask"])
    dense = LoRAAdam([p for p in model.parameters() if p.ndim >= 2], rank=3)
    with pytest.raises(ValueError, match="preserve_sparsity"):
        dense.load_state_dict(saved)


def test_option_switched_on_after_the_state_exists_raises_with_nothing_changed():
    model, masks = _sparse_model()
    opt = LoRAAdam([p for p in model.parameters() if p.ndim >= 2], rank=3)
    batch = make_batches("net")[0]
    loss_fn(model, batch).backward()
    opt.step()
    opt.zero_grad()
    opt.param_groups[0]["preserve_sparsity"] = True
    loss_fn(model, batch).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="preserve_sparsity"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="True or False"):
        LoRAAdam(model.parameters(), preserve_sparsity=1)


def test_gradient_init_and_svd_projection_see_the_masked_gradient():
    model, masks = _sparse_model()
    probe = copy.deepcopy(model)
    batch = make_batches("net")[0]
    loss_fn(probe, batch).backward()
    masked = probe.fc2.weight.grad * masks["fc2.weight"]
    for projection, options in (("lora", {"init": "gradient"}), ("svd", {})):
        m = copy.deepcopy(model)
        opt = _optimizer(m, projection, svd_niter=None, **options)
        loss_fn(m, batch).backward()
        opt.step()
        A, B = opt.get_factors(m.fc2.weight)  # 9×12: svd takes the left side, A = U_r
        U, _, Vh = torch.linalg.svd(masked, full_matrices=False)
        expected = Vh[:3] if projection == "lora" else U[:, :3].t()
        got = B if projection == "lora" else A.t()
        got = got / got.norm(dim=1, keepdim=True)  # lora's B0 took one step of weight decay
        assert rel(got.abs(), expected.abs()) <= 1e-10, projection
        unmasked = torch.linalg.svd(probe.fc2.weight.grad, full_matrices=False)
        assert rel(got.abs(), (unmasked[2][:3] if projection == "lora" else unmasked[0][:, :3].t()).abs()) > 1e-3


def test_drift_check_sees_the_masked_change():
    model, masks = _sparse_model()
    opt = _optimizer(model, drift_probes=4)
    for batch in make_batches("net"):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for report in opt.drift_report().values():
        assert report.relative_to_change <= 1e-12 and report.change_norm > 0
