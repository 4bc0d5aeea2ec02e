"""The step engine: one optimizer step over lists of parameters, decided on the device.

:class:`~lora_optim.LoRAAdam` gathers what a step needs into :class:`DenseBatch` and
:class:`LowRankBatch` lists (one batch per param group and device) and calls :func:`step_`; the
per-layer and activation-side modes reach the same function through ``step()``, with projected
sums in place of ``G`` (:func:`project_piece`, :func:`project_activation_piece`). Nothing here
knows the optimizer class. As ``torch.optim.adamw`` does, the math runs over lists, and no step
reads a value back to the host unless a group asks for it, so a step can be compiled whole
(``torch.compile``) and captured in a CUDA graph:

1. every low-rank matrix: the step's factors (:meth:`Projection.step_factors`, pure) and the
   factor gradients ``(G·Bᵀ, Aᵀ·G)`` for ``lora`` (four ops with the transposes);
2. per batch, one finite check of every factor gradient, factor and factor moment (and of ``G``
   itself only where the step reads it raw: :mod:`lora_optim.nonfinite`), combined with a
   ``GradScaler``'s ``found_inf``: a 0-dim ``taken`` flag per parameter, **on the device**;
3. :meth:`Projection.begin_step` commits each step's factors with ``taken`` (``random``'s draw
   counter advances on the device only where the step is taken);
4. per batch: the step counts advance by ``taken``, the scale ``s`` multiplies all factor
   gradients, a copy of all factors; then one ``torch._fused_adamw_`` per parameter (the kernel
   of ``torch.optim.AdamW(fused=True)``) with ``found_inf = not taken``: a skipped parameter's
   kernel returns at once, so its factors and moments stay exactly as they were; and
   ``dA = A' − A`` for all factors;
5. every matrix: the write ``W += s·(Δ(A', B') − Δ(A, B))`` by its write mode, with ``taken``
   (a skipped parameter's change is exactly zero; the compensated mode also keeps its buffer);
   before it, per batch, the divergence guard's step sizes (:mod:`lora_optim.divergence`: a
   fixed handful of ops, a skipped parameter masked out with ``taken``, no host read).

A ``nonfinite="raise"`` group, and a projection whose commit changes host-side state this step
(:meth:`Projection.host_decides`: an ``svd`` refresh, the first step of ``init="gradient"``),
read the flags of the step on the host: **one host sync** in those steps, before anything has
changed (a ``"raise"`` group raises there). Every other step has none.

Two knobs change step 4 (:mod:`lora_optim.option_table`): ``max_grad_norm`` clips, before any
Adam call, with one norm over the (``s``-scaled) factor gradients and dense gradients of every
group that sets it, skipped parameters left out (:func:`clip_coefficients`: one
``_foreach_norm`` per batch and one multiply, the factor stays on the device), and
``loraplus_lr_ratio`` (LoRA+) splits a parameter's Adam call in two, ``A`` at ``lr × ratio`` and
``B`` at ``lr``.

Dense parameters (``rank=None`` groups, vectors) take one ``torch._fused_adamw_`` each (each
with its own ``found_inf``), bit for bit ``torch.optim.AdamW(fused=True)``.

With ``preserve_sparsity=True`` (:mod:`lora_optim.sparsity`) ``G`` (or each piece) is masked
before :meth:`Projection.step_factors` and the projection see it, and the write goes through a
:class:`~lora_optim.weight_change.MaskedWeightDelta`: a few more ops per matrix, and none for
groups without the option. ``tests/test_engine.py`` counts the ops and syncs of a step with a
``TorchDispatchMode``.
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
from lora_optim.nonfinite import NonFiniteGradientError, finite_table
from lora_optim.precision import WeightWriter
from lora_optim.projections.base import FactorChange, Projection
from lora_optim.sparsity import mask_grad, sparsity_mask
from lora_optim.state_keys import (
    DRIFT_CHANGE,
    EXP_AVG,
    EXP_AVG_SQ,
    MOMENT_KEYS,
    NONFINITE_SKIPS,
    STEP,
    STEP_SIZE_REFERENCE,
)
from lora_optim.weight_change import weight_delta

__all__ = [
    "AdamHyper",
    "DenseBatch",
    "LowRankItem",
    "LowRankBatch",
    "StepReport",
    "SkipRecord",
    "step_",
    "adamw_",
    "foreach_adamw_",
    "prepare_grad",
    "project_piece",
    "project_activation_piece",
    "clip_coefficients",
    "FUSED_DEVICE_TYPES",
    "GRADIENT_CAUSE",
    "STATE_CAUSE",
]

#: Device types with ``torch._fused_adamw_`` kernels; elsewhere the foreach fallback runs.
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})

#: Why a parameter was skipped.
GRADIENT_CAUSE = "its gradient has NaN or Inf entries; the weight and its optimizer state were left unchanged"
STATE_CAUSE = ("its optimizer state (the factors or their Adam moments) is not finite; the weight and its optimizer "
               "state were left unchanged")

#: Checked tensors per parameter: gradients (``∂L/∂A``, ``∂L/∂B``, and ``G`` where it is read raw)
#: and state (four moments and the two factors).
_GRAD_WIDTH = 3
_STATE_WIDTH = 6


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
    #: Whether ``G`` itself is checked (the step reads it raw, or the projection may hide a NaN).
    screen_grad: bool = False
    #: Whether the commit of this step is decided on the host (:meth:`Projection.host_decides`).
    host_decided: bool = False


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
class SkipRecord:
    """One parameter's outcome, on the device: ``grad_ok`` and ``state_ok`` (0-dim bools) and
    ``counted`` (0-dim int64: 1 if this step was skipped for a NaN/Inf of its own, not a
    ``GradScaler``'s); ``host`` holds ``(grad_ok, state_ok, counted)`` as Python values when the
    step read them."""

    name: str
    state: dict[str, Any]
    grad_ok: Tensor
    state_ok: Tensor
    counted: Tensor
    host: tuple[bool, bool, int] | None = None


@dataclass
class StepReport:
    """What :func:`step_` decided: a :class:`SkipRecord` per parameter (``records``), whether the
    step read its flags on the host (``host_read``: then every record has ``host``), and, if so,
    whether a ``GradScaler`` found an Inf/NaN (``scaler_skipped``: nothing was stepped)."""

    records: list[SkipRecord] = field(default_factory=list)
    host_read: bool = False
    scaler_skipped: bool = False

    def skipped(self) -> list[tuple[str, dict[str, Any], str]]:
        """``(name, state, cause)`` of the parameters skipped for a NaN/Inf of their own (host-read
        steps only; empty otherwise)."""
        return [(r.name, r.state, GRADIENT_CAUSE if not r.host[0] else STATE_CAUSE)
                for r in self.records if r.host is not None and r.host[2]]


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

    For a projection that does not declare :attr:`Projection.grad_nonfinite_propagates`, a NaN
    or Inf in ``G`` poisons the result (one reduction, on the device, no sync), so the step's
    check of the sums sees it even if the projection would hide it; the built-in projections
    carry it into the sums themselves. With ``preserve_sparsity=True`` the piece is masked first
    (:mod:`lora_optim.sparsity`).
    """
    A, B = projection.step_factors(state, options)
    matrix = prepare_grad(grad, A.dtype, projection)
    mask = sparsity_mask(state, options)  # preserve_sparsity: G ⊙ M
    if mask is not None:
        matrix = mask_grad(matrix, mask)
    grad_A, grad_B = _fill_frozen(projection.project(matrix, A, B), A, B)
    if not projection.grad_nonfinite_propagates:
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
    steps: list[Tensor], hyper: AdamHyper, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:
    """One AdamW step on lists of one device and dtype, in place; ``steps`` (aligned with
    ``params``, already counting this step) are read, not changed.

    ``torch._fused_adamw_`` where the device has it (the kernel of
    ``torch.optim.AdamW(fused=True)``, so results agree with it bit for bit), else the same math
    in ``torch._foreach_*`` ops with the bias corrections formed on the device (no host sync).
    ``grad_scale`` (a ``GradScaler``'s scale) is divided out of ``grads`` first. ``found_inf``
    (a 0-dim float32 tensor, ``1.0`` or ``0.0``): where it is ``1.0`` nothing changes at all
    (the fused kernel returns at once; the foreach path keeps the old values with ``where``).

    The fused CPU kernel walks every tensor as contiguous memory, whatever its strides (a
    transposed gradient is read in the wrong order), so non-contiguous gradients are made
    contiguous first, and lists with a non-contiguous parameter or moment take the foreach path.
    """
    if not params:
        return
    if torch.compiler.is_compiling():
        # Dynamo does not trace the fused kernels (torch.optim's fused AdamW runs outside the graph
        # there); the same math in plain ops is what inductor fuses, one kernel per tensor.
        _traced_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, grad_scale, found_inf)
        return
    lr = hyper.lr
    if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != params[0].device:
        lr = lr.to(params[0].device)  # a CPU lr is read by the kernels themselves
    grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
    contiguous = all(t.is_contiguous() for tensors in (params, exp_avgs, exp_avg_sqs) for t in tensors)
    if params[0].device.type in FUSED_DEVICE_TYPES and contiguous:
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=hyper.beta1, beta2=hyper.beta2,
            weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=False, grad_scale=grad_scale,
            found_inf=found_inf,
        )
        return
    if found_inf is None:
        foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, lr, grad_scale)
        return
    targets = [*params, *exp_avgs, *exp_avg_sqs]
    old = [t.clone() for t in targets]
    grads = [g.clone() for g in grads] if grad_scale is not None else grads  # foreach divides them in place
    foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, lr, grad_scale)
    skip = found_inf.to(device=params[0].device) != 0
    for target, before in zip(targets, old):
        target.copy_(torch.where(skip, before, target))


def _traced_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper: AdamHyper, grad_scale, found_inf) -> None:
    """:func:`adamw_` in plain tensor ops, for a compiled step: per tensor ``m ← lerp(m, g, 1−β1)``,
    ``v ← β2·v + (1−β2)·g²``, ``X ← X(1 − ηλ) − η/(1−β1^t)·m / (√v/√(1−β2^t) + ε)`` (bias
    corrections in float64, as the fused kernels), each written back with ``torch.where`` where
    ``found_inf`` is not set."""
    keep = None if found_inf is None else found_inf.reshape(()) != 0
    lr = hyper.lr
    if isinstance(lr, Tensor):
        lr = lr.to(torch.float64)  # as the fused kernels read it
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        wide = torch.promote_types(param.dtype, torch.float32)
        g = grad.to(wide)
        if grad_scale is not None:
            g = g / grad_scale.to(device=g.device, dtype=wide)
        m = torch.lerp(exp_avg.to(wide), g, 1 - hyper.beta1)
        v = exp_avg_sq.to(wide) * hyper.beta2 + (1 - hyper.beta2) * g * g
        t = step.to(device=param.device, dtype=torch.float64)
        correction1 = 1 - torch.pow(hyper.beta1, t)
        correction2 = (1 - torch.pow(hyper.beta2, t)).sqrt()
        step_size = (lr / correction1).to(wide)
        denominator = v.sqrt() / correction2.to(wide) + hyper.eps
        decay = 1 - lr * hyper.weight_decay  # float64, as the fused kernels
        decay = decay.to(wide) if isinstance(decay, Tensor) else decay
        decayed = param.to(wide) * decay if hyper.weight_decay != 0 else param.to(wide)
        updated = decayed - step_size * m / denominator
        for target, value in ((param, updated), (exp_avg, m), (exp_avg_sq, v)):
            value = value.to(target.dtype)
            target.copy_(value if keep is None else torch.where(keep, target, value))


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


@dataclass
class _Flags:
    """A batch's outcome on the device: per parameter (0-dim views of one vector each)."""

    grad_ok: list[Tensor]
    state_ok: list[Tensor]
    taken: list[Tensor]  # bool
    taken_float: list[Tensor]  # float32, for the step counts
    skip_float: list[Tensor]  # float32 1.0 / 0.0: the fused kernels' found_inf
    counted: list[Tensor]  # int64: a skip of the parameter's own
    vectors: tuple[Tensor, Tensor, Tensor]  # grad_ok, state_ok, counted (for one host read)


def _flags(rows: list[tuple[list[Tensor | None], list[Tensor | None]]], groups: list[Any], device: torch.device,
           scaler_bad: Tensor | None) -> _Flags:
    """Finite flags of one batch (one table, :func:`~lora_optim.nonfinite.finite_table`), combined
    over the ranks of any process group and with a ``GradScaler``'s verdict; no host read."""
    table = finite_table([grad + [None] * (_GRAD_WIDTH - len(grad)) + state for grad, state in rows],
                         _GRAD_WIDTH + _STATE_WIDTH, device)
    grad_ok = table[:, :_GRAD_WIDTH].all(dim=1)
    state_ok = table[:, _GRAD_WIDTH:].all(dim=1)
    for group in dict.fromkeys(g for g in groups if g is not None):
        # A NaN on any rank is a NaN on every rank: one small all-reduce of the bad flags.
        bad = torch.stack((~grad_ok, ~state_ok)).to(torch.float32)
        torch.distributed.all_reduce(bad, group=group)
        grad_ok, state_ok = bad[0] == 0, bad[1] == 0
    own = grad_ok & state_ok
    taken = own if scaler_bad is None else own & ~scaler_bad
    counted = ~own if scaler_bad is None else ~own & ~scaler_bad
    counted = counted.to(torch.int64)
    return _Flags(
        grad_ok=list(grad_ok.unbind()), state_ok=list(state_ok.unbind()), taken=list(taken.unbind()),
        taken_float=list(taken.to(torch.float32).unbind()), skip_float=list((~taken).to(torch.float32).unbind()),
        counted=list(counted.unbind()), vectors=(grad_ok, state_ok, counted),
    )


def _read_on_host(flags: list[_Flags], scaler_bad: Tensor | None) -> tuple[list[list[tuple[bool, bool, int]]], bool]:
    """The flags of every batch as Python values: one host read per device."""
    per_device: dict[torch.device, list[Tensor]] = {}
    for batch_flags in flags:
        grad_ok, state_ok, counted = batch_flags.vectors
        per_device.setdefault(grad_ok.device, []).append(
            torch.stack((grad_ok.to(torch.int64), state_ok.to(torch.int64), counted), dim=1))
    if scaler_bad is not None:
        per_device.setdefault(scaler_bad.device, []).append(scaler_bad.to(torch.int64).reshape(1, 1).expand(1, 3))
    read: dict[torch.device, list] = {}
    for device, tables in per_device.items():
        # One device-to-host copy per device (a copy even on the CPU, so that a TorchDispatchMode
        # counting syncs sees it).
        read[device] = torch.cat(tables).to("cpu", copy=True).tolist()
    answers: list[list[tuple[bool, bool, int]]] = []
    offsets = {device: 0 for device in read}
    for batch_flags in flags:
        device = batch_flags.vectors[0].device
        count = batch_flags.vectors[0].shape[0]
        rows = read[device][offsets[device]:offsets[device] + count]
        offsets[device] += count
        answers.append([(bool(g), bool(s), int(c)) for g, s, c in rows])
    scaler = bool(read[scaler_bad.device][offsets[scaler_bad.device]][0]) if scaler_bad is not None else False
    return answers, scaler


def step_(
    dense: Sequence[DenseBatch],
    lowrank: Sequence[LowRankBatch],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    read_flags: bool = False,
) -> StepReport:
    """One step of every batch (see the module docstring); returns what was decided.

    No host read unless a parameter has ``nonfinite="raise"``, a projection decides this step's
    commit on the host (:meth:`Projection.host_decides`), or ``read_flags`` is true: then one
    read, before anything has changed, and :class:`~lora_optim.nonfinite.NonFiniteGradientError`
    names every offending parameter of a ``"raise"`` group. ``grad_scale`` and ``found_inf`` are a
    ``GradScaler``'s (its optimizer contract): gradients are divided by ``grad_scale`` inside the
    Adam kernels, and a non-zero ``found_inf`` skips every parameter (on the device, not counted
    as a NaN skip of ours).
    """
    for batch in lowrank:
        projection = batch.projection
        for item in batch.items:
            item.host_decided = projection.host_decides(item.state, batch.options)
            if item.sums is not None:
                item.factors = projection.step_factors(item.state, batch.options)
                item.factor_grads = item.sums
                continue
            item.grad = prepare_grad(item.grad, item.state[MOMENT_KEYS["A"][0]].dtype, projection)
            mask = sparsity_mask(item.state, batch.options)  # preserve_sparsity: G ⊙ M
            if mask is not None:
                item.grad = mask_grad(item.grad, mask)
            item.screen_grad = (not projection.grad_nonfinite_propagates
                                or projection.reads_grad_raw(item.state, batch.options))
            A, B = projection.step_factors(item.state, batch.options, item.grad)
            item.factors = (A, B)
            if item.group is None:
                item.factor_grads = projection.project(item.grad, A, B)
            else:
                item.factor_grads = projection.project(item.grad, A, B, row_offset=item.row_offset)
    _sum_partial_grads_(lowrank)

    scaler_bad = None
    if isinstance(found_inf, Tensor):
        scaler_bad = found_inf.reshape(()) != 0
    dense_flags = [_dense_flags(batch, scaler_bad) for batch in dense]
    lowrank_flags = [_lowrank_flags(batch, scaler_bad) for batch in lowrank]
    report = StepReport()
    read = read_flags or any(policy == "raise" for batch in dense for policy in batch.policies) or any(
        item.policy == "raise" or item.host_decided for batch in lowrank for item in batch.items)
    host: list[list[tuple[bool, bool, int]]] | None = None
    if read:
        host, report.scaler_skipped = _read_on_host(dense_flags + lowrank_flags, scaler_bad)
        report.host_read = True
        dense_host, lowrank_host = host[:len(dense)], host[len(dense):]
        refused = [name for batch, answers in zip(dense, dense_host) for name, policy, (g, s, _) in
                   zip(batch.names, batch.policies, answers) if policy == "raise" and not (g and s)]
        refused += [item.name for batch, answers in zip(lowrank, lowrank_host) for item, (g, s, _) in
                    zip(batch.items, answers) if item.policy == "raise" and not (g and s)]
        if refused:
            raise NonFiniteGradientError(
                f"non-finite gradient or optimizer state (NaN or Inf) in {', '.join(refused)} with nonfinite='raise'; "
                "nothing was changed"
            )

    prepared: list[_Prepared] = []
    for index, (batch, flags) in enumerate(zip(dense, dense_flags)):
        answers = host[index] if host is not None else None
        report.records += _records(batch.names, batch.states, flags, answers)
        prepared.append(_prepare_dense(batch, flags))
    for index, (batch, flags) in enumerate(zip(lowrank, lowrank_flags)):
        answers = host[len(dense) + index] if host is not None else None
        report.records += _records([item.name for item in batch.items], [item.state for item in batch.items], flags,
                                   answers)
        taken_host = None if answers is None else [g and s and not report.scaler_skipped for g, s, _ in answers]
        prepared.append(_prepare_lowrank(batch, flags, taken_host))
    coefficients: list[Tensor | None] = [None] * len(prepared)
    if any(plan.max_grad_norm is not None for plan in prepared):
        coefficients = clip_coefficients(
            [(plan.max_grad_norm, [grad for call in plan.calls for grad in call.grads]) for plan in prepared],
            grad_scale,
            [[taken for call in plan.calls for taken in call.grad_taken] for plan in prepared],
        )
    for plan, coefficient in zip(prepared, coefficients):
        grads = [grad for call in plan.calls for grad in call.grads]
        if coefficient is not None and grads:
            torch._foreach_mul_(grads, coefficient)
        for call in plan.calls:
            adamw_(call.params, call.grads, call.exp_avgs, call.exp_avg_sqs, call.steps, call.hyper, grad_scale,
                   call.skip)
        if plan.finish is not None:
            plan.finish()
    counts = [record.state[NONFINITE_SKIPS] for record in report.records]
    if counts:
        torch._foreach_add_(counts, [record.counted for record in report.records])
    return report


def _records(names: list[str], states: list[dict[str, Any]], flags: _Flags,
             answers: list[tuple[bool, bool, int]] | None) -> list[SkipRecord]:
    return [SkipRecord(name, state, grad_ok, state_ok, counted, None if answers is None else answers[index])
            for index, (name, state, grad_ok, state_ok, counted) in
            enumerate(zip(names, states, flags.grad_ok, flags.state_ok, flags.counted))]


def _dense_flags(batch: DenseBatch, scaler_bad: Tensor | None) -> _Flags:
    device = batch.params[0].device
    rows = [([grad], []) for grad in batch.grads]
    return _flags(rows, batch.groups or [None] * len(rows), device, None if scaler_bad is None
                  else scaler_bad.to(device))


def _lowrank_flags(batch: LowRankBatch, scaler_bad: Tensor | None) -> _Flags:
    rows = []
    for item in batch.items:
        grads = [*item.factor_grads, item.grad if item.screen_grad else None]
        state = [item.state[key] for keys in MOMENT_KEYS.values() for key in keys] + list(item.factors)
        rows.append((grads, state))
    device = batch.items[0].state[MOMENT_KEYS["A"][0]].device
    return _flags(rows, [item.group for item in batch.items], device,
                  None if scaler_bad is None else scaler_bad.to(device))


def clip_coefficients(
    batches: Sequence[tuple[float | None, Sequence[Tensor]]], grad_scale: Tensor | None = None,
    taken: Sequence[Sequence[Tensor]] | None = None,
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
    its gradients; no host sync). Batches without ``max_grad_norm`` get ``None``. ``taken`` (per
    batch, a 0-dim bool per gradient) leaves out the gradients of parameters this step skips
    (their norm may be NaN). With one ``max_grad_norm`` for all groups this is
    ``clip_grad_norm_(params, max_grad_norm)`` on the gradients graph LoRA sees (its
    ``lora_A``/``lora_B`` gradients), not on ``G``.
    """
    clipped = [(grads, taken[index] if taken is not None else None)
               for index, (max_norm, grads) in enumerate(batches) if max_norm is not None]
    if not clipped:
        return [None] * len(batches)
    norms: list[Tensor] = []
    for grads, kept in clipped:
        if not grads:
            continue
        device = grads[0].device
        batch_norms = torch.stack([norm.to(device) for norm in torch._foreach_norm(list(grads), 2.0)])
        if kept is not None:
            batch_norms = torch.where(torch.stack(list(kept)).to(device), batch_norms, 0.0)
        norms.append(batch_norms)
    if not norms:
        return [None] * len(batches)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.cat([norm.to(device) for norm in norms]), 2.0)
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
    """The arguments of one :func:`adamw_` call: one parameter (its trained factors, or a dense
    tensor), ``skip`` its ``found_inf``, ``grad_taken`` its ``taken`` flag once per gradient."""

    hyper: AdamHyper
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    skip: Tensor | None = None
    grad_taken: list[Tensor] = field(default_factory=list)


@dataclass
class _Prepared:
    """A batch ready to step: its Adam calls, its clip setting, and what runs after the calls."""

    max_grad_norm: float | None
    calls: list[_AdamCall]
    finish: Any = None  # a callable, or None


def _prepare_dense(batch: DenseBatch, flags: _Flags) -> _Prepared:
    if not batch.params:
        return _Prepared(batch.max_grad_norm, [])
    steps = [state[STEP] for state in batch.states]
    torch._foreach_add_(steps, flags.taken_float)
    calls = [
        _AdamCall(batch.hyper, [param], [grad], [state[EXP_AVG]], [state[EXP_AVG_SQ]], [state[STEP]], skip, [taken])
        for param, grad, state, skip, taken in zip(batch.params, batch.grads, batch.states, flags.skip_float,
                                                   flags.taken)
    ]
    return _Prepared(batch.max_grad_norm, calls)


def _prepare_lowrank(batch: LowRankBatch, flags: _Flags, taken_host: list[bool] | None) -> _Prepared:
    """Commit the step (:meth:`Projection.begin_step`: with ``taken`` on the device, or, for a
    parameter decided on the host, only when ``taken_host`` says it is taken), count it, scale
    the factor gradients, and one Adam call per parameter."""
    if not batch.items:
        return _Prepared(batch.max_grad_norm, [])
    projection = batch.projection
    # The trained factors of every item, with their gradients and moments, as flat lists.
    factors: list[Tensor] = []
    grads: list[Tensor] = []
    owners: list[int] = []  # per factor: its item's index
    firsts: list[bool] = []  # per factor: whether it is A
    moments: list[tuple[Tensor, Tensor]] = []
    positions: list[tuple[int | None, int | None]] = []  # per item: where A and B are in `factors`
    for index, item in enumerate(batch.items):
        trains = projection.trained_factors(item.state, batch.options)
        if not item.host_decided:
            item.factors = projection.begin_step(item.state, batch.options, *item.factors, taken=flags.taken[index])
        elif taken_host[index]:
            item.factors = projection.begin_step(item.state, batch.options, *item.factors)
        A, B = item.factors
        where: list[int | None] = []
        for factor, grad, trained, keys, first in zip(
            (A, B), item.factor_grads, trains, (MOMENT_KEYS["A"], MOMENT_KEYS["B"]), (True, False)
        ):
            if not trained:
                where.append(None)
                continue
            where.append(len(factors))
            factors.append(factor)
            grads.append(grad)
            owners.append(index)
            firsts.append(first)
            moments.append((item.state[keys[0]], item.state[keys[1]]))
        positions.append((where[0], where[1]))
    torch._foreach_add_([item.state[STEP] for item in batch.items], flags.taken_float)
    if not factors:
        return _Prepared(batch.max_grad_norm, [], lambda: _write_lowrank_(batch, flags, positions, [], []))
    if batch.scale != 1.0:
        torch._foreach_mul_(grads, batch.scale)
    before = torch._foreach_mul(factors, 1.0)  # exact copies (−0.0 stays −0.0)
    calls: list[_AdamCall] = []
    for index, item in enumerate(batch.items):
        chosen = [i for i, owner in enumerate(owners) if owner == index]
        if batch.lr_ratio_A != 1.0:  # LoRA+: A (PEFT's lora_B) at lr × ratio, B at lr; two fused calls
            parts = [([i for i in chosen if firsts[i]], replace(batch.hyper, lr=batch.hyper.lr * batch.lr_ratio_A)),
                     ([i for i in chosen if not firsts[i]], batch.hyper)]
        else:
            parts = [(chosen, batch.hyper)]
        for part, hyper in parts:
            if part:
                calls.append(_AdamCall(
                    hyper, [factors[i] for i in part], [grads[i] for i in part], [moments[i][0] for i in part],
                    [moments[i][1] for i in part], [item.state[STEP]] * len(part), flags.skip_float[index],
                    [flags.taken[index]] * len(part)))

    def finish() -> None:
        # The steps the stored factors really took, so that W follows s·(Δ(A_t, B_t) − Δ(A_0, B_0))
        # of the stored factors to the rounding of one step (zero for a skipped parameter).
        _write_lowrank_(batch, flags, positions, before, torch._foreach_sub(factors, before))

    return _Prepared(batch.max_grad_norm, calls, finish)


def _write_lowrank_(batch: LowRankBatch, flags: _Flags, positions: list[tuple[int | None, int | None]],
                    before: list[Tensor], deltas: list[Tensor]) -> None:
    projection = batch.projection
    # The divergence guard, on the device: a skipped parameter records no step size (masked with
    # its `taken` flag, no host read).
    guarded = [index for index, item in enumerate(batch.items) if STEP_SIZE_REFERENCE in item.state]
    record_step_sizes_(batch.scale, [batch.items[i].state for i in guarded], [batch.items[i].factors for i in guarded],
                       [tuple(None if j is None else deltas[j] for j in positions[i]) for i in guarded],
                       [flags.taken[i] for i in guarded])
    for index, (item, (index_A, index_B)) in enumerate(zip(batch.items, positions)):
        A, B = item.factors
        old_A, step_A = (A, torch.zeros_like(A)) if index_A is None else (before[index_A], deltas[index_A])
        old_B, step_B = (B, torch.zeros_like(B)) if index_B is None else (before[index_B], deltas[index_B])
        change = FactorChange(old_A, old_B, A, B, step_A, step_B, item.row_offset)
        mask = sparsity_mask(item.state, batch.options)  # preserve_sparsity: (s·ΔW) ⊙ M
        if DRIFT_CHANGE in item.state:
            record_drift_step_(item.state, projection, change, batch.scale, mask)
        delta = weight_delta(projection, change, batch.scale, mask)
        if item.param.ndim == 2:
            item.writer.write_(item.param, item.state, delta, taken=flags.taken[index])
            continue
        with writable_matrix(item.param) as weight:
            item.writer.write_(weight, item.state, delta, taken=flags.taken[index])
