"""Write modes for low-precision weights, against fp64 oracles.

* ``stochastic_round_`` is unbiased: binomial tests on values between two neighbours.
* After 1,000 steps at lr 1e-4 with a bf16 ``W``, ``W − W₀`` equals ``s·(A_t B_t − A_0 B_0)``
  (fp64) within 1% with ``compensated``; ``nearest`` misses by far more (the check bites).
* ``stochastic`` has zero mean error across seeds (z-scores over every element of every seed).
* Memory per mode, default modes, factor dtypes, the plain-callable path of every writer.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, available_writers, optimizer_state_bytes
from lora_optim.precision import default_precision, get_writer, rounding_bits, stochastic_round_
from lora_optim.kernels import native_kernels, use_native
from lora_optim.kernels.paths import accelerator_paths
from lora_optim.projections import FactorChange, get_projection
from lora_optim.seeding import step_key
from lora_optim.sparsity import pack_mask
from lora_optim.weight_change import weight_delta

LOW_PRECISION = [torch.bfloat16, torch.float16]

#: The divergence guard's state per low-rank matrix: 6 fp32 numbers (lora_optim.divergence).
GUARD_BYTES = 6 * 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


def _neighbours(value: float, dtype: torch.dtype) -> tuple[float, float]:
    lo = torch.tensor(value, dtype=torch.float32).to(dtype)
    if lo.float().item() > value:
        lo = torch.nextafter(lo, torch.tensor(-math.inf, dtype=dtype))
    hi = torch.nextafter(lo, torch.tensor(math.inf, dtype=dtype))
    return lo.float().item(), hi.float().item()


# (dtype, a value of that dtype, fraction of the gap above it): normal, negative, large and
# (fp16) subnormal values.
SR_CASES = [
    (dtype, base, fraction)
    for dtype, bases in (
        (torch.bfloat16, (1.0, 0.02, -0.02, -3.0e5, 1.0e-30)),
        (torch.float16, (1.0, 0.02, -0.02, 3.0e-6, -1.5e-7)),
    )
    for base in bases
    for fraction in (0.1, 0.5, 0.77)
]


@pytest.mark.parametrize("dtype,base,fraction", SR_CASES)
def test_stochastic_round_is_unbiased(dtype, base, fraction):
    lo, hi = _neighbours(base, dtype)
    value = lo + fraction * (hi - lo)
    samples = 100_000
    source = torch.full((samples // 250, 250), value, dtype=torch.float32)
    assert source[0, 0].item() != lo  # the value really lies between the neighbours
    target = torch.empty(source.shape, dtype=dtype)
    stochastic_round_(target, source.clone(), seed=12345)
    result = target.float()
    assert set(torch.unique(result).tolist()) <= {lo, hi}
    exact_fraction = (source[0, 0].item() - lo) / (hi - lo)
    up = (result == hi).double().mean().item()
    # binomial: 5 standard deviations of the fraction rounded up
    assert abs(up - exact_fraction) <= 5 * math.sqrt(exact_fraction * (1 - exact_fraction) / samples)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_stochastic_round_keeps_representable_values_and_is_seeded(dtype):
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(300, 70, generator=gen).to(dtype)
    out = torch.empty_like(exact)
    stochastic_round_(out, exact.float(), seed=3)
    assert torch.equal(out, exact)
    between = torch.randn(300, 70, generator=gen)
    runs = []
    for seed in (7, 7, 8):
        out = torch.empty(between.shape, dtype=dtype)
        stochastic_round_(out, between.clone(), seed=seed)
        runs.append(out)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def _regression_run(precision, lr, dtype=torch.bfloat16, steps=1000, out=96, inn=80, seed=0):
    """W (|W| ≈ 0.02) trained towards W + a rank-8 gap: returns ``(relative error of W − W₀ against
    s·(A_t B_t − A_0 B_0) in fp64, optimizer, W)``."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter((torch.randn(out, inn, generator=gen) * 0.02).to(dtype))
    start = weight.detach().double().clone()
    target = start.float() + 0.01 * torch.randn(out, 8, generator=gen) @ torch.randn(8, inn, generator=gen) / 8**0.5
    opt = LoRAAdam([weight], lr=lr, rank=8, alpha=16, precision=precision, seed=seed)
    A0, B0 = (x.double() for x in opt.get_factors(weight))
    for _ in range(steps):
        weight.grad = (weight.detach().float() - target).to(dtype)
        opt.step()
    A, B = (x.double() for x in opt.get_factors(weight))
    expected = 2.0 * (A @ B - A0 @ B0)
    error = torch.linalg.norm(weight.detach().double() - start - expected) / torch.linalg.norm(expected)
    return error.item(), opt, weight


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("lr", [1e-4, 1e-3])
def test_compensated_keeps_every_update_within_one_percent(dtype, lr):
    error, opt, weight = _regression_run("compensated", lr, dtype)
    assert error <= 0.01
    assert opt.state[weight]["A"].dtype == torch.float32


def test_nearest_loses_updates_that_compensated_keeps():
    """The same run as above with round-to-nearest: most of the update is lost (the 1% check bites)."""
    error, _, _ = _regression_run("nearest", 1e-4)
    assert error > 0.3


def _constant_gradient_errors(precision, seeds, steps=1000, out=64, inn=48):
    """Errors ``W − W₀ − s·(A_t B_t − A_0 B_0)`` (fp64) of runs whose gradients do not depend on
    ``W`` (a fixed direction plus noise, from a generator), so the factor trajectory, and hence
    the expected change, is the same whatever the rounding: the errors are sums of rounding
    errors only. Returns ``(errors, expected changes, initial weights)`` stacked over seeds."""
    errors, expected, starts = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        weight = nn.Parameter((torch.randn(out, inn, generator=gen) * 0.02).to(torch.bfloat16))
        start = weight.detach().double().clone()
        direction = torch.randn(out, inn, generator=gen)
        opt = LoRAAdam([weight], lr=1e-4, rank=8, alpha=16, precision=precision, seed=seed)
        A0, B0 = (x.double() for x in opt.get_factors(weight))
        for _ in range(steps):
            weight.grad = (direction + torch.randn(out, inn, generator=gen)).to(torch.bfloat16)
            opt.step()
        A, B = (x.double() for x in opt.get_factors(weight))
        change = 2.0 * (A @ B - A0 @ B0)
        errors.append(weight.detach().double() - start - change)
        expected.append(change)
        starts.append(start)
    return torch.stack(errors), torch.stack(expected), torch.stack(starts)


def _z_scores(errors, expected, starts):
    """Self-normalised sums ``Σ wᵢ·errᵢ / √(Σ errᵢ²)`` for the weightings 1, sign(change) and
    sign(W₀): each is ~N(0, 1) when the errors are independent with zero mean."""
    scale = torch.sqrt((errors**2).sum())
    return {
        "mean": (errors.sum() / scale).item(),
        "along the change": ((errors * torch.sign(expected)).sum() / scale).item(),
        "along W0": ((errors * torch.sign(starts)).sum() / scale).item(),
    }


@pytest.mark.parametrize("native_on", [True, False])
def test_stochastic_rounding_has_zero_mean_error_across_seeds(native_on):
    """Through the optimizer, on both paths (the one-pass native write and the torch path)."""
    with use_native(native_on):
        errors, expected, starts = _constant_gradient_errors("stochastic", seeds=range(4))
    z = _z_scores(errors, expected, starts)
    # 4·64·48 = 12,288 independent errors: |z| < 5 fails a correct implementation with p < 1e-6
    assert all(abs(value) < 5 for value in z.values()), z
    relative = (torch.linalg.norm(errors) / torch.linalg.norm(expected)).item()
    assert relative < 0.5  # noisy but not lost: every element moves on average as intended
    nearest = _z_scores(*_constant_gradient_errors("nearest", seeds=range(1)))
    assert nearest["along the change"] < -10, nearest  # lost updates: the same statistic catches them


def test_default_precision_by_dtype():
    """bf16/fp16 weights default to stochastic rounding, which keeps nothing of W's size."""
    assert default_precision(torch.bfloat16) == "stochastic"
    assert default_precision(torch.float16) == "stochastic"
    assert default_precision(torch.float32) == "nearest"
    assert default_precision(torch.float64) == "nearest"
    weight = nn.Parameter(torch.zeros(80, 60, dtype=torch.bfloat16))
    weight.grad = torch.ones_like(weight)
    opt = LoRAAdam([weight], rank=2)
    opt.step()
    state = opt.state[weight]
    assert "weight_compensation" not in state and isinstance(state["rounding_seed"], int)
    assert state["rounding_draws"] == 1
    assert optimizer_state_bytes(opt) < weight.numel() * weight.element_size() / 2


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("base", [1.0, 0.02, -0.02, -3.0e5])
def test_native_stochastic_write_is_unbiased(base, fraction):
    """The one-pass CPU write (bits ``a_i ^ b_j`` of :func:`rounding_bits`): each element rounds up
    with the probability of its fraction of the gap, within 5 binomial standard deviations."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("native kernels not built (CI builds them: test_native_kernels_build_here)")
    lo, hi = _neighbours(base, torch.bfloat16)
    rows, cols = 400, 250
    weight = torch.full((rows, cols), lo, dtype=torch.bfloat16)
    gap = fraction * (hi - lo)
    left, right = torch.full((rows, 1), gap), torch.ones(1, cols)
    exact = (lo + torch.tensor(gap, dtype=torch.float32)).item()  # what fp32 holds of lo + gap
    kernels.add_lowrank_stochastic_(weight, left, right, 1.0, *rounding_bits(rows, cols, step_key(987654321, 0)))
    result = weight.float()
    assert set(torch.unique(result).tolist()) <= {lo, hi}
    expected = (exact - lo) / (hi - lo)
    up = (result == hi).double().mean().item()
    assert abs(up - expected) <= 5 * math.sqrt(expected * (1 - expected) / (rows * cols))


def test_native_stochastic_bits_depend_on_key_row_and_column_only():
    """Same key: the same result whatever the chunking and thread count, and whether the rows
    are written whole or as a row shard with its offset; another key: other bits."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("native kernels not built")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 200, generator=gen) * 0.02).bfloat16()
    left, right = torch.randn(300, 8, generator=gen) * 1e-3, torch.randn(8, 200, generator=gen) * 1e-3
    whole = weight.clone()
    kernels.add_lowrank_stochastic_(whole, left, right, 2.0, *rounding_bits(300, 200, 11))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        shards = weight.clone()
        kernels.add_lowrank_stochastic_(shards[:130], left[:130], right, 2.0, *rounding_bits(130, 200, 11))
        kernels.add_lowrank_stochastic_(shards[130:], left[130:], right, 2.0, *rounding_bits(170, 200, 11, 130))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, shards)
    other = weight.clone()
    kernels.add_lowrank_stochastic_(other, left, right, 2.0, *rounding_bits(300, 200, 12))
    assert not torch.equal(whole, other)


@pytest.mark.parametrize("as_product", [True, False])
def test_stochastic_bits_are_the_same_on_every_path(as_product):
    """The native one-pass write, the CPU torch path (blocks of rows) and an accelerator's path
    (one fp32 copy of W) write the same bits: the noise of element (i, j) is a function of the
    key, the row and the column only. ``as_product=False``: a masked (sparse) change, which has
    no thin product and goes through the projection's ``add_delta_``."""
    gen = torch.Generator().manual_seed(3)
    rows, cols, rank = 700, 410, 4  # more than one CPU block of rows
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16()
    projection = get_projection("lora")
    A, B = torch.randn(rows, rank, generator=gen) * 1e-2, torch.randn(rank, cols, generator=gen) * 1e-2
    dA, dB = torch.randn(rows, rank, generator=gen) * 1e-3, torch.randn(rank, cols, generator=gen) * 1e-3
    change = FactorChange(A, B, A + dA, B + dB, dA, dB)
    mask = pack_mask(torch.ones(rows, cols, dtype=torch.bool)) if not as_product else None
    writer = get_writer("stochastic")
    results = []
    for native, accelerator in ((True, False), (False, False), (False, True)):
        target = weight.clone()
        state = writer.init_state(target, seed=5)
        with use_native(native), (accelerator_paths() if accelerator else contextlib.nullcontext()):
            writer.write_(target, state, weight_delta(projection, change, 0.5, mask))
        assert int(state["rounding_draws"]) == 1
        results.append(target)
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])
    assert not torch.equal(results[0], weight)


def test_rounding_bits_are_uniform_and_pairwise_uncorrelated():
    """``a_i ^ b_j`` over many keys: every element's 16 bits are uniform (mean 2¹⁵ − ½, variance
    (2³² − 1)/12), and the rounding decisions of two elements in one row, one column, or neither
    are uncorrelated (pairwise independence, so sums of rounding errors have the variance of
    independent rounding)."""
    keys = 4000
    rows, cols = 6, 5
    words = torch.stack([(lambda a, b: a.unsqueeze(1) ^ b)(*rounding_bits(rows, cols, step_key(77, k)))
                         for k in range(keys)]).double()  # keys × rows × cols
    mean, var = 2**15 - 0.5, (2**32 - 1) / 12
    z = (words.mean(0) - mean) / math.sqrt(var / keys)
    assert z.abs().max() < 5
    up = (words < 0.3 * 2**16).double()  # a rounding decision with p = 0.3
    flat = up.reshape(keys, -1)
    centred = flat - flat.mean(0)
    correlation = (centred.t() @ centred) / keys / (centred.std(0).unsqueeze(0) * centred.std(0).unsqueeze(1))
    off = correlation - torch.eye(rows * cols, dtype=torch.float64)
    assert off.abs().max() < 5 / math.sqrt(keys)


@pytest.mark.parametrize("precision", available_writers())
def test_state_bytes_per_mode(precision):
    """Factors and moments are fp32 for a bf16 W in every mode; only ``compensated`` keeps a
    weight-sized buffer, in W's dtype (2 bytes per element)."""
    out, inn, rank = 256, 192, 8
    weight = nn.Parameter(torch.zeros(out, inn, dtype=torch.bfloat16))
    weight.grad = torch.randn(out, inn).to(torch.bfloat16)
    opt = LoRAAdam([weight], rank=rank, precision=precision)
    opt.step()
    state = opt.state[weight]
    for key in ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B"):
        assert state[key].dtype == torch.float32
    extra = {"nearest": 0, "stochastic": 8, "compensated": out * inn * 2}[precision]  # stochastic: its write count
    # + the step and skip counts, the divergence guard
    assert optimizer_state_bytes(opt) == 3 * rank * (out + inn) * 4 + extra + 4 + 8 + GUARD_BYTES


class _GivenDelta:
    """A weight change given as a matrix, or as a thin product ``L·R`` (``scale`` 1): what a write
    mode needs of a ``WeightDelta``."""

    compute_dtype = torch.float32
    scale = 1.0
    row_offset = 0

    def __init__(self, delta, factors=None):
        self.delta = delta
        self.factors = factors

    def add_to_(self, target, row_start=0):
        rows = self.delta if self.delta.shape[0] == 1 else self.delta[row_start:row_start + target.shape[0]]
        target.add_(rows)  # a 1×1 change broadcasts

    def product(self, row_start=0, rows=None):
        if self.factors is None:
            return None
        left, right = self.factors
        return left[row_start:None if rows is None else row_start + rows], right


@pytest.mark.parametrize("native_on", [False, True])
@pytest.mark.parametrize("as_product", [False, True])
@pytest.mark.parametrize("precision", available_writers())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_writers_land_within_their_rounding(precision, dtype, as_product, native_on):
    """``write_`` of a given change (a matrix, or a thin product: the one-pass paths, native on the
    CPU for bf16): each mode lands within its rounding of ``W + Δ``."""
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(40, 30, generator=gen) * 0.1).to(dtype)
    start = weight.double()
    left = torch.randn(40, 6, generator=gen) * 0.1
    right = torch.randn(6, 30, generator=gen) * 0.04
    delta = left @ right
    writer = get_writer(precision)
    state = writer.init_state(weight, seed=5)
    with use_native(native_on):
        writer.write_(weight, state, _GivenDelta(delta, (left, right) if as_product else None))
    ulp = torch.finfo(dtype).eps * (start + delta.double()).abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((weight.double() - (start + delta.double())).abs() <= ulp * 1.01).all()
    if precision == "compensated":
        # W + c holds the sum to the precision of the pair
        total = weight.double() + state["weight_compensation"].double()
        exact = start + delta.double()
        eps = torch.finfo(dtype).eps
        # the residual is rounded to W's dtype (relative eps, of at most half an ulp of W; fp16
        # subnormals: absolute 2⁻²⁴), W + y once in fp32
        tolerance = (eps * eps + 2.0**-23) * exact.abs() + 2.0**-24
        assert ((total - exact).abs() <= tolerance).all()


def test_compensated_fp32_keeps_updates_far_below_an_ulp():
    """Same-dtype Kahan path: 1,000 updates of 1e-9 into fp32 weights of 1.0 (ulp 1.2e-7) are all
    lost by ``nearest`` and all kept by ``compensated``."""
    results = {}
    for precision in ("nearest", "compensated"):
        weight = torch.ones(16, 8)
        writer = get_writer(precision)
        state = writer.init_state(weight, seed=0)
        for _ in range(1000):
            writer.write_(weight, state, _GivenDelta(torch.full((1, 1), 1e-9)))
        results[precision] = (weight.double() - 1.0).mean().item()
    assert results["nearest"] == 0.0
    assert results["compensated"] == pytest.approx(1e-6, rel=0.1)


def test_stochastic_rounding_leaves_the_global_rng_alone():
    weight = nn.Parameter(torch.randn(32, 24).to(torch.bfloat16))
    opt = LoRAAdam([weight], rank=4, precision="stochastic")
    before = torch.random.get_rng_state()
    for _ in range(3):
        weight.grad = torch.ones_like(weight)
        opt.step()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert opt.state[weight]["rounding_draws"] == 3


# ---------------------------------------------------------------------------------- drift check

DRIFT_CONFIGS = [
    dict(projection="lora"),
    dict(projection="lora", init="symmetric"),
    dict(projection="random", resample_every=1),
    dict(projection="random", resample_every=4, moment_rule="reset"),
    dict(projection="additive"),
]


def _ids(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("name", ["lora", "random", "additive"])
def test_probe_delta_of_each_variant_equals_the_generic_default(name):
    from lora_optim import get_projection
    from lora_optim.projections.base import FactorChange, Projection

    gen = torch.Generator().manual_seed(3)
    out, inn, rank = 11, 9, 3
    A, B = torch.randn(out, rank, generator=gen), torch.randn(rank, inn, generator=gen)
    dA, dB = 1e-3 * torch.randn(out, rank, generator=gen), 1e-3 * torch.randn(rank, inn, generator=gen)
    probes = torch.randn(inn, 4, generator=gen, dtype=torch.float64)
    projection = get_projection(name)
    change = FactorChange(A, B, A + dA, B + dB, (A + dA) - A, (B + dB) - B)
    got = projection.probe_delta(change, 1.7, probes)
    reference = Projection.probe_delta(projection, change, 1.7, probes)
    assert got.dtype == torch.float64
    # fp64 cancellation in A'(B'X) − A(BX): agree to ~1e-15 of the terms' size
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-13)


def _drift_run(config, steps, dtype=torch.float32, precision=None, lr=1e-3, out=40, inn=32, seed=0):
    """A regression run with drift probes; returns ``(opt, weight, initial weight, initial factors)``."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter((torch.randn(out, inn, generator=gen) * 0.05).to(dtype))
    start = weight.detach().clone()
    target = weight.detach().float() + 0.05 * torch.randn(out, 6, generator=gen) @ torch.randn(6, inn, generator=gen) / 6**0.5
    opt = LoRAAdam([weight], lr=lr, rank=4, alpha=8, drift_probes=3, precision=precision, seed=seed, **config)
    factors = opt.get_factors(weight)
    for _ in range(steps):
        weight.grad = (weight.detach().float() - target + 0.01 * torch.randn(out, inn, generator=gen)).to(dtype)
        opt.step()
    return opt, weight, start, factors


@pytest.mark.parametrize("config", [c for c in DRIFT_CONFIGS if c["projection"] != "random"], ids=_ids)
def test_drift_probe_sums_the_closed_form_change(config):
    """lora: ``C = s·(A_t B_t − A_0 B_0)·X``; additive: ``s·(Δ(A_t, B_t) − Δ(A_0, B_0))·X``."""
    from twins import additive_delta, lora_delta

    opt, weight, _, (A0, B0) = _drift_run(config, steps=200)
    A, B = opt.get_factors(weight)
    delta = additive_delta if config["projection"] == "additive" else lora_delta
    state = opt.state[weight]
    closed_form = 2.0 * (delta(A.double(), B.double()) - delta(A0.double(), B0.double())) @ state["drift_probes"]
    torch.testing.assert_close(state["drift_change"], closed_form, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("config", DRIFT_CONFIGS, ids=_ids)
def test_fp32_drift_is_below_1e_5(config):
    opt, weight, _, _ = _drift_run(config, steps=1000)
    report = opt.drift(weight)
    assert report.relative_to_weight <= 1e-5 and report.relative_to_change <= 1e-5, report
    assert opt.drift_report() == {0: report}


@pytest.mark.slow
@pytest.mark.parametrize("config", DRIFT_CONFIGS, ids=_ids)
def test_fp32_drift_after_10000_steps_is_below_1e_5(config):
    opt, weight, _, _ = _drift_run(config, steps=10_000)
    report = opt.drift(weight)
    assert report.relative_to_weight <= 1e-5, report


def test_drift_shows_lost_updates_and_outside_changes():
    lost, weight, _, _ = _drift_run(dict(projection="lora"), steps=300, dtype=torch.bfloat16, precision="nearest", lr=1e-4)
    assert lost.drift(weight).relative_to_change > 0.3
    kept, weight, _, _ = _drift_run(dict(projection="lora"), steps=300, dtype=torch.bfloat16, precision="compensated", lr=1e-4)
    assert kept.drift(weight).relative_to_change < 0.02
    opt, weight, _, _ = _drift_run(dict(projection="lora"), steps=50)
    assert opt.drift(weight).relative_to_weight < 1e-6
    with torch.no_grad():
        weight[3] += 0.01  # a change the optimizer did not make
    assert opt.drift(weight).relative_to_weight > 1e-4


def test_drift_is_off_by_default_and_costs_nothing():
    weight = nn.Parameter(torch.randn(30, 20))
    weight.grad = torch.randn(30, 20)
    opt = LoRAAdam([weight], rank=4)
    opt.step()
    assert not any(key.startswith("drift") for key in opt.state[weight])
    # + the step and skip counts, the guard
    assert optimizer_state_bytes(opt) == 3 * 4 * (30 + 20) * 4 + 4 + 8 + GUARD_BYTES
    with pytest.raises(ValueError, match="drift_probes=0"):
        opt.drift(weight)
    assert opt.drift_report() == {}
    probed = LoRAAdam([weight], rank=4, drift_probes=3)
    probed.step()
    assert optimizer_state_bytes(probed) == 3 * 4 * (30 + 20) * 4 + 4 + 8 + GUARD_BYTES + 3 * (20 + 2 * 30) * 8
