"""The fast paths of a step equal the reference math.

Two paths are checked against float64 oracles: the compiled CPU kernels (``native``) and the
torch path (``use_native(False)``: GEMMs, with row blocks for a bf16 ``G`` or ``W``). Tolerances
are rounding-error bounds for any summation order: ``|error| ≤ (terms + 2)·u·Σ|term|`` with ``u``
the unit roundoff of the compute dtype; bf16 results may also differ by the final rounding
(half an ulp of bf16). Where the arithmetic is exact (dyadic values), the bf16 rounding must
equal torch's bit for bit.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_optim import LoRAAdam
from lora_optim.kernels import build, native, native_kernels, use_native
from lora_optim.precision import get_writer
from lora_optim.projections import get_projection
from lora_optim.projections.additive import additive_add_delta_, additive_project, fold_columns, fold_rows
from lora_optim.projections.lora import LoRAProjection, lowrank_add_delta_, lowrank_project
from lora_optim.projections import FactorChange
from lora_optim.weight_change import WeightDelta
from twins import additive_delta

NATIVE_AVAILABLE = native_kernels() is not None
PATHS = [
    pytest.param(True, id="native", marks=pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native kernels not built")),
    pytest.param(False, id="torch"),
]
# (matrix dtype, factor dtype): G and W come in the matrix dtype, factors in the compute dtype.
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.float32),
}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(1, 12))
# Shapes that cross the kernels' column blocks, row tiles and chunking (odd sizes on purpose).
BLOCKING_CASES = [(70, 1100, 64, "fp32"), (37, 300, 64, "fp64"), (9, 2000, 5, "bf16"), (301, 37, 17, "fp32"),
                  (130, 530, 33, "bf16")]


def _case(rows: int, cols: int, rank: int, dtype_name: str, seed: int):
    matrix_dtype, factor_dtype = DTYPES[dtype_name]
    rank = min(rank, rows, cols)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (randn(rows, cols, dtype=matrix_dtype), randn(rows, rank, dtype=factor_dtype),
            randn(rank, cols, dtype=factor_dtype), rank)


def _bf16_half_ulp(values: torch.Tensor) -> torch.Tensor:
    # bf16 keeps 8 significant bits: spacing 2^(e-8) for |x| in [2^(e-1), 2^e).
    _, exponent = torch.frexp(values.abs().clamp_min(2.0**-120))
    return torch.ldexp(torch.ones_like(values), exponent - 9)


def _check_close(ours: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int,
                 compute_dtype: torch.dtype, result_dtype: torch.dtype) -> None:
    """``|ours − exact| ≤ (terms + 2)·u·magnitude`` (+ half a bf16 ulp for bf16 results)."""
    bound = (terms + 2) * UNIT_ROUNDOFF[compute_dtype] * magnitude + 1e-300
    if result_dtype == torch.bfloat16:
        bound = bound + _bf16_half_ulp(exact) * (1 + 2**-6)
    error = (ours.double() - exact).abs()
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the rounding bound"


# ------------------------------------------------------------------ lora: projection


def _check_lowrank_project(rows, cols, rank, dtype_name, seed, native_on, scale=0.75):
    grad, A, B, rank = _case(rows, cols, rank, dtype_name, seed)
    G64, A64, B64 = grad.double(), A.double(), B.double()
    with use_native(native_on):
        grad_A, grad_B = lowrank_project(grad, A, B)
    grad_A, grad_B = scale * grad_A, scale * grad_B  # lowrank_project gives the gradients at s = 1
    assert grad_A.dtype == A.dtype and grad_B.dtype == A.dtype
    _check_close(grad_A, scale * G64 @ B64.t(), scale * G64.abs() @ B64.abs().t(), cols, A.dtype, A.dtype)
    _check_close(grad_B, scale * A64.t() @ G64, scale * A64.abs().t() @ G64.abs(), rows, A.dtype, A.dtype)


@pytest.mark.parametrize("native_on", PATHS)
@given(shapes, st.sampled_from(sorted(DTYPES)), st.integers(0, 2**31 - 1))
def test_lowrank_project_equals_reference(native_on, shape, dtype_name, seed):
    _check_lowrank_project(*shape, dtype_name, seed, native_on)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("rows,cols,rank,dtype_name", BLOCKING_CASES)
def test_lowrank_project_across_blocks(native_on, rows, cols, rank, dtype_name):
    _check_lowrank_project(rows, cols, rank, dtype_name, 0, native_on)


def test_lowrank_project_reads_strided_rows_and_leaves_grad_alone():
    grad_full, A, B, _ = _case(40, 90, 6, "fp32", 3)
    grad = grad_full[:, 7:70]  # row stride 90, unit column stride
    B = B[:, 7:70]
    before = grad_full.clone()
    grad_A, grad_B = lowrank_project(grad, A, B)
    torch.testing.assert_close(grad_A, grad @ B.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_B, A.t() @ grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(grad_full, before)


# ------------------------------------------------------------------ lora: weight change


def _change(A, B, dA, dB):
    """The step as the engine hands it over: the stored new factors are ``A + dA``, ``B + dB``."""
    return FactorChange(A, B, A + dA, B + dB, dA, dB)


def _lowrank_oracle(W, A, B, dA, dB, scale, rows=slice(None)):
    # The kernels form A + dA in the factor dtype (as the torch path does): the oracle does too.
    left = torch.cat((A + dA, dA), dim=1)[rows].double()
    right = torch.cat((dB, B), dim=0).double()
    return W.double() + scale * left @ right, scale * left.abs() @ right.abs() + W.double().abs(), left.shape[1]


def _check_lowrank_add(rows, cols, rank, dtype_name, seed, native_on, scale=0.6):
    W, A, B, rank = _case(rows, cols, rank, dtype_name, seed)
    _, dA, dB, _ = _case(rows, cols, rank, dtype_name, seed + 1)
    dA, dB = dA * 0.1, dB * 0.1
    exact, magnitude, inner = _lowrank_oracle(W, A, B, dA, dB, scale)
    with use_native(native_on):
        lowrank_add_delta_(W, _change(A, B, dA, dB), scale)
    _check_close(W, exact, magnitude, inner, A.dtype, W.dtype)


@pytest.mark.parametrize("native_on", PATHS)
@given(shapes, st.sampled_from(sorted(DTYPES)), st.integers(0, 2**31 - 1))
def test_lowrank_add_delta_equals_reference(native_on, shape, dtype_name, seed):
    _check_lowrank_add(*shape, dtype_name, seed, native_on)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("rows,cols,rank,dtype_name", BLOCKING_CASES)
def test_lowrank_add_delta_across_blocks(native_on, rows, cols, rank, dtype_name):
    _check_lowrank_add(rows, cols, rank, dtype_name, 0, native_on)


def _dyadic_case(rows, cols, rank, seed):
    """bf16 W with |W| in [1/4, 4) and factors of small integers times 2^-6: every product, sum
    and W + s·ΔW (s = 2^-3) is exact in fp32, so only the final rounding to bf16 remains."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.ldexp(1 + torch.randint(0, 128, (rows, cols), generator=gen) / 128.0,
                            torch.randint(-2, 2, (rows, cols), generator=gen))
    sign = torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1
    W = (magnitude * sign).to(torch.bfloat16)
    assert torch.equal(W.float(), magnitude * sign)

    def small(*shape):
        return torch.randint(-4, 5, shape, generator=gen).float() * 2.0**-6

    return W, small(rows, rank), small(rank, cols), small(rows, rank), small(rank, cols)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("rows,cols,rank", [(13, 37, 3), (64, 130, 8), (5, 300, 16)])
def test_bf16_weight_rounds_to_nearest_even_like_torch(native_on, rows, cols, rank):
    W, A, B, dA, dB = _dyadic_case(rows, cols, rank, seed=rows)
    scale = 0.125
    delta = scale * (torch.cat((A + dA, dA), 1) @ torch.cat((dB, B), 0))  # exact in fp32
    expected = W.float().add(delta).to(torch.bfloat16)  # torch's round-to-nearest-even
    with use_native(native_on):
        lowrank_add_delta_(W, _change(A, B, dA, dB), scale)
    assert torch.equal(W, expected)


@pytest.mark.parametrize("native_on", PATHS)
def test_bf16_weight_with_nan_and_inf(native_on):
    W = torch.tensor([[1.0, float("nan"), float("inf"), -float("inf")]] * 4).to(torch.bfloat16)
    A, B = torch.zeros(4, 1), torch.zeros(1, 4)
    with use_native(native_on):
        lowrank_add_delta_(W, _change(A, B, torch.ones(4, 1), torch.ones(1, 4)), 0.5)
    assert torch.equal(W[:, 0], torch.full((4,), 1.5, dtype=torch.bfloat16))
    assert W[:, 1].isnan().all() and (W[:, 2] == float("inf")).all() and (W[:, 3] == -float("inf")).all()


@pytest.mark.parametrize("native_on", PATHS)
@given(shapes, st.sampled_from(sorted(DTYPES)), st.integers(0, 2**31 - 1), st.data())
def test_add_delta_rows_equals_rows_of_full_change(native_on, shape, dtype_name, seed, data):
    rows, cols, rank = shape
    W, A, B, rank = _case(rows, cols, rank, dtype_name, seed)
    _, dA, dB, _ = _case(rows, cols, rank, dtype_name, seed + 1)
    start = data.draw(st.integers(0, rows - 1))
    stop = data.draw(st.integers(start + 1, rows))
    rows_slice = slice(start, stop)
    block = W[rows_slice].clone()
    with use_native(native_on):
        get_projection("lora").add_delta_(block, _change(A, B, dA, dB), 0.5, start)
    exact, magnitude, inner = _lowrank_oracle(W[rows_slice], A, B, dA, dB, 0.5, rows_slice)
    _check_close(block, exact, magnitude, inner, A.dtype, W.dtype)
    block = W[rows_slice].clone()
    with use_native(native_on):
        get_projection("additive").add_delta_(block, _change(A, B, dA, dB), 0.5, start)
    exact = W[rows_slice].double() + 0.5 * additive_delta(dA.double(), dB.double())[rows_slice]
    magnitude = W[rows_slice].double().abs() + 0.5 * additive_delta(dA.double().abs(), dB.double().abs())[rows_slice]
    _check_close(block, exact, magnitude, 2, A.dtype, W.dtype)


# ------------------------------------------------------------------ additive


def _check_additive(rows, cols, rank, dtype_name, seed, native_on, scale=0.7):
    grad, _, _, rank = _case(rows, cols, rank, dtype_name, seed)
    compute = DTYPES[dtype_name][1]
    with use_native(native_on):
        grad_A, grad_B = additive_project(grad, rank, compute)
    G64 = grad.double()
    _check_close(grad_A, fold_columns(G64, rank), fold_columns(G64.abs(), rank), cols, compute, compute)
    _check_close(grad_B, fold_rows(G64, rank), fold_rows(G64.abs(), rank), rows, compute, compute)
    W, dA, dB, _ = _case(rows, cols, rank, dtype_name, seed + 1)
    exact = W.double() + scale * additive_delta(dA.double(), dB.double())
    magnitude = W.double().abs() + scale * additive_delta(dA.double().abs(), dB.double().abs())
    with use_native(native_on):
        additive_add_delta_(W, dA, dB, scale)
    _check_close(W, exact, magnitude, 2, compute, W.dtype)


@pytest.mark.parametrize("native_on", PATHS)
@given(shapes, st.sampled_from(sorted(DTYPES)), st.integers(0, 2**31 - 1))
def test_additive_fold_and_spread_equal_reference(native_on, shape, dtype_name, seed):
    _check_additive(*shape, dtype_name, seed, native_on)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("rows,cols,rank,dtype_name", BLOCKING_CASES + [(100, 5000, 7, "fp32"), (64, 777, 48, "fp64")])
def test_additive_across_blocks(native_on, rows, cols, rank, dtype_name):
    _check_additive(rows, cols, rank, dtype_name, 0, native_on)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("rows,cols,rank", [(600, 1000, 8), (64, 3072, 8)])
def test_factor_gradients_own_their_memory(native_on, rows, cols, rank):
    """``Aᵀ·G`` of the native pass is summed from per-chunk partial sums; a view of the first
    partial would keep every chunk's partial (up to 16× the gradient) alive for as long as the
    gradient is kept (the per-layer mode keeps it until the step)."""
    grad, A, B, rank = _case(rows, cols, rank, "fp32", 0)
    with use_native(native_on):
        grad_A, grad_B = lowrank_project(grad, A, B)
        fold_A, fold_B = additive_project(grad, rank, torch.float32)
    for tensor in (grad_A, grad_B, fold_A, fold_B):
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


# ------------------------------------------------------------------ determinism and threads


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native kernels not built")
def test_native_results_do_not_depend_on_the_thread_count():
    grad, A, B, rank = _case(600, 1000, 8, "fp32", 0)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(lowrank_project(grad, A, B) + additive_project(grad, rank, torch.float32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native kernels not built")
def test_python_threads_launch_equals_the_openmp_launch(monkeypatch):
    """Without OpenMP the library is called one chunk at a time from Python threads: same bits."""
    grad, A, B, rank = _case(600, 1000, 8, "bf16", 1)
    W, dA, dB, _ = _case(600, 1000, 8, "bf16", 2)
    kernels = native_kernels()
    results = []
    for openmp in (True, False):
        monkeypatch.setattr(kernels, "openmp", openmp)
        target = W.clone()
        lowrank_add_delta_(target, _change(A, B, dA, dB), 0.5)
        additive_add_delta_(target, dA, dB, 0.25)
        results.append(lowrank_project(grad, A, B) + additive_project(grad, rank, torch.float32) + (target,))
    assert all(torch.equal(x, y) for x, y in zip(*results))


# ------------------------------------------------------------------ the optimizer on both paths


@pytest.mark.parametrize("projection", ["lora", "additive", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native kernels not built")
def test_optimizer_steps_agree_on_both_paths(projection, dtype):
    gen = torch.Generator().manual_seed(0)
    start = (torch.randn(45, 67, generator=gen) * 0.5).to(dtype)
    grads = [(torch.randn(45, 67, generator=gen) * 0.1).to(dtype) for _ in range(3)]
    weights = []
    for native_on in (True, False):
        weight = torch.nn.Parameter(start.clone())
        options = {"init": "symmetric"} if projection == "lora" else {}
        opt = LoRAAdam([weight], lr=1e-2, rank=5, alpha=10.0, projection=projection, precision="nearest",
                       weight_decay=0.1, **options)
        with use_native(native_on):
            for grad in grads:
                weight.grad = grad
                opt.step()
        weights.append(weight.detach().double())
    change = (weights[1] - start.double()).abs().max().item()
    assert change > 1e-3  # it moved
    # bf16: each of the 3 writes may round the other way (1 ulp); fp32: summation order only.
    tolerance = 3 * 2 * _bf16_half_ulp(weights[1]) + 1e-6 if dtype == torch.bfloat16 else 1e-4 * change
    assert ((weights[0] - weights[1]).abs() <= tolerance).all()


def test_bf16_gradient_reaches_the_projection_uncast(monkeypatch):
    seen = []
    original = LoRAProjection.project

    def spy(self, grad, A, B):
        seen.append(grad.dtype)
        return original(self, grad, A, B)

    monkeypatch.setattr(LoRAProjection, "project", spy)
    weight = torch.nn.Parameter(torch.randn(20, 30).to(torch.bfloat16))
    opt = LoRAAdam([weight], rank=4, precision="nearest")
    weight.grad = torch.randn(20, 30).to(torch.bfloat16)
    opt.step()
    assert seen == [torch.bfloat16]


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    return max((event.cpu_memory_usage for event in prof.events()), default=0)


@pytest.mark.parametrize("native_on", PATHS)
@pytest.mark.parametrize("projection", ["lora", "additive"])
def test_nearest_writes_bf16_weight_without_a_weight_sized_buffer(native_on, projection):
    rows, cols, rank = 2048, 512, 4  # fp32 copy of W: 4 MiB; the torch path's row blocks: 1 MiB
    weight = torch.randn(rows, cols).to(torch.bfloat16)
    A, B = torch.randn(rows, rank), torch.randn(rank, cols)
    change = WeightDelta(get_projection(projection), _change(A, B, A * 0.1, B * 0.1), 0.5)
    expected = weight.float() + torch.zeros(rows, cols).add_(
        0.5 * ((A * 1.1) @ (B * 1.1) - A @ B) if projection == "lora" else 0.5 * additive_delta(A * 0.1, B * 0.1))
    with use_native(native_on):
        largest = _largest_allocation(lambda: get_writer("nearest").write_(weight, {}, change))
    assert largest < rows * cols * 4 // 2, largest
    assert ((weight.double() - expected.double()).abs() <= _bf16_half_ulp(expected.double()) * 1.1 + 1e-6).all()


# ------------------------------------------------------------------ random: one draw per redraw


@pytest.mark.parametrize("rule,draws_per_step", [("keep", 1), ("reset", 1), ("transport", 2)])
def test_random_draws_once_per_step_unless_the_rule_reads_the_old_draw(monkeypatch, rule, draws_per_step):
    from lora_optim.projections import random as random_projection

    calls = []
    original = random_projection.draw_factors

    def counting(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs["draw"])
        return original(*args, **kwargs)

    monkeypatch.setattr(random_projection, "draw_factors", counting)
    weight = torch.nn.Parameter(torch.randn(12, 9, dtype=torch.float64))
    opt = LoRAAdam([weight], rank=3, projection="random", moment_rule=rule)
    weight.grad = torch.randn(12, 9, dtype=torch.float64)
    opt.step()
    calls.clear()
    for _ in range(3):
        opt.step()
    assert len(calls) == 3 * draws_per_step


# ------------------------------------------------------------------ building


def test_native_kernels_build_here():
    """CI has a compiler: the kernels must build there (``LORA_OPTIM_NATIVE=0`` opts out)."""
    if os.environ.get("LORA_OPTIM_NATIVE", "1") == "0":
        pytest.skip("LORA_OPTIM_NATIVE=0")
    assert NATIVE_AVAILABLE


def _fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_OPTIM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(native, "_kernels", {})


def test_missing_compiler_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert native_kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_kernels() is None  # decided once per process: no second warning
        grad, A, B, _ = _case(8, 9, 2, "bf16", 0)
        grad_A, grad_B = lowrank_project(grad, A, B)
    torch.testing.assert_close(grad_A, grad.float() @ B.t())


def test_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path / "cache")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "_SOURCE", broken)
    with pytest.warns(RuntimeWarning, match="failed"):
        assert native_kernels() is None


def test_switched_off_by_environment(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("LORA_OPTIM_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_kernels() is None
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="native kernels not built")
def test_build_is_cached_on_disk(monkeypatch, tmp_path):
    _fresh_loader(monkeypatch, tmp_path)
    assert native_kernels() is not None
    built = sorted(tmp_path.glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _fresh_loader(monkeypatch, tmp_path)
    assert native_kernels() is not None
    assert sorted(tmp_path.glob("*.so")) == built and built[0].stat().st_mtime_ns == stamp
