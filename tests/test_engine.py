"""The step engine's GPU shape, counted on the CPU: dispatcher ops and host syncs per step.

On an accelerator what a step of many matrices costs is kernel launches and host syncs, not
arithmetic. A ``TorchDispatchMode`` sees every aten op the step issues (views included) and
every device-to-host read (``_local_scalar_dense``, a copy to the CPU), so the shape of the
step is measured here with the native CPU kernels off and the accelerator's code paths
(:func:`lora_optim.kernels.paths.accelerator_paths`: the path every GPU takes). The targets:
no host sync at all in a step with ``nonfinite="skip"`` (the NaN/Inf decisions stay on the
device, so a CUDA graph can capture the step), for every projection, precision and write mode;
at most 10 aten ops per low-rank matrix for fp32 weights (``lora``, ``additive``, ``svd``) and
a fixed number, independent of the model, elsewhere (the counter-based draws of ``random`` and
of stochastic rounding; a compiled step fuses them).
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


def _count_step(projection: str, dtype: torch.dtype, precision: str | None, nonfinite: str = "skip",
                **options) -> DispatchCounter:
    """Ops of the third step of 64 matrices of two shapes (state exists, no first-step work)."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(48 if i % 2 else 64, 40, generator=gen).to(dtype)) for i in range(MATRICES)]
    opt = LoRAAdam(params, rank=4, alpha=8, projection=projection, precision=precision, nonfinite=nonfinite,
                   **options)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    with use_native(False), accelerator_paths():
        opt.step()
        opt.step()
        with DispatchCounter() as counter:
            opt.step()
    return counter


CASES = [(name, {}) for name in available_projections()] + [("random", {"resample_every": 4})]
#: Aten ops per matrix in eager mode, measured (rounded up): fp32 weights, and the extra ops of
#: bf16 weights per write mode (on top of the fp32 count). ``random`` draws its factors with a
#: counter-based hash (about 40 elementwise ops on ``r·(out+in)`` numbers) and stochastic
#: rounding its 16-bit words (about 30 on ``out + in`` numbers, plus three weight-sized ones):
#: what a compiled step fuses into a few kernels (``tests/test_compile.py``).
FP32_OPS = {"lora": 9, "additive": 7, "svd": 7, "random": 48}
BF16_EXTRA = {"nearest": 2, "compensated": 8, "stochastic": 32}


@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_no_host_sync_and_a_fixed_handful_of_ops_per_matrix(projection, options):
    """fp32 weights (the default precision, ``nearest``): every aten op counted, views included;
    no sync; one fused Adam call per matrix (each with its own ``found_inf``)."""
    counter = _count_step(projection, torch.float32, None, **options)
    assert counter.syncs == 0, counter.ops
    assert counter.total / MATRICES <= FP32_OPS[projection] + (3 if options else 0), counter.ops.most_common(12)
    assert counter.ops["aten._fused_adamw_.default"] == MATRICES


@pytest.mark.parametrize("precision", ["nearest", "compensated", "stochastic"])
@pytest.mark.parametrize("projection,options", CASES, ids=lambda c: str(c))
def test_bf16_writes_sync_nothing_and_stay_a_fixed_handful_of_ops(projection, options, precision):
    """bf16 weights with fp32 factors, every write mode: no sync; a fixed number of ops per
    matrix over the fp32 step (nearest: the conversion of ``G`` and of the change; compensated:
    the Kahan pair, masked; stochastic: the counter-based bits, one fp32 copy of ``W``, an add and
    a mask on the bits)."""
    counter = _count_step(projection, torch.bfloat16, precision, **options)
    assert counter.syncs == 0, counter.ops
    bound = FP32_OPS[projection] + (3 if options else 0) + BF16_EXTRA[precision]
    assert counter.total / MATRICES <= bound, counter.ops.most_common(12)
    if precision == "stochastic":
        assert "aten.random_.from" not in counter.ops  # no generator: the bits are a hash


def test_raise_policy_reads_the_host_once_per_step():
    """``nonfinite="raise"`` must know before anything changes: the one mode with a host read."""
    counter = _count_step("lora", torch.float32, None, nonfinite="raise")
    assert counter.syncs == 1


def test_the_counter_sees_syncs_and_ops():
    with DispatchCounter() as counter:
        t = torch.ones(3)
        t.sum().item()
        t.to("cpu", copy=True)
    assert counter.syncs == 2 and counter.total >= 3


def test_dense_parameters_take_the_fused_kernel_of_torch_adamw_without_a_sync():
    """One fused call per dense parameter, each with its own ``found_inf`` (a NaN skips that
    parameter only), and the list ops of the check and the counts: no sync."""
    params = [nn.Parameter(torch.randn(7)) for _ in range(20)]
    opt = LoRAAdam(params, rank=None)
    for p in params:
        p.grad = torch.randn(7)
    opt.step()
    with accelerator_paths(), DispatchCounter() as counter:
        opt.step()
    assert counter.ops["aten._fused_adamw_.default"] == 20 and counter.syncs == 0
    assert counter.total <= 20 + 30, counter.ops  # measured 46: the check, the counts, the step counts


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
