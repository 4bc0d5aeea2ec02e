"""The step engine: one optimizer step over lists of parameters.

:class:`~lora_optim.LoRAAdam` gathers what a step needs into :class:`DenseBatch` and
:class:`LowRankBatch` lists (one batch per param group and device) and calls :func:`step_`; the
per-layer and activation-side modes reach the same function through ``step()``, with projected
sums in place of ``G`` (:func:`project_piece`, :func:`project_activation_piece`). Nothing here
knows the optimizer class. As ``torch.optim.adamw`` does, the math runs over lists, so the
number of kernel launches and host syncs per step does not grow with the work:

1. every low-rank matrix: the step's factors (:meth:`Projection.step_factors`, pure) and the
   factor gradients ``(G·Bᵀ, Aᵀ·G)`` for ``lora`` (four ops with the transposes);
2. one finite check of every gradient, factor gradient and factor moment, and of a
   ``GradScaler``'s ``found_inf``: one fused reduction per list, **one host sync per step**
   (:class:`~lora_optim.nonfinite.FiniteCheck`). ``nonfinite="raise"`` raises here, before
   anything has changed; a skipped parameter stops here, unchanged;
3. :meth:`Projection.begin_step` commits each step's factors (``random``'s draw counter);
4. per device and dtype: the scale ``s`` on all factor gradients, a copy of all factors, the
   step counts, **one** ``torch._fused_adamw_`` on all factors (the kernel of
   ``torch.optim.AdamW(fused=True)``; a ``GradScaler``'s scale is divided out inside it), and
   ``dA = A' − A`` for all of them: five ops for the whole batch;
5. every matrix: the write ``W += s·(Δ(A', B') − Δ(A, B))`` by its write mode (three ops for
   ``lora`` into an fp32 ``W``: two concatenations and one ``addmm_``).

Two knobs change step 4 (:mod:`lora_optim.option_table`): ``max_grad_norm`` clips, before any
Adam call, with one norm over the (``s``-scaled) factor gradients and dense gradients of every
group that sets it (:func:`clip_coefficients`: one ``_foreach_norm`` per batch and one multiply,
the factor stays on the device), and ``loraplus_lr_ratio`` (LoRA+) splits a batch's Adam call in
two, ``A`` at ``lr × ratio`` and ``B`` at ``lr``.

So a ``lora`` matrix costs seven aten ops per step on the torch path, whatever the number of
matrices; ``tests/test_engine.py`` counts them with a ``TorchDispatchMode``.

Dense parameters (``rank=None`` groups, vectors) take one ``torch._fused_adamw_`` per batch,
bit for bit ``torch.optim.AdamW(fused=True)``.

With ``preserve_sparsity=True`` (:mod:`lora_optim.sparsity`) ``G`` (or each piece) is masked
before :meth:`Projection.step_factors` and the projection see it, and the write goes through a
:class:`~lora_optim.weight_change.MaskedWeightDelta`: a few more ops per matrix, and none for
groups without the option.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lora_optim.distributed import all_reduce_sum_
from lora_optim.divergence import record_step_sizes_
from lora_optim.drift import record_drift_step_
from lora_optim.matrix import as_matrix, writable_matrix
from lora_optim.nonfinite import FiniteCheck, NonFiniteGradientError
from lora_optim.precision import WeightWriter
from lora_optim.projections.base import FactorChange, Projection
from lora_optim.sparsity import mask_grad, sparsity_mask
from lora_optim.state_keys import DRIFT_CHANGE, EXP_AVG, EXP_AVG_SQ, MOMENT_KEYS, STEP, STEP_SIZE_REFERENCE
from lora_optim.weight_change import weight_delta

__all__ = [
    "AdamHyper",
    "DenseBatch",
    "LowRankItem",
    "LowRankBatch",
    "StepReport",
    "step_",
    "adamw_",
    "foreach_adamw_",
    "prepare_grad",
    "project_piece",
    "project_activation_piece",
    "clip_coefficients",
    "FUSED_DEVICE_TYPES",
]

#: Device types with ``torch._fused_adamw_`` kernels; elsewhere the foreach fallback runs.
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})

#: Why a parameter was skipped.
GRADIENT_CAUSE = "its gradient has NaN or Inf entries; the weight and its optimizer state were left unchanged"
STATE_CAUSE = ("its optimizer state (the factors' Adam moments) is not finite; the weight and its optimizer "
               "state were left unchanged")


@dataclass(frozen=True)
class AdamHyper:
    """AdamW hyperparameters of one param group, as read at this step."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass
class DenseBatch:
    """Densely trained parameters of one param group on one device and dtype, with their gradients."""

    hyper: AdamHyper
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    #: Names for messages, e.g. ``"parameter 3 (group 1, shape (4,))"``.
    names: list[str] = field(default_factory=list)
    #: Each parameter's ``nonfinite`` policy.
    policies: list[str] = field(default_factory=list)
    #: Per parameter: the process group it is sharded over (its NaN/Inf answer is combined over
    #: the ranks), or ``None``.
    groups: list[Any] = field(default_factory=list)
    #: The group's ``max_grad_norm`` (``None``: not clipped, not counted in the norm; see :func:`clip_coefficients`).
    max_grad_norm: float | None = None


@dataclass
class LowRankItem:
    """One low-rank matrix in a step: its gradient ``G`` (plain mode) or its projected sums (modes)."""

    param: Tensor
    state: dict[str, Any]
    name: str
    policy: str
    writer: WeightWriter
    grad: Tensor | None = None
    sums: tuple[Tensor, Tensor] | None = None
    #: On a weight sharded by rows (FSDP2): the global index of the first local row, the process
    #: group the weight is sharded over (``None``: not sharded), and whether this rank's
    #: ``∂L/∂B`` is a partial sum over the group (from ``G``'s local rows; the activation-side
    #: mode's sums are whole already).
    row_offset: int = 0
    group: Any = None
    partial_B: bool = False
    # Filled by the engine.
    factors: tuple[Tensor, Tensor] | None = None
    factor_grads: tuple[Tensor, Tensor] | None = None


@dataclass
class LowRankBatch:
    """Low-rank matrices of one param group (one projection, scale and hyperparameters)."""

    projection: Projection
    options: Mapping[str, Any]
    scale: float
    hyper: AdamHyper
    items: list[LowRankItem] = field(default_factory=list)
    #: The group's ``max_grad_norm`` (``None``: not clipped, not counted in the norm; see :func:`clip_coefficients`).
    max_grad_norm: float | None = None
    #: LoRA+: the learning rate of ``A`` (PEFT's ``lora_B``) is ``lr × lr_ratio_A``; ``B`` keeps ``lr``.
    lr_ratio_A: float = 1.0


@dataclass
class StepReport:
    """What :func:`step_` did not do: ``skipped`` lists ``(name, state, cause)`` of the parameters
    left unchanged; ``scaler_skipped`` is true when a ``GradScaler`` found an Inf/NaN (then
    nothing was stepped and nothing is in ``skipped``)."""

    skipped: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    scaler_skipped: bool = False


def prepare_grad(grad: Tensor, factor_dtype: torch.dtype, projection: Projection) -> Tensor:
    """The ``out×in`` matrix view of a gradient piece, in the factor dtype unless the projection
    reads lower precision itself (:attr:`Projection.accepts_low_precision_grad`). Raises
    ``TypeError`` for a sparse or otherwise non-strided gradient."""
    if grad.layout != torch.strided:
        raise TypeError(f"LoRAAdam does not support sparse gradients; got a gradient with layout {grad.layout}")
    matrix = as_matrix(grad)
    if matrix.dtype != factor_dtype and not projection.accepts_low_precision_grad:
        matrix = matrix.to(factor_dtype)
    return matrix


def project_piece(
    projection: Projection, state: Mapping[str, Any], options: Mapping[str, Any], grad: Tensor
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂A, ∂L/∂B)`` at ``s = 1`` of one gradient piece, with the step's factors (a factor
    that does not train gets zeros).

    A NaN or Inf in ``G`` poisons the result (one reduction, on the device, no sync), so the
    step's check of the sums sees it even if the projection would hide it. With
    ``preserve_sparsity=True`` the piece is masked first (:mod:`lora_optim.sparsity`).
    """
    A, B = projection.step_factors(state, options)
    matrix = prepare_grad(grad, A.dtype, projection)
    mask = sparsity_mask(state, options)  # preserve_sparsity: G ⊙ M
    if mask is not None:
        matrix = mask_grad(matrix, mask)
    grad_A, grad_B = _fill_frozen(projection.project(matrix, A, B), A, B)
    grad_A.add_(torch.linalg.vector_norm(matrix, float("inf")).to(grad_A.dtype).mul_(0))  # 0·Inf = NaN
    return grad_A, grad_B


def project_activation_piece(
    projection: Projection, state: Mapping[str, Any], options: Mapping[str, Any], inputs: Tensor, output_grads: Tensor
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂A, ∂L/∂B)`` at ``s = 1`` of one use of a linear layer: ``inputs`` ``X`` (``...×in``)
    and ``output_grads`` ``δY`` (``...×out``), rows are tokens; ``G = δYᵀX`` is never formed,
    except with ``preserve_sparsity=True``, where ``(δYᵀX) ⊙ M`` is (:mod:`lora_optim.sparsity`)."""
    A, B = projection.step_factors(state, options)
    x_rows = inputs.reshape(-1, inputs.shape[-1])
    grad_rows = output_grads.reshape(-1, output_grads.shape[-1])
    if x_rows.dtype != A.dtype:
        x_rows = x_rows.to(A.dtype)
    if grad_rows.dtype != A.dtype:
        grad_rows = grad_rows.to(A.dtype)
    mask = sparsity_mask(state, options)  # preserve_sparsity: the masked G has no low-rank shortcut
    if mask is not None:
        return _fill_frozen(projection.project(mask_grad(torch.mm(grad_rows.t(), x_rows), mask), A, B), A, B)
    return _fill_frozen(projection.project_activations(x_rows, grad_rows, A, B), A, B)


def _fill_frozen(grads: tuple[Tensor | None, Tensor | None], A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    # A factor that does not train may have no gradient; a sum of pieces needs one anyway.
    grad_A, grad_B = grads
    return (torch.zeros_like(A) if grad_A is None else grad_A), (torch.zeros_like(B) if grad_B is None else grad_B)


def adamw_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], hyper: AdamHyper, grad_scale: Tensor | None = None,
) -> None:
    """One AdamW step on lists of one device and dtype, in place; ``steps`` (aligned with
    ``params``, already counting this step) are read, not changed.

    ``torch._fused_adamw_`` where the device has it (the kernel of
    ``torch.optim.AdamW(fused=True)``, so results agree with it bit for bit), else the same math
    in ``torch._foreach_*`` ops with the bias corrections formed on the device (no host sync).
    ``grad_scale`` (a ``GradScaler``'s scale) is divided out of ``grads`` in place first.

    The fused CPU kernel walks every tensor as contiguous memory, whatever its strides (a
    transposed gradient is read in the wrong order), so non-contiguous gradients are made
    contiguous first, and lists with a non-contiguous parameter or moment take the foreach path.
    """
    if not params:
        return
    lr = hyper.lr
    if isinstance(lr, Tensor) and lr.device != params[0].device:
        lr = float(lr) if lr.device.type == "cpu" else lr.to(params[0].device)
    grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
    contiguous = all(t.is_contiguous() for tensors in (params, exp_avgs, exp_avg_sqs) for t in tensors)
    if params[0].device.type in FUSED_DEVICE_TYPES and contiguous:
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=hyper.beta1, beta2=hyper.beta2,
            weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=False, grad_scale=grad_scale,
            found_inf=None,
        )
        return
    foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, lr, grad_scale)


def foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper: AdamHyper, lr, grad_scale) -> None:
    """The path of :func:`adamw_` for devices without fused kernels (and non-contiguous lists):
    AdamW in foreach ops, ``m ← lerp(m, g, 1−β1)``, ``v ← β2·v + (1−β2)·g²``,
    ``X ← X(1 − ηλ) − η·m/(1−β1^t) / (√v/√(1−β2^t) + ε)``."""
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale)
    torch._foreach_lerp_(exp_avgs, grads, 1 - hyper.beta1)
    torch._foreach_mul_(exp_avg_sqs, hyper.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - hyper.beta2)
    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * hyper.weight_decay)
    # Bias corrections in at least fp32 and in the parameters' precision (the fused kernels use
    # double), on the device: no host sync.
    wide = torch.promote_types(params[0].dtype, torch.float32)
    steps = [step.to(wide) for step in steps]
    correction1 = torch._foreach_pow(hyper.beta1, steps)  # β1^t
    torch._foreach_neg_(correction1)
    torch._foreach_add_(correction1, 1)  # 1 − β1^t
    correction2 = torch._foreach_pow(hyper.beta2, steps)
    torch._foreach_neg_(correction2)
    torch._foreach_add_(correction2, 1)
    torch._foreach_sqrt_(correction2)  # √(1 − β2^t)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, correction2)
    torch._foreach_add_(denominators, hyper.eps)
    torch._foreach_mul_(denominators, correction1)  # (1 − β1^t)(√v̂ + ε)
    torch._foreach_div_(denominators, -lr)
    torch._foreach_addcdiv_(params, exp_avgs, denominators)


def _sum_partial_grads_(lowrank: Sequence[LowRankBatch]) -> None:
    """On weights sharded by rows, ``∂L/∂B`` from this rank's rows is a partial sum: add them up
    over the ranks, all matrices of a group in one all-reduce (``r×in`` values per matrix)."""
    partial: dict[Any, list[Tensor]] = {}
    for batch in lowrank:
        for item in batch.items:
            if item.partial_B and item.factor_grads[1] is not None:
                partial.setdefault(item.group, []).append(item.factor_grads[1])
    for group, grads in partial.items():
        all_reduce_sum_(grads, group)


def _check(dense: Sequence[DenseBatch], lowrank: Sequence[LowRankBatch], found_inf: Tensor | None) -> dict:
    """One host read: finite flags of every gradient, factor gradient and factor moment."""
    check = FiniteCheck()
    for batch in dense:
        for name, grad, group in zip(batch.names, batch.grads, batch.groups or [None] * len(batch.names)):
            check.add(("grad", name), [grad], group)
    for batch in lowrank:
        for item in batch.items:
            check.add(("grad", item.name), [t for t in (item.grad, *item.factor_grads) if t is not None], item.group)
            check.add(("state", item.name), [item.state[key] for keys in MOMENT_KEYS.values() for key in keys],
                      item.group)
    if isinstance(found_inf, Tensor):
        check.add_flag("scaler", found_inf.reshape(()) == 0)
    return check.read()


def step_(
    dense: Sequence[DenseBatch],
    lowrank: Sequence[LowRankBatch],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> StepReport:
    """One step of every batch (see the module docstring); returns what was not done.

    Raises :class:`~lora_optim.nonfinite.NonFiniteGradientError` naming every offending
    parameter of a ``nonfinite="raise"`` group, before anything has changed. ``grad_scale`` and
    ``found_inf`` are a ``GradScaler``'s (its optimizer contract): gradients are divided by
    ``grad_scale``, and a non-zero ``found_inf`` skips the whole step.
    """
    for batch in lowrank:
        for item in batch.items:
            if item.sums is not None:
                item.factors = batch.projection.step_factors(item.state, batch.options)
                item.factor_grads = item.sums
                continue
            item.grad = prepare_grad(item.grad, item.state[MOMENT_KEYS["A"][0]].dtype, batch.projection)
            mask = sparsity_mask(item.state, batch.options)  # preserve_sparsity: G ⊙ M
            if mask is not None:
                item.grad = mask_grad(item.grad, mask)
            A, B = batch.projection.step_factors(item.state, batch.options, item.grad)
            item.factors = (A, B)
            if item.group is None:
                item.factor_grads = batch.projection.project(item.grad, A, B)
            else:
                item.factor_grads = batch.projection.project(item.grad, A, B, row_offset=item.row_offset)
    _sum_partial_grads_(lowrank)

    flags = _check(dense, lowrank, found_inf)
    report = StepReport()
    if not flags.get("scaler", True):
        report.scaler_skipped = True
        return report
    refused = [name for batch in dense for name, policy in zip(batch.names, batch.policies)
               if policy == "raise" and not flags[("grad", name)]]
    refused += [item.name for batch in lowrank for item in batch.items
                if item.policy == "raise" and not (flags[("grad", item.name)] and flags[("state", item.name)])]
    if refused:
        raise NonFiniteGradientError(
            f"non-finite gradient or optimizer state (NaN or Inf) in {', '.join(refused)} with nonfinite='raise'; "
            "nothing was changed"
        )

    # Prepare every batch (commit the factors, scale the factor gradients by s), then clip with
    # one norm over all of them, then step: the clip needs every gradient before any Adam call.
    prepared: list[_Prepared] = []
    for batch in dense:
        keep = [index for index, name in enumerate(batch.names) if flags[("grad", name)]]
        report.skipped += [(batch.names[i], batch.states[i], GRADIENT_CAUSE) for i in range(len(batch.names))
                           if i not in keep]
        prepared.append(_prepare_dense(batch, keep))
    for batch in lowrank:
        stepping = []
        for item in batch.items:
            if not flags[("grad", item.name)]:
                report.skipped.append((item.name, item.state, GRADIENT_CAUSE))
            elif not flags[("state", item.name)]:
                report.skipped.append((item.name, item.state, STATE_CAUSE))
            else:
                stepping.append(item)
        prepared.append(_prepare_lowrank(batch, stepping))
    coefficients: list[Tensor | None] = [None] * len(prepared)
    if any(plan.max_grad_norm is not None for plan in prepared):
        coefficients = clip_coefficients(
            [(plan.max_grad_norm, [grad for call in plan.calls for grad in call.grads]) for plan in prepared],
            grad_scale,
        )
    for plan, coefficient in zip(prepared, coefficients):
        for call in plan.calls:
            if coefficient is not None and call.grads:
                torch._foreach_mul_(call.grads, coefficient)
            adamw_(call.params, call.grads, call.exp_avgs, call.exp_avg_sqs, call.steps, call.hyper, grad_scale)
        if plan.finish is not None:
            plan.finish()
    return report


def clip_coefficients(
    batches: Sequence[tuple[float | None, Sequence[Tensor]]], grad_scale: Tensor | None = None
) -> list[Tensor | None]:
    r"""The gradient-clipping factor of each batch, as ``torch.nn.utils.clip_grad_norm_`` computes it.

    ``batches`` holds ``(max_grad_norm, grads)`` per batch. One total norm is taken over the
    gradients of every batch whose ``max_grad_norm`` is set (the factor gradients ``s·G·Bᵀ``,
    ``s·Aᵀ·G`` of the low-rank matrices, the gradients of the dense parameters),

    .. math::

        \lVert g \rVert = \Big(\sum_i \lVert g_i \rVert_2^2\Big)^{1/2} / \sigma, \qquad
        c_b = \min\Big(1,\ \frac{m_b}{\lVert g \rVert + 10^{-6}}\Big),

    with ``σ`` the ``GradScaler``'s scale (1 without one) and ``m_b`` the batch's ``max_grad_norm``;
    a batch's gradients are to be multiplied by its ``c_b`` (a 0-dim tensor on the device of
    its gradients; no host sync). Batches without ``max_grad_norm`` get ``None``. With one
    ``max_grad_norm`` for all groups this is ``clip_grad_norm_(params, max_grad_norm)`` on the
    gradients graph LoRA sees (its ``lora_A``/``lora_B`` gradients), not on ``G``.
    """
    clipped = [grads for max_norm, grads in batches if max_norm is not None]
    if not clipped:
        return [None] * len(batches)
    norms = [norm for grads in clipped if grads for norm in torch._foreach_norm(list(grads), 2.0)]
    if not norms:
        return [None] * len(batches)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), 2.0)
    if grad_scale is not None:
        total = total / grad_scale.to(device=device, dtype=total.dtype)
    coefficients: list[Tensor | None] = []
    for max_norm, grads in batches:
        if max_norm is None or not grads:
            coefficients.append(None)
            continue
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coefficients.append(coefficient.to(device=grads[0].device, dtype=grads[0].dtype))
    return coefficients


@dataclass
class _AdamCall:
    """The arguments of one :func:`adamw_` call."""

    hyper: AdamHyper
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]


@dataclass
class _Prepared:
    """A batch ready to step: its Adam calls, its clip setting, and what runs after the calls."""

    max_grad_norm: float | None
    calls: list[_AdamCall]
    finish: Any = None  # a callable, or None


def _prepare_dense(batch: DenseBatch, keep: list[int]) -> _Prepared:
    params = [batch.params[i] for i in keep]
    if not params:
        return _Prepared(batch.max_grad_norm, [])
    states = [batch.states[i] for i in keep]
    steps = [state[STEP] for state in states]
    torch._foreach_add_(steps, 1.0)
    call = _AdamCall(batch.hyper, params, [batch.grads[i] for i in keep], [s[EXP_AVG] for s in states],
                     [s[EXP_AVG_SQ] for s in states], steps)
    return _Prepared(batch.max_grad_norm, [call])


def _prepare_lowrank(batch: LowRankBatch, items: list[LowRankItem]) -> _Prepared:
    if not items:
        return _Prepared(batch.max_grad_norm, [])
    projection = batch.projection
    # The trained factors of every item, with their gradients and moments, as flat lists.
    factors: list[Tensor] = []
    grads: list[Tensor] = []
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    steps: list[Tensor] = []
    is_A: list[bool] = []
    positions: list[tuple[int | None, int | None]] = []  # per item: where A and B are in `factors`
    for item in items:
        trains = projection.trained_factors(item.state, batch.options)
        A, B = projection.begin_step(item.state, batch.options, *item.factors)
        item.factors = (A, B)
        where: list[int | None] = []
        for factor, grad, trained, (exp_avg, exp_avg_sq), first in zip(
            (A, B), item.factor_grads, trains, (MOMENT_KEYS["A"], MOMENT_KEYS["B"]), (True, False)
        ):
            if not trained:
                where.append(None)
                continue
            where.append(len(factors))
            factors.append(factor)
            grads.append(grad)
            exp_avgs.append(item.state[exp_avg])
            exp_avg_sqs.append(item.state[exp_avg_sq])
            steps.append(item.state[STEP])
            is_A.append(first)
        positions.append((where[0], where[1]))
    torch._foreach_add_([item.state[STEP] for item in items], 1.0)
    if not factors:
        return _Prepared(batch.max_grad_norm, [], lambda: _write_lowrank_(batch, items, positions, [], []))
    if batch.scale != 1.0:
        torch._foreach_mul_(grads, batch.scale)
    before = torch._foreach_mul(factors, 1.0)  # exact copies (−0.0 stays −0.0)
    if batch.lr_ratio_A == 1.0:
        calls = [_AdamCall(batch.hyper, factors, grads, exp_avgs, exp_avg_sqs, steps)]
    else:  # LoRA+: A (PEFT's lora_B) at lr × ratio, B at lr; two fused calls
        calls = []
        for want_A, hyper in ((True, replace(batch.hyper, lr=batch.hyper.lr * batch.lr_ratio_A)), (False, batch.hyper)):
            chosen = [i for i, first in enumerate(is_A) if first == want_A]
            if chosen:
                calls.append(_AdamCall(hyper, *([lst[i] for i in chosen]
                                                for lst in (factors, grads, exp_avgs, exp_avg_sqs, steps))))

    def finish() -> None:
        # The steps the stored factors really took, so that W follows s·(Δ(A_t, B_t) − Δ(A_0, B_0))
        # of the stored factors to the rounding of one step.
        _write_lowrank_(batch, items, positions, before, torch._foreach_sub(factors, before))

    return _Prepared(batch.max_grad_norm, calls, finish)


def _write_lowrank_(batch: LowRankBatch, items: list[LowRankItem], positions: list[tuple[int | None, int | None]],
                    before: list[Tensor], deltas: list[Tensor]) -> None:
    projection = batch.projection
    guarded = [item for item in items if STEP_SIZE_REFERENCE in item.state]  # the divergence guard, on the device
    record_step_sizes_(batch.scale, [item.state for item in guarded], [item.factors for item in guarded],
                       [tuple(None if i is None else deltas[i] for i in where)
                        for item, where in zip(items, positions) if STEP_SIZE_REFERENCE in item.state])
    for item, (index_A, index_B) in zip(items, positions):
        A, B = item.factors
        old_A, step_A = (A, torch.zeros_like(A)) if index_A is None else (before[index_A], deltas[index_A])
        old_B, step_B = (B, torch.zeros_like(B)) if index_B is None else (before[index_B], deltas[index_B])
        change = FactorChange(old_A, old_B, A, B, step_A, step_B, item.row_offset)
        mask = sparsity_mask(item.state, batch.options)  # preserve_sparsity: (s·ΔW) ⊙ M
        if DRIFT_CHANGE in item.state:
            record_drift_step_(item.state, projection, change, batch.scale, mask)
        delta = weight_delta(projection, change, batch.scale, mask)
        with writable_matrix(item.param) as weight:
            item.writer.write_(weight, item.state, delta)
