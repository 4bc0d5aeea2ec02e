"""The divergence guard (:mod:`lora_optim.divergence`): its estimate of ``s·‖ΔW‖/‖W₀‖`` against the
exact change, its warning, its cost (no host read between checks, a fixed handful of ops per
batch) and its reports."""

from __future__ import annotations

import statistics
import warnings

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, NonFiniteGradientWarning
from lora_optim.dispatch_count import DispatchCounter
from lora_optim.divergence import DEFAULT_DIVERGENCE_THRESHOLD, DivergenceWarning, is_check_step
from lora_optim.kernels import use_native
from lora_optim.kernels.paths import accelerator_paths
from lora_optim.state_keys import STEP_SIZE_KEYS

CASES = [("lora", {}), ("lora", {"init": "symmetric"}), ("random", {}), ("random", {"resample_every": 3}),
         ("additive", {}), ("additive", {"remap_every": 2}), ("svd", {})]


@pytest.mark.parametrize("projection,options", CASES, ids=str)
def test_estimate_tracks_the_exact_relative_change(projection, options):
    """Over 8 steps of 4 shapes (r = 4, random gradients with a low-rank part), the estimate is within
    a factor 1.5 of ``‖W_t − W_{t−1}‖_F/‖W₀‖_F`` for every step and matrix, and within 15% in the
    median (the left-out cross term averages out)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(48, 40), (40, 48), (64, 16), (16, 64)]
    params = [nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05) for shape in shapes]
    W0 = [p.detach().clone() for p in params]
    opt = LoRAAdam(params, rank=4, alpha=6.0, lr=1e-3, projection=projection, **options)
    ratios = []
    for _ in range(8):
        before = [p.detach().clone() for p in params]
        for p in params:
            low_rank = torch.randn(p.shape[0], 2, generator=gen, dtype=torch.float64) @ torch.randn(
                2, p.shape[1], generator=gen, dtype=torch.float64)
            p.grad = low_rank + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DivergenceWarning)
            opt.step()
        report = opt.step_size_report()
        for index, (p, b, w0) in enumerate(zip(params, before, W0)):
            exact = (torch.linalg.norm(p.detach() - b) / torch.linalg.norm(w0)).item()
            ratios.append(report[index].last / exact)
    assert 1 / 1.5 < min(ratios) and max(ratios) < 1.5, (min(ratios), max(ratios))
    assert abs(statistics.median(ratios) - 1) < 0.15, statistics.median(ratios)


def test_largest_is_the_maximum_over_steps_and_drift_report_shows_it():
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(30, 20, generator=gen))
    opt = LoRAAdam([weight], rank=2, lr=1e-3, drift_probes=2)
    seen = []
    for _ in range(5):
        weight.grad = torch.randn(30, 20, generator=gen)
        opt.step()
        seen.append(opt.step_size_report()[0].last)
    report = opt.step_size_report()[0]
    assert report.largest == pytest.approx(max(seen), rel=1e-6) and report.threshold == DEFAULT_DIVERGENCE_THRESHOLD
    assert opt.drift_report()[0].largest_step == pytest.approx(report.largest, rel=1e-6)


def _steps(opt, params, gen, count):
    for _ in range(count):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_a_step_above_the_threshold_warns_once_per_parameter_at_the_first_check():
    """``additive`` at lr 0.05 moves every entry by ~0.1 per step: far above 1% of a weight of
    entries ~0.05. The warning comes after step 1 (the first check), names the parameter, once."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(32, 24, generator=gen) * 0.05) for _ in range(2)]
    opt = LoRAAdam(params, rank=4, lr=0.05, projection="additive")
    with pytest.warns(DivergenceWarning, match=r"parameter 0 \(group 0, shape \(32, 24\)\) by") as caught:
        _steps(opt, params, gen, 1)
    assert len([w for w in caught if issubclass(w.category, DivergenceWarning)]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _steps(opt, params, gen, 5)  # checked again at steps 2 and 4: no second warning
    assert opt.check_step_sizes() == ["parameter 0 (group 0, shape (32, 24))", "parameter 1 (group 0, shape (32, 24))"]


def test_a_healthy_run_does_not_warn_and_none_turns_the_guard_off():
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(32, 24, generator=gen))]
    opt = LoRAAdam(params, rank=4, lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _steps(opt, params, gen, 8)
    assert opt.check_step_sizes() == []
    off = LoRAAdam(params, rank=4, lr=0.5, projection="additive", divergence_threshold=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _steps(off, params, gen, 4)
    assert not any(key in off.state[params[0]] for key in STEP_SIZE_KEYS)
    assert off.step_size_report() == {}


def test_checks_come_after_steps_1_2_4_and_then_every_512():
    checks = [count for count in range(1, 2100) if is_check_step(count)]
    assert checks == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048]


def _count_third_step(threshold, matrices):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(48 if i % 2 else 64, 40, generator=gen)) for i in range(matrices)]
    opt = LoRAAdam(params, rank=4, alpha=8, projection="random", divergence_threshold=threshold)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    with use_native(False), accelerator_paths():
        opt.step()
        opt.step()
        with DispatchCounter() as counter:
            opt.step()  # step 3: not a check step
    return counter


def test_the_guard_adds_no_host_read_and_a_fixed_handful_of_ops_per_batch():
    """Between checks the guard reads nothing back (same syncs as without it) and costs the same
    fourteen launching ops for 8 or 32 matrices (eleven, and three that mask skipped steps with
    the step's ``taken`` flags: two stacks and a ``where``)."""
    added = {}
    for matrices in (8, 32):
        off, on = _count_third_step(None, matrices), _count_third_step(0.01, matrices)
        assert on.syncs == off.syncs
        added[matrices] = on.launches - off.launches
    assert added[8] == added[32] <= 14, added


def test_the_check_step_reads_once_per_device():
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(20, 16, generator=gen)) for _ in range(6)]
    opt = LoRAAdam(params, rank=2, lr=1e-4)
    _steps(opt, params, gen, 1)
    with DispatchCounter() as counter:
        opt.check_step_sizes()
    assert counter.syncs == 1


def test_a_checkpoint_without_guard_state_gets_it_when_loaded(tmp_path):
    """An older checkpoint (no option, no state) loads with the default threshold, and the guard
    state is made from the weight as loaded."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(20, 16, generator=gen))
    old = LoRAAdam([weight], rank=2, lr=1e-3, divergence_threshold=None)
    _steps(old, [weight], gen, 2)
    saved = old.state_dict()
    for group in saved["param_groups"]:  # as a checkpoint of a version without the guard
        del group["divergence_threshold"]
    torch.save(saved, tmp_path / "opt.pt")
    new = LoRAAdam([weight], rank=2, lr=1e-3)
    new.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert new.param_groups[0]["divergence_threshold"] == DEFAULT_DIVERGENCE_THRESHOLD
    assert all(key in new.state[weight] for key in STEP_SIZE_KEYS)
    _steps(new, [weight], gen, 1)
    assert new.step_size_report()[0].largest > 0


def test_a_skipped_step_records_no_step_size():
    """A parameter skipped on the device (here: a NaN in its stored factor, so its state is not
    finite) records nothing: its latest and largest values stay as they were (masked with the
    step's ``taken`` flag; no NaN of the skipped factors reaches them). The other parameter of the
    batch records its step as usual."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(20, 16, generator=gen)) for _ in range(2)]
    opt = LoRAAdam(params, rank=2, lr=1e-3)
    _steps(opt, params, gen, 2)
    before = opt.step_size_report()
    with torch.no_grad():
        opt.state[params[0]]["A"][0, 0] = float("nan")
    with pytest.warns(NonFiniteGradientWarning):
        _steps(opt, params, gen, 1)
    after = opt.step_size_report()
    assert after[0] == before[0]
    assert after[1].last != before[1].last
    assert after[1].largest >= before[1].largest


def test_a_check_step_syncs_nothing_and_warns_once_the_copy_has_landed():
    """On the accelerator code paths the checks after steps 1, 2 and 4 start a copy to the host and
    never wait for it: no host sync in any step, a check step included. The warning of step 1's
    check comes at step 2, when the copy is known to have landed; ``state_dict()`` finishes a check
    still on its way."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(32, 24, generator=gen) * 0.05)]
    opt = LoRAAdam(params, rank=4, lr=0.05, projection="additive")
    syncs = []
    with use_native(False), accelerator_paths():
        for step in range(1, 5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DivergenceWarning)
                with DispatchCounter() as counter:
                    opt.step()
            syncs.append(counter.syncs)
            warned = [w for w in caught if issubclass(w.category, DivergenceWarning)]
            assert len(warned) == (1 if step == 2 else 0), (step, warned)
    assert syncs == [0, 0, 0, 0]
    fresh = LoRAAdam(params, rank=4, lr=0.05, projection="additive")
    with use_native(False), accelerator_paths():
        _steps(fresh, params, gen, 1)
        with pytest.warns(DivergenceWarning):
            fresh.state_dict()
