"""The step engine's GPU shape, counted on the CPU: dispatcher ops and host syncs per step.

On an accelerator what a step of many matrices costs is kernel launches and host syncs, not
arithmetic. A ``TorchDispatchMode`` sees every aten op the step issues (views included) and
every device-to-host read (``_local_scalar_dense``, a copy to the CPU), so the shape of the
step is measured here with the native CPU kernels off and the accelerator's code paths
(:func:`lora_optim.kernels.paths.accelerator_paths`: the path every GPU takes). The targets:
at most 10 aten ops per low-rank matrix and at most one host sync per step, for every
projection; before the engine it was 42 ops and one sync per matrix.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, available_projections
from lora_optim.dispatch_count import DispatchCounter
from lora_optim.engine import AdamHyper, foreach_adamw_, adamw_
from lora_optim.kernels import use_native
from lora_optim.kernels.paths import accelerator_paths
from lora_optim.projections import FactorChange, Projection, register_projection, unregister_projection
from lora_optim.projections.lora import lowrank_add_delta_, lowrank_project

MATRICES = 64


def _count_step(projection: str, dtype: torch.dtype, precision: str | None, **options) -> DispatchCounter:
    """Ops of the third step of 64 matrices of two shapes (state exists, no first-step work)."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(48 if i % 2 else 64, 40, generator=gen).to(dtype)) for i in range(MATRICES)]
    opt = LoRAAdam(params, rank=4, alpha=8, projection=projection, precision=precision, **options)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    with use_native(False), accelerator_paths():
        opt.step()
        opt.step()
        with DispatchCounter() as counter:
            opt.step()
    return counter


CASES = [(name, {}) for name in available_projections()] + [("random", {"resample_every": 4})]


@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_at_most_ten_ops_per_matrix_and_one_sync_per_step(projection, options):
    """fp32 weights (the default precision, ``nearest``): every aten op counted, views included."""
    counter = _count_step(projection, torch.float32, None, **options)
    assert counter.syncs == 1, counter.ops
    assert counter.total / MATRICES <= 10, counter.ops.most_common(12)
    assert counter.ops["aten._fused_adamw_.default"] == 1  # all factors of the group in one call


@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_bf16_nearest_launches_at_most_ten_kernels_per_matrix(projection, options):
    """bf16 weights with fp32 factors convert ``G`` once (one op more than fp32): at most 10
    launching ops per matrix (views aside: ``random`` redrawn every step is at 11 with its two
    transposes)."""
    counter = _count_step(projection, torch.bfloat16, "nearest", **options)
    assert counter.syncs == 1, counter.ops
    assert counter.launches / MATRICES <= 10, counter.ops.most_common(12)


@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_bf16_compensated_stays_a_fixed_handful_of_ops(projection, options):
    """The compensated write (the default for bf16) keeps a Kahan buffer in W's dtype: four
    elementwise ops more than ``nearest``. Measured: 9.3 (additive) to 12.3 (random, redrawn
    every step) launching ops per matrix; the bound catches a regression."""
    counter = _count_step(projection, torch.bfloat16, "compensated", **options)
    assert counter.syncs == 1, counter.ops
    assert counter.launches / MATRICES <= 12.5, counter.ops.most_common(12)


@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_bf16_stochastic_stays_a_fixed_handful_of_ops(projection, options):
    """Stochastic rounding (the default for bf16) on an accelerator: one fp32 copy of W, the
    change added by one ``addmm_`` from the thin product, one draw of 16-bit noise, an add and a
    mask on the bits, one copy back. Measured: 11.2 (svd) to 15.3 (random, redrawn every step)
    launching ops per matrix, against 99–104 (161–168 ops) when it drew its noise block by
    block; the bound catches a regression."""
    counter = _count_step(projection, torch.bfloat16, "stochastic", **options)
    assert counter.syncs == 1, counter.ops
    assert counter.launches / MATRICES <= 15.5, counter.ops.most_common(12)
    assert counter.ops["aten.random_.from"] == MATRICES  # one draw per matrix


def test_the_counter_sees_syncs_and_ops():
    with DispatchCounter() as counter:
        t = torch.ones(3)
        t.sum().item()
        t.to("cpu", copy=True)
    assert counter.syncs == 2 and counter.total >= 3


def test_dense_parameters_take_one_fused_call_like_torch_adamw():
    params = [nn.Parameter(torch.randn(7)) for _ in range(20)]
    opt = LoRAAdam(params, rank=None)
    for p in params:
        p.grad = torch.randn(7)
    opt.step()
    with accelerator_paths(), DispatchCounter() as counter:
        opt.step()
    assert counter.ops["aten._fused_adamw_.default"] == 1 and counter.syncs == 1
    assert counter.total <= 12, counter.ops


# ------------------------------------------------------------------ the Adam call


def _lists(gen, count=3, shape=(5, 4), transpose_grads=False):
    params = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]
    grads = [torch.randn(shape[::-1] if transpose_grads else shape, generator=gen, dtype=torch.float64)
             for _ in range(count)]
    if transpose_grads:
        grads = [g.t() for g in grads]
    moments = [torch.rand(shape, generator=gen, dtype=torch.float64) for _ in range(2 * count)]
    steps = [torch.tensor(float(k + 3)) for k in range(count)]
    return params, grads, moments[:count], moments[count:], steps


HYPER = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def test_foreach_fallback_equals_the_fused_kernel():
    """The path for devices without fused Adam kernels agrees with ``torch._fused_adamw_``."""
    gen = torch.Generator().manual_seed(0)
    fused = _lists(gen)
    fallback = [[t.clone() for t in tensors] for tensors in fused]
    scale = torch.tensor(4.0)  # a GradScaler's scale is fp32
    adamw_(*fused, HYPER, grad_scale=scale)
    foreach_adamw_(*fallback, HYPER, HYPER.lr, scale)
    for ours, theirs in zip(fallback[0] + fallback[2] + fallback[3], fused[0] + fused[2] + fused[3]):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)


def test_transposed_gradients_are_read_by_index():
    """The fused CPU kernel walks memory as if contiguous: a transposed gradient would be read in
    the wrong order. ``adamw_`` makes gradients contiguous first."""
    gen = torch.Generator().manual_seed(1)
    strided = _lists(gen, transpose_grads=True)
    assert not strided[1][0].is_contiguous()
    contiguous = [[t.clone().contiguous() for t in tensors] for tensors in strided]
    adamw_(*strided, HYPER)
    adamw_(*contiguous, HYPER)
    for a, b in zip(strided[0] + strided[2], contiguous[0] + contiguous[2]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ a frozen factor


class FrozenB(Projection):
    """``ΔW = A·B`` with ``B`` fixed (LoRA-FA): only ``A`` trains."""

    name = "test-engine-frozen-b"

    def init_state(self, weight, rank, seed, factor_dtype, group):
        gen = torch.Generator().manual_seed(seed)
        return {"A": torch.zeros(weight.shape[0], rank, dtype=factor_dtype),
                "B": torch.randn(rank, weight.shape[1], generator=gen, dtype=factor_dtype)}

    def current_factors(self, state, group):
        return state["A"], state["B"]

    def trained_factors(self, state, group):
        return True, False

    def project(self, grad, A, B):
        return lowrank_project(grad, A, B)[0], None

    def add_delta_(self, target, change: FactorChange, scale, row_start=0):
        lowrank_add_delta_(target, change, scale, row_start)


@pytest.fixture
def frozen_b():
    register_projection(FrozenB)
    yield FrozenB.name
    unregister_projection(FrozenB.name)


@pytest.mark.parametrize("mode", ["plain", "per_layer", "activation"])
def test_a_frozen_factor_takes_no_step_and_no_weight_decay(frozen_b, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = LoRAAdam(model.parameters(), rank=2, projection=frozen_b, weight_decay=0.5, lr=1e-2)
    if mode == "per_layer":
        opt.enable_per_layer()
    elif mode == "activation":
        opt.attach(model)
    weight = model[0].weight
    B0 = opt.get_factors(weight)[1]
    W0 = weight.detach().clone()
    x = torch.randn(16, 6, dtype=torch.float64)
    for _ in range(5):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    A, B = opt.get_factors(weight)
    assert torch.equal(B, B0)
    assert opt.state[weight]["exp_avg_B"].abs().max() == 0 and opt.state[weight]["exp_avg_sq_B"].abs().max() == 0
    torch.testing.assert_close(weight.detach() - W0, A @ B, rtol=1e-12, atol=1e-14)  # alpha = rank: s = 1
    assert A.abs().max() > 0
