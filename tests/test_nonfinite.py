"""A NaN or Inf in a gradient never reaches W, the factors or the moments.

Default: that parameter's step is skipped (bit for bit nothing changes), decided on the device;
a ``NonFiniteGradientWarning`` is issued (at once on the CPU, at the next read of the counts on
an accelerator's path) and a 0-dim int64 counter in the state goes up. With
``nonfinite="raise"`` the step raises before any parameter changes. ``torch.amp.GradScaler``
works on top (it skips the whole step itself). The check reads the factor gradients, not ``G``:
every NaN/Inf position of ``G`` reaches them, zero factors included (proved position by
position below).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_optim import LoRAAdam, NonFiniteGradientError, NonFiniteGradientWarning, available_projections
from lora_optim.kernels import native_kernels, use_native
from lora_optim.kernels.paths import accelerator_paths
from lora_optim.nonfinite import finite_flags, finite_table
from lora_optim.projections import get_projection, register_projection, unregister_projection
from lora_optim.projections.lora import LoRAProjection

BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
CONFIGS = [
    dict(projection="lora"),
    dict(projection="lora", init="symmetric"),
    dict(projection="random", resample_every=1),
    dict(projection="random", resample_every=3, moment_rule="transport"),
    dict(projection="additive"),
    dict(rank=None),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


def _snapshot(opt: LoRAAdam, params) -> dict:
    """Copies of ``params`` and of their optimizer state (and the group options)."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": [copy.deepcopy(dict(opt.state[p])) for p in params],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _assert_same(before: dict, after: dict) -> None:
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert before["groups"] == after["groups"]
    for state, other in zip(before["state"], after["state"]):
        assert state.keys() == other.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), key
            else:
                assert value == other[key], key


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    bad=st.sampled_from(BAD_VALUES),
)
@settings(max_examples=8)
def test_nonfinite_gradient_is_skipped_for_that_parameter_only(config, path, data, dtype, bad):
    """Every projection, on the CPU's paths and on an accelerator's (torch ops only, the flags
    never read on the host: the warning comes when the counts are read)."""
    out = data.draw(st.integers(1, 9), label="out")
    inn = data.draw(st.integers(1, 9), label="in")
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(out, inn, generator=gen).to(dtype))
    other = nn.Parameter(torch.randn(5, 4, generator=gen).to(dtype))
    options = {"rank": 2, **config}
    opt = LoRAAdam([weight, other], lr=1e-2, drift_probes=0 if options["rank"] is None else 2, **options)
    context = accelerator_paths if path == "accelerator" else contextlib.nullcontext
    for _ in range(2):  # some state and history first
        weight.grad = torch.randn(out, inn, generator=gen).to(dtype)
        other.grad = torch.randn(5, 4, generator=gen).to(dtype)
        with context(), use_native(path == "cpu"):
            opt.step()
    grad = torch.randn(out, inn, generator=gen).to(dtype)
    grad[data.draw(st.integers(0, out - 1)), data.draw(st.integers(0, inn - 1))] = bad
    weight.grad = grad
    other.grad = torch.randn(5, 4, generator=gen).to(dtype)
    other_before = other.detach().clone()
    before = _snapshot(opt, [weight])
    with pytest.warns(NonFiniteGradientWarning, match="parameter 0"):
        with context(), use_native(path == "cpu"):
            opt.step()
        assert opt.nonfinite_skips(weight) == 1  # the accelerator path warns here
    after = _snapshot(opt, [weight])
    assert after["state"][0].pop("nonfinite_skips") == before["state"][0].pop("nonfinite_skips") + 1
    _assert_same(before, after)
    assert not torch.equal(other, other_before)  # the healthy parameter stepped
    assert torch.isfinite(weight).all()
    assert opt.nonfinite_skips(weight) == 1 and opt.nonfinite_skips(other) == 0 and opt.nonfinite_skips() == 1


def test_nan_with_zero_factor_is_caught():
    """PEFT init: ``A = 0`` at the first step, so ``Aᵀ·G`` would hide a NaN in ``G`` from a check
    of the projected gradients if a GEMM skipped zeros; IEEE products do not (``0·NaN = NaN``),
    and ``G·Bᵀ`` carries it anyway."""
    weight = nn.Parameter(torch.randn(6, 5))
    before = weight.detach().clone()
    opt = LoRAAdam([weight], rank=2)
    grad = torch.randn(6, 5)
    grad[2, 3] = float("nan")
    weight.grad = grad
    with pytest.warns(NonFiniteGradientWarning):
        opt.step()
    assert torch.equal(weight, before)
    assert opt.state[weight]["step"] == 0
    assert torch.count_nonzero(opt.state[weight]["A"]) == 0


class MaskingProjection(LoRAProjection):
    """A variant whose projection masks non-finite entries (as a fused or sparse kernel might):
    it does not declare that NaN/Inf reach its factor gradients, so ``G`` itself is checked."""

    name = "test-masking"
    grad_nonfinite_propagates = False

    def project(self, grad, A, B):
        return super().project(torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), A, B)


@pytest.fixture
def masking():
    register_projection(MaskingProjection)
    yield MaskingProjection.name
    unregister_projection(MaskingProjection.name)


def test_check_does_not_rely_on_the_projection(masking):
    weight = nn.Parameter(torch.randn(6, 5))
    before = weight.detach().clone()
    opt = LoRAAdam([weight], rank=2, projection="test-masking")
    grad = torch.randn(6, 5)
    grad[0, 0] = float("inf")
    weight.grad = grad
    with pytest.warns(NonFiniteGradientWarning):
        opt.step()
    assert torch.equal(weight, before) and opt.nonfinite_skips(weight) == 1


def test_raise_policy_changes_nothing_anywhere():
    gen = torch.Generator().manual_seed(0)
    healthy = nn.Parameter(torch.randn(4, 3, generator=gen))
    strict = nn.Parameter(torch.randn(5, 4, generator=gen))
    opt = LoRAAdam([{"params": [healthy]}, {"params": [strict], "nonfinite": "raise"}], rank=2)
    healthy.grad, strict.grad = torch.randn(4, 3, generator=gen), torch.randn(5, 4, generator=gen)
    opt.step()
    before = _snapshot(opt, [healthy, strict])
    strict.grad = torch.full((5, 4), float("nan"))
    healthy.grad = torch.randn(4, 3, generator=gen)  # comes first: must not step either
    with pytest.raises(NonFiniteGradientError, match=r"parameter 1 \(group 1, shape \(5, 4\)\)"):
        opt.step()
    _assert_same(before, _snapshot(opt, [healthy, strict]))


def test_overflowed_state_never_reaches_the_weight():
    """With finite gradients but a diverged state (here: moments set to inf), the step is checked
    before it is taken; W, the factors and the moments are left alone and the skip is counted."""
    weight = nn.Parameter(torch.randn(6, 5))
    opt = LoRAAdam([weight], rank=2, init="symmetric")
    weight.grad = torch.randn(6, 5)
    opt.step()
    opt.state[weight]["exp_avg_A"].fill_(float("inf"))
    before, factors = weight.detach().clone(), opt.get_factors(weight)
    with pytest.warns(NonFiniteGradientWarning, match="optimizer state .* is not finite"):
        opt.step()
    assert torch.equal(weight, before) and opt.nonfinite_skips(weight) == 1
    assert all(torch.equal(a, b) for a, b in zip(factors, opt.get_factors(weight)))


def test_skip_counter_checkpoints_as_a_device_tensor_and_old_ints_load():
    """The count is a 0-dim int64 tensor (advanced on the device); it round-trips through
    ``weights_only=True``, and a checkpoint of an older version (an int) loads as one."""
    weight = nn.Parameter(torch.randn(6, 5))
    opt = LoRAAdam([weight], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        for _ in range(3):
            weight.grad = torch.full((6, 5), float("nan"))
            opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    restored = LoRAAdam([weight], rank=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.nonfinite_skips(weight) == 3
    count = restored.state[weight]["nonfinite_skips"]
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.dim() == 0
    old = opt.state_dict()
    old["state"][0]["nonfinite_skips"] = 2  # the int of an older checkpoint
    legacy = LoRAAdam([weight], rank=2)
    legacy.load_state_dict(old)
    assert legacy.nonfinite_skips(weight) == 2 and legacy.state[weight]["nonfinite_skips"].dtype == torch.int64


def test_finite_gradients_whose_sum_overflows_are_not_flagged():
    huge = torch.full((64, 64), 3.0e38)
    assert finite_flags([huge, huge.to(torch.bfloat16), torch.full((300, 300), 60000.0, dtype=torch.float16)]) == [
        True, True, True,
    ]
    assert finite_flags([huge, torch.tensor([1.0, float("nan")]), torch.empty(0)]) == [True, False, True]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


@pytest.mark.parametrize("projection", available_projections())
def test_grad_scaler_loop_equals_the_plain_loop_and_skips_inf_steps(projection):
    """Power-of-two scaling and unscaling are exact, so with a GradScaler the run equals the plain
    run bit for bit; a forced inf makes the scaler skip that step (our optimizer never sees it)
    and halve its scale, and training goes on."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(6)]
    forced = 2

    plain_model = _mlp()
    plain = LoRAAdam(plain_model.parameters(), rank=2, projection=projection, lr=1e-2)
    for index, (x, y) in enumerate(batches):
        if index == forced:
            continue  # the scaler will skip this batch
        nn.functional.cross_entropy(plain_model(x), y).backward()
        plain.step()
        plain.zero_grad()

    model = _mlp()
    opt = LoRAAdam(model.parameters(), rank=2, projection=projection, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for index, (x, y) in enumerate(batches):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if index == forced:
            model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if index == forced:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert scaler.get_scale() == 2.0**9
        opt.zero_grad()
    assert opt.nonfinite_skips() == 0
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_accelerator_screen_rechecks_what_its_norm_flags():
    """On an accelerator the check is one 2-norm per list; a norm that overflows on finite
    entries is checked again exactly (a second read, only then), so it is no false alarm."""
    from lora_optim.dispatch_count import DispatchCounter
    from lora_optim.kernels.paths import accelerator_paths

    huge = torch.full((64, 64), 3.0e38)
    with accelerator_paths():
        with DispatchCounter() as counter:
            assert finite_flags([torch.ones(5), torch.randn(4, 4)]) == [True, True]
        assert counter.syncs == 1 and counter.ops["aten._foreach_norm.Scalar"] == 1
        with DispatchCounter() as counter:
            assert finite_flags([huge, torch.tensor([1.0, float("nan")]), torch.ones(3)]) == [True, False, True]
        assert counter.syncs == 2


# ------------------------------------------------------------------ the screen reads the factor gradients

FACTOR_CASES = ["trained", "A zero", "B zero", "both zero", "zero columns"]


def _factors(case: str, out: int, inn: int, rank: int, dtype: torch.dtype, gen: torch.Generator):
    A = torch.randn(out, rank, generator=gen, dtype=dtype)
    B = torch.randn(rank, inn, generator=gen, dtype=dtype)
    if case in ("A zero", "both zero"):
        A.zero_()
    if case in ("B zero", "both zero"):
        B.zero_()
    if case == "zero columns":  # exact zeros where G's NaN sits: a zero-skipping kernel would drop it
        A[::2] = 0
        B[:, ::2] = 0
    return A, B


def _positions(out: int, inn: int, gen: torch.Generator, limit: int = 150):
    every = list(itertools.product(range(out), range(inn)))
    if len(every) <= limit:
        return every
    picks = torch.randperm(len(every), generator=gen)[: limit - 4].tolist()
    corners = [(0, 0), (0, inn - 1), (out - 1, 0), (out - 1, inn - 1)]
    return corners + [every[i] for i in picks]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("case", FACTOR_CASES)
@pytest.mark.parametrize("projection", available_projections())
def test_every_nan_or_inf_position_of_G_reaches_the_factor_gradients(projection, case, native):
    """The engine checks the factor gradients instead of ``G`` (one read of ``G`` saved): proved
    here position by position. For every position of ``G`` (all of a 7×5 matrix; corners and
    146 random ones of 67×131, large enough for the BLAS and the CPU kernels' vector loops), for
    NaN, +Inf and −Inf, for fp32, fp64 and a bf16 ``G`` (fp32 factors), with trained factors
    and with zero ones (``A = 0``: PEFT's init; ``B = 0``; both; zero rows of ``A`` and columns
    of ``B`` at the bad entry): some factor gradient is not finite. ``0·NaN`` and ``0·Inf`` are
    NaN in IEEE arithmetic and no kernel on either path skips zeros."""
    if native and native_kernels() is None:
        pytest.skip("native kernels not built")
    variant = get_projection(projection)
    gen = torch.Generator().manual_seed(0)
    rank = 3
    for (out, inn), (grad_dtype, factor_dtype) in itertools.product(
        [(7, 5), (67, 131)], [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16, torch.float32)]
    ):
        A, B = _factors(case, out, inn, rank, factor_dtype, gen)
        base = torch.randn(out, inn, generator=gen).to(grad_dtype)
        if grad_dtype != factor_dtype and not variant.accepts_low_precision_grad:
            base = base.to(factor_dtype)
        missed = []
        for (i, j), bad in itertools.product(_positions(out, inn, gen), BAD_VALUES):
            grad = base.clone()
            grad[i, j] = bad
            with use_native(native):
                grads = [g for g in variant.project(grad, A, B) if g is not None]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                missed.append((i, j, bad))
        assert not missed, (out, inn, grad_dtype, missed[:5])


def test_finite_table_sees_nan_and_inf_and_never_overflows():
    """The screen's reduction (a float64 sum of squares): NaN and ±Inf make a row not finite;
    the largest finite fp32, bf16 and fp16 values never do; ``None`` entries are finite."""
    huge = [torch.full((300, 300), torch.finfo(d).max, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16)]
    nan = torch.tensor([1.0, float("nan")])
    inf = torch.tensor([float("-inf")])
    table = finite_table([huge, [None, nan], [inf], [torch.empty(0)]], 3, "cpu")
    assert table.tolist() == [[True, True, True], [True, False, True], [False, True, True], [True, True, True]]
