"""The per-layer and activation-side modes equal the plain mode where they used to go wrong.

Each case below was wrong before the step engine (found by using the library as a new user
would; the plain mode was right, the mode was not). Every test trains the same float64 model
with the same data in the plain mode and in a mode, and compares after every step (relative
difference ≤ 1e-10), or checks that the mode refuses the case with a clear exception before
anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from grad_modes import TOL, flat, loss_fn, make_batches, make_model, make_optimizer, rel
from lora_optim import LoRAAdam, NonFiniteGradientWarning

MODES = ["per_layer", "activation"]


def _enable(mode: str, opt: LoRAAdam, model: nn.Module):
    return opt.enable_per_layer() if mode == "per_layer" else opt.attach(model)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


# ------------------------------------------------------------------ 1. in-place changes of a layer's output


class InPlaceNet(nn.Module):
    """Linear layers with biases on 3-D inputs, each output changed in place right away."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.fc1, self.fc2, self.fc3 = nn.Linear(7, 12), nn.Linear(12, 9), nn.Linear(9, 4)
        self.relu = nn.ReLU(inplace=True)

    def _changed(self, h: torch.Tensor) -> torch.Tensor:
        if self.change == "relu":
            return self.relu(h)
        if self.change == "add":
            h += 1
            return torch.tanh(h)
        return torch.tanh(F.dropout(h, p=0.3, training=True, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self._changed(self.fc2(self._changed(self.fc1(x)))))


def _in_place_models(change: str) -> tuple[nn.Module, nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = InPlaceNet(change).double()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("change", ["relu", "add", "dropout"])
@pytest.mark.parametrize("mode", MODES)
def test_output_changed_in_place_after_the_layer(mode, change):
    plain_model, model = _in_place_models(change)
    plain_opt, opt = make_optimizer(plain_model), make_optimizer(model)
    _enable(mode, opt, model)
    batches = make_batches("net")
    for step, (x, y) in enumerate(batches[:4]):
        for m, o in ((plain_model, plain_opt), (model, opt)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + step)  # the same dropout masks in both runs
                logits = m(x)
            F.cross_entropy(logits.reshape(-1, 4), y.reshape(-1)).backward()
            o.step()
            o.zero_grad()
        assert rel(flat(model), flat(plain_model)) <= TOL, f"step {step + 1}"
    assert rel(flat(model), flat(_in_place_models(change)[0])) > 1e-3  # it trained


# ------------------------------------------------------------------ 2. gradients with respect to inputs only


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs)"])
@pytest.mark.parametrize("mode", MODES)
def test_input_gradients_do_not_reach_the_factors(mode, how):
    """``torch.autograd.grad(loss, x)`` and ``loss.backward(inputs=[x])`` never touch ``W.grad`` in
    the plain mode (adversarial training, saliency maps); they must not touch the sums either."""
    plain_model, model = make_model(), make_model()
    plain_opt, opt = make_optimizer(plain_model), make_optimizer(model)
    _enable(mode, opt, model)
    batches = make_batches("net")
    for step, (x, y) in enumerate(batches[:3]):
        for m, o in ((plain_model, plain_opt), (model, opt)):
            x_adv = x.clone().requires_grad_(True)
            loss = loss_fn(m, (x_adv, y))
            if how == "autograd.grad":
                (grad_x,) = torch.autograd.grad(loss, x_adv)
            else:
                loss.backward(inputs=[x_adv])
                grad_x = x_adv.grad
            loss_fn(m, (x + 0.01 * grad_x.sign(), y)).backward()
            o.step()
            o.zero_grad()
        assert rel(flat(model), flat(plain_model)) <= TOL, f"step {step + 1}"


# ------------------------------------------------------------------ 3. torch.amp.GradScaler


def _scaler_run(mode: str | None, forced_inf_at: int | None = None, *, dense_biases: bool = True):
    model = make_model()
    if not dense_biases:
        for p in model.parameters():
            p.requires_grad_(p.ndim >= 2)
    opt = make_optimizer(model)
    if mode is not None:
        _enable(mode, opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    trajectory, scales = [], []
    for step, batch in enumerate(make_batches("net")[:5]):
        for _ in range(2):  # two micro-batches
            loss = loss_fn(model, batch) / 2
            if step == forced_inf_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        trajectory.append(flat(model))
        scales.append(scaler.get_scale())
    return model, opt, trajectory, scales


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_equals_the_plain_run(mode):
    _, _, expected, expected_scales = _scaler_run(None)
    _, opt, got, scales = _scaler_run(mode)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) <= TOL, f"step {step + 1}"
    assert scales == expected_scales == [2.0**10] * 5


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_skips_an_overflowing_step_and_backs_off(mode):
    _, _, expected, expected_scales = _scaler_run(None, forced_inf_at=2)
    _, opt, got, scales = _scaler_run(mode, forced_inf_at=2)
    assert torch.equal(got[2], got[1])  # the overflowing step changed nothing
    assert scales == expected_scales and scales[2] == 2.0**9
    for step, (a, b) in enumerate(zip(got, expected)):
        assert rel(a, b) <= TOL, f"step {step + 1}"
    assert opt.nonfinite_skips() == 0  # the scaler's business, not a skip of ours


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_refusals_change_nothing(mode):
    # Every gradient goes to the projected sums: the scaler has nothing to check, and its update()
    # would fail later with "No inf checks were recorded".
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(p.ndim >= 2)
    opt = make_optimizer(model)
    _enable(mode, opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_fn(model, make_batches("net")[0])).backward()
    before = flat(model)
    with pytest.raises(RuntimeError, match="GradScaler found no gradient to check"):
        scaler.step(opt)
    assert torch.equal(flat(model), before)
    # unscale_ (for clipping) cannot unscale the projected sums.
    model = make_model()
    opt = make_optimizer(model)
    _enable(mode, opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_fn(model, make_batches("net")[0])).backward()
    scaler.unscale_(opt)
    before = flat(model)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert torch.equal(flat(model), before)


# ------------------------------------------------------------------ 4. zero_grad(set_to_none=False)


@pytest.mark.parametrize("mode", MODES)
def test_zero_grad_without_none_keeps_stepping_unused_parameters(mode):
    """In the plain mode a parameter whose gradient was zeroed (not set to None) still steps when
    it gets no new gradient: its moments decay and weight decay applies."""
    plain_model, model = make_model(), make_model()
    plain_opt, opt = make_optimizer(plain_model), make_optimizer(model)
    _enable(mode, opt, model)
    batches = make_batches("net")
    for step, batch in enumerate(batches[:4]):
        for m, o in ((plain_model, plain_opt), (model, opt)):
            if step < 2:
                loss_fn(m, batch).backward()
            else:  # fc3 and square are not used: their zeroed gradients still step them
                x, _ = batch
                torch.tanh(m.fc2(torch.tanh(m.fc1(x)))).pow(2).mean().backward()
            o.step()
            o.zero_grad(set_to_none=False)
        assert rel(flat(model), flat(plain_model)) <= TOL, f"step {step + 1}"
    ours, plain = opt.state[model.fc3.weight], plain_opt.state[plain_model.fc3.weight]
    assert (ours["exp_avg_A"] - plain["exp_avg_A"]).abs().max() <= TOL * plain["exp_avg_A"].abs().max()
    assert opt.state[model.fc3.weight]["step"] == 4


# ------------------------------------------------------------------ 5. a skipped step leaves the draws alone


@pytest.mark.parametrize("options", [{}, {"resample_every": 3, "moment_rule": "transport"}],
                         ids=["resample_every=1", "resample_every=3"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_skip_keeps_the_random_draws(mode, options):
    plain_model, model = make_model(), make_model()
    plain_opt = make_optimizer(plain_model, "random", **options)
    opt = make_optimizer(model, "random", **options)
    _enable(mode, opt, model)
    batches = make_batches("net")
    for step, (x, y) in enumerate(batches[:6]):
        bad = step in (1, 3)
        for m, o in ((plain_model, plain_opt), (model, opt)):
            drawn = {p: (o.state[p]["draws"], o.state[p]["age"]) for p in m.parameters() if p in o.state and p.ndim >= 2}
            inputs = x.clone().index_fill_(0, torch.tensor([0]), float("nan")) if bad else x
            if bad:
                with pytest.warns(NonFiniteGradientWarning):
                    loss_fn(m, (inputs, y)).backward()
                    o.step()
                assert drawn == {p: (o.state[p]["draws"], o.state[p]["age"]) for p in drawn}
            else:
                loss_fn(m, (inputs, y)).backward()
                o.step()
            o.zero_grad()
        assert rel(flat(model), flat(plain_model)) <= TOL, f"step {step + 1}"
    assert opt.nonfinite_skips() == plain_opt.nonfinite_skips() > 0


# ------------------------------------------------------------------ 7. state created inside inference_mode


@pytest.mark.parametrize("what", ["get_factors", "drift"])
def test_state_made_inside_inference_mode_can_be_stepped(what):
    model = make_model()
    opt = LoRAAdam(model.parameters(), rank=2, drift_probes=2)
    with torch.inference_mode():
        getattr(opt, what)(model.fc1.weight)
    for batch in make_batches("net")[:2]:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[model.fc1.weight]["step"] == 2
