"""``projection="svd"`` (GaLore-style) against an explicit float64 GaLore loop and against
``galore-torch`` itself; refresh schedule, modes, state."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, optimizer_state_bytes
from lora_optim.projections.svd import LEFT, RIGHT, side_of

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _net(dtype=torch.float64):
    """12×7 (right: out ≥ in), 9×12 and 4×9 (left) weights; biases frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(p.ndim == 2)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 7, generator=generator, dtype=dtype), torch.randint(0, 4, (16,), generator=generator))
               for _ in range(5)]
    return model, batches


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class GaLoreTwin:
    """GaLore written out for one weight: the basis from ``torch.linalg.svd`` of ``G`` every ``gap``
    steps, AdamW (torch's formula) on the projected gradient ``s·R``, the trained factor ``X``
    (restarted at 0 at a refresh, decayed by ``weight_decay``), ``W += s·P·dX`` or ``s·dX·Q``."""

    def __init__(self, weight, rank, gap, scale, lr, betas, eps, weight_decay, rule):
        self.weight, self.rank, self.gap, self.scale = weight, rank, gap, scale
        self.lr, self.betas, self.eps, self.wd, self.rule = lr, betas, eps, weight_decay, rule
        self.left = weight.shape[0] < weight.shape[1]
        self.t = 0  # steps taken
        self.adam_t = 0  # Adam's step count (reset by the "reset" rule)
        self.basis = self.m = self.v = self.X = None

    def step(self, G):
        if self.t % self.gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            new = U[:, : self.rank] if self.left else Vh[: self.rank]
            if self.m is None or self.rule == "reset":
                shape = (self.rank, G.shape[1]) if self.left else (G.shape[0], self.rank)
                self.m, self.v, self.adam_t = torch.zeros(shape, dtype=G.dtype), torch.zeros(shape, dtype=G.dtype), 0
            elif self.rule == "transport":
                self.m = new.t() @ self.basis @ self.m if self.left else self.m @ self.basis @ new.t()
            self.basis = new
            self.X = torch.zeros_like(self.m)
        R = self.basis.t() @ G if self.left else G @ self.basis.t()
        g = self.scale * R
        b1, b2 = self.betas
        self.adam_t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1**self.adam_t)
        v_hat = self.v / (1 - b2**self.adam_t)
        new_X = self.X * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        dX = new_X - self.X
        self.X = new_X
        with torch.no_grad():
            self.weight += self.scale * (self.basis @ dX if self.left else dX @ self.basis)
        self.t += 1


def _step_both(ours, opt, model, twins, batch):
    """One step of ``LoRAAdam`` on ``ours`` and of each explicit GaLore twin on ``model``'s weights."""
    _loss(ours, batch).backward()
    opt.step()
    opt.zero_grad()
    for twin in twins:
        twin.weight.grad = None
    _loss(model, batch).backward()
    for twin in twins:
        twin.step(twin.weight.grad.detach())


@pytest.mark.parametrize("rule", ["keep", "reset", "transport"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_the_explicit_galore_loop(rule, weight_decay):
    """Three refreshes (every 4 steps) of both sides, float64, exact SVD: every weight after every step
    (measured worst relative difference 2.4e-15 over the six cases)."""
    model, batches = _net()
    ours = copy.deepcopy(model)
    weights = [p for p in ours.parameters() if p.ndim == 2]
    hyper = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = LoRAAdam(weights, rank=3, alpha=1.5, projection="svd", refresh_every=4, moment_rule=rule, svd_niter=None,
                   **hyper)
    twin_weights = [p for p in model.parameters() if p.ndim == 2]
    initial = [w.detach().clone() for w in twin_weights]
    twins = [GaLoreTwin(w, 3, 4, 0.5, rule=rule, **hyper) for w in twin_weights]
    assert [t.left for t in twins] == [False, True, True]
    first = _loss(model, batches[0]).item()
    for step in range(12):
        _step_both(ours, opt, model, twins, batches[step % len(batches)])
        for mine, theirs, start in zip(weights, twin_weights, initial):
            assert _rel(mine, theirs) <= TOL, (step, tuple(mine.shape), _rel(mine, theirs))
            # the learnt change itself, not only W
            assert _rel(mine.detach() - start, theirs.detach() - start) <= 1e-9, step
    assert _loss(ours, batches[0]).item() < first
    for p in weights:
        state = opt.state[p]
        assert state["refreshes"] == 3 and state["age"] == 4


def test_the_explicit_loop_comparison_can_fail():
    """A refresh schedule one step off (refresh_every=5 against the twin's 4) is caught."""
    model, batches = _net()
    ours = copy.deepcopy(model)
    weights = [p for p in ours.parameters() if p.ndim == 2]
    hyper = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    opt = LoRAAdam(weights, rank=3, alpha=1.5, projection="svd", refresh_every=5, svd_niter=None, **hyper)
    twin_weights = [p for p in model.parameters() if p.ndim == 2]
    twins = [GaLoreTwin(w, 3, 4, 0.5, rule="keep", **hyper) for w in twin_weights]
    worst = 0.0
    for step in range(6):
        _step_both(ours, opt, model, twins, batches[step % len(batches)])
        worst = max(worst, max(_rel(a, b) for a, b in zip(weights, twin_weights)))
    assert worst > 1e-6


def test_matches_galore_torch():
    """``galore-torch``'s GaLoreAdamW (proj_type "std", update_proj_gap 3, scale 0.25) in float32,
    against ours with ``alpha = scale·rank``, ``moment_rule="keep"``, the exact SVD and a negligible
    ε (the two put ε at different places): the learnt changes agree to float32 rounding."""
    with warnings.catch_warnings():  # galore-torch is a dev dependency: this test never skips
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW
    model, batches = _net(torch.float32)
    ours = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters() if p.ndim == 2]
    theirs_w = [p for p in model.parameters() if p.ndim == 2]
    ours_w = [p for p in ours.parameters() if p.ndim == 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        galore = GaLoreAdamW([{"params": theirs_w, "rank": 2, "update_proj_gap": 3, "scale": 0.25,
                               "proj_type": "std"}], lr=1e-2, eps=1e-30, weight_decay=0.0)
    opt = LoRAAdam(ours_w, rank=2, alpha=0.5, projection="svd", refresh_every=3, svd_niter=None, lr=1e-2,
                   eps=1e-30)
    for step in range(9):  # refreshes at steps 0, 3 and 6
        batch = batches[step % len(batches)]
        for model_, optimizer in ((model, galore), (ours, opt)):
            optimizer.zero_grad()
            _loss(model_, batch).backward()
            optimizer.step()
    for theirs, mine, start in zip(theirs_w, ours_w, initial):
        change = theirs.detach() - start
        assert change.norm() > 1e-3 * start.norm()
        # measured 1.9e-6 (float32 rounding of two different Adam codes over 9 steps): 10x margin
        assert _rel(mine.detach() - start, change) <= 2e-5, _rel(mine.detach() - start, change)


def test_side_by_shape_and_refresh_schedule():
    assert side_of(12, 7) == RIGHT and side_of(7, 7) == RIGHT and side_of(7, 12) == LEFT
    model, batches = _net()
    weights = [p for p in model.parameters() if p.ndim == 2]
    opt = LoRAAdam(weights, rank=2, projection="svd", refresh_every=3, svd_niter=None, lr=1e-2)
    bases = []
    for step in range(7):
        _loss(model, batches[step % len(batches)]).backward()
        G = weights[1].grad.detach().clone()  # 9×12: left, A = P = U_r(G)
        opt.step()
        opt.zero_grad()
        A, B = opt.get_factors(weights[1])
        if step % 3 == 0:
            U = torch.linalg.svd(G, full_matrices=False)[0][:, :2]
            assert _rel(A.abs(), U.abs()) <= 1e-12  # the basis of this step's own G
        bases.append(A)
        A0, B0 = opt.get_factors(weights[0])  # 12×7: right, B = Q orthonormal rows, A trains
        torch.testing.assert_close(B0 @ B0.t(), torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    changed = [not torch.equal(bases[i], bases[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]


def test_randomized_refresh_is_seeded_and_leaves_the_rng_alone():
    runs = []
    for _ in range(2):
        model, batches = _net()
        torch.manual_seed(3)
        rng = torch.get_rng_state()
        opt = LoRAAdam([p for p in model.parameters() if p.ndim == 2], rank=2, projection="svd", refresh_every=2)
        for step in range(5):
            _loss(model, batches[step]).backward()
            opt.step()
            opt.zero_grad()
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("mode", ["per_layer", "activation"])
def test_modes_refuse_a_refresh_with_nothing_changed_and_run_between_refreshes(mode):
    model, batches = _net()
    plain = copy.deepcopy(model)
    kwargs = dict(rank=2, projection="svd", refresh_every=3, svd_niter=None, lr=1e-2)
    opt = LoRAAdam([p for p in model.parameters() if p.ndim == 2], **kwargs)
    plain_opt = LoRAAdam([p for p in plain.parameters() if p.ndim == 2], **kwargs)
    handle = opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="projection='svd'"):
        _loss(model, batches[0]).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all("accumulation" not in s for s in opt.state.values())
    handle.remove()
    opt.zero_grad()
    # The documented route: plain steps at refreshes, the mode in between.
    for step in range(6):
        for m, o in ((plain, plain_opt), (model, opt)):
            use_mode = m is model and step % 3 != 0
            handle = (opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)) if use_mode else None
            _loss(m, batches[step % len(batches)]).backward()
            o.step()
            o.zero_grad()
            if handle is not None:
                handle.remove()
        assert _rel(torch.cat([p.flatten() for p in model.parameters()]),
                    torch.cat([p.flatten() for p in plain.parameters()])) <= TOL


def test_state_is_tensors_and_ints_and_resumes_exactly():
    model, batches = _net()
    kwargs = dict(rank=2, projection="svd", refresh_every=2, moment_rule="transport", lr=1e-2)
    opt = LoRAAdam([p for p in model.parameters() if p.ndim == 2], **kwargs)
    for step in range(3):
        _loss(model, batches[step]).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for state in saved["opt"]["state"].values():
        assert all(isinstance(v, (torch.Tensor, int)) for v in state.values())
    resumed, _ = _net()
    resumed.load_state_dict(saved["model"])
    resumed_opt = LoRAAdam([p for p in resumed.parameters() if p.ndim == 2], **kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    for step in range(3, 7):
        for m, o in ((model, opt), (resumed, resumed_opt)):
            _loss(m, batches[step % len(batches)]).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_state_bytes():
    """``3·r·(out+in)`` numbers, as ``lora`` (the frozen factor's moments stay zero)."""
    weight = nn.Parameter(torch.randn(48, 20))
    weight.grad = torch.randn(48, 20)
    opt = LoRAAdam([weight], rank=4, projection="svd")
    opt.step()
    state = opt.state[weight]
    factor_bytes = sum(state[k].numel() * state[k].element_size()
                       for k in ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B"))
    assert factor_bytes == 3 * 4 * (48 + 20) * 4
    assert not state["exp_avg_B"].any() and not state["exp_avg_sq_B"].any()  # right side: B is the basis
    assert optimizer_state_bytes(opt) == factor_bytes + 4 + 8 + 6 * 4  # + the step and skip counts, the guard
