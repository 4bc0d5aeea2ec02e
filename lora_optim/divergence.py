"""The divergence guard: a warning when a step moves a weight far more than training does.

A run whose learning rate is too large for its projection (``additive`` at lr 1e-3, alpha 16)
does not produce a NaN: every step moves every entry of ``W`` by a bounded amount, the loss
climbs to chance level and stays there, silently. What gives it away early is the size of the
steps relative to the weight. For every low-rank matrix and step the guard records

.. math::

    \\rho_t = \\frac{s\\,\\lVert \\Delta_t \\rVert_F}{\\lVert W_0 \\rVert_F}, \\qquad
    \\lVert \\Delta_t \\rVert_F^2 \\approx \\lVert dA \\rVert^2 (a_0 + a_1 \\lVert B' \\rVert^2)
    + \\lVert dB \\rVert^2 (b_0 + b_1 \\lVert A' \\rVert^2),

``Δ_t = Δ(A', B') − Δ(A, B)`` the step's change of the parametrisation, estimated from the
squared norms of the factor steps and factors with the projection's coefficients
(:meth:`Projection.step_size_coefficients <lora_optim.projections.Projection.step_size_coefficients>`:
``(0, 1/r, 0, 1/r)`` for the product ``A·B`` of ``lora``, ``random`` and ``svd``,
``(in/r, 0, out/r, 0)`` for ``additive``), and ``W₀`` the weight when its state was made. The
estimate leaves out a cross term; ``tests/test_divergence.py`` checks it against the exact
``‖W_t − W_{t−1}‖/‖W₀‖`` (within a factor of 1.5 on random instances, exact for ``additive``
when the cross term vanishes).

Cost: on the device, per batch of matrices (a param group on one device), two ``_foreach_norm``
calls, a few vector ops and one ``_foreach_maximum_``: a fixed handful of ops whatever the
number of matrices (fourteen kernel launches, three of them the mask of skipped steps), and
**no host read**. The state keeps three small tensors per matrix
(:data:`~lora_optim.state_keys.STEP_SIZE_KEYS`): the reference ``(a₀, b₀, a₁, b₁)/‖W₀‖²``, and
the largest ``ρ²`` so far and the latest (squares: no root on the device).

A step is decided on the device (:mod:`lora_optim.engine`): a matrix that skips the step (a
NaN/Inf of its own, a ``GradScaler``'s ``found_inf``) is masked with its ``taken`` flag by
``torch.where`` on the device: a matrix that skips a step records nothing (its
guard values stay exactly as they were, as all of its state does), and a NaN in its factors never
reaches the guard.

On row-sharded weights (FSDP2's ``fully_shard``) each rank guards its own rows: its reference
is that of its rows of ``W₀`` and its ``ρ`` that of its rows of the step, so the guard's values
(not the training) differ between ranks, and a rank warns for its own rows; guarding the
whole weight would need an all-reduce of the norms per step.

**No host sync in any step.** :class:`~lora_optim.LoRAAdam` checks after steps 1, 2, 4, 8, …,
512 and then every 512 steps (eleven checks in the first 1000 steps), without waiting for the
device: where the values live on the CPU it reads them from memory at once; on CUDA it copies
them into pinned host memory with ``non_blocking=True``, records an event, and warns at a later
``step()`` once the event has completed (:func:`start_step_size_read`,
:meth:`PendingStepSizes.finish`, which asks ``event.query()`` and never waits). So a step with
``nonfinite="skip"`` keeps the zero-sync promise of :mod:`lora_optim.engine` at check steps too,
and the warning of a check comes a step or so later on an accelerator. The blocking read is
:func:`check_step_sizes`, one per device, made only when asked: by
:meth:`LoRAAdam.check_step_sizes <lora_optim.LoRAAdam.check_step_sizes>`,
``step_size_report()`` (one read per parameter), and ``state_dict()`` while a check is still on
its way to the host. Nothing of this runs inside a compiled step
(``torch.compiler.is_compiling()``) or a CUDA graph capture: a compiled training loop calls
``check_step_sizes()`` itself, outside the compiled function. On accelerators other than CUDA
only that explicit read checks. A matrix whose largest ``ρ`` exceeds its group's
``divergence_threshold`` gets one :class:`DivergenceWarning`. ``LoRAAdam.step_size_report()``
and the drift report (``DriftReport.largest_step``) show the values whatever the threshold.

The default threshold, ``0.01`` (:data:`DEFAULT_DIVERGENCE_THRESHOLD`), is a bound chosen from the
size of a step, not yet from a measured distribution: a fine-tuning step that moves a weight by 1%
of its norm moves it by its whole norm within a hundred steps. The distributions of ``ρ`` over
healthy and collapsing runs are to come from ``benchmarks/projection_study.py`` (issue 19).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lora_optim.kernels.paths import cpu_paths
from lora_optim.projections.base import Projection
from lora_optim.state_keys import STEP_SIZE_KEYS, STEP_SIZE_LARGEST, STEP_SIZE_LAST, STEP_SIZE_REFERENCE

__all__ = [
    "DEFAULT_DIVERGENCE_THRESHOLD",
    "DivergenceWarning",
    "StepSizeReport",
    "STEP_SIZE_KEYS",
    "init_step_size_state",
    "record_step_sizes_",
    "step_size_report",
    "check_step_sizes",
    "start_step_size_read",
    "PendingStepSizes",
    "is_check_step",
]

#: The default ``divergence_threshold``: a step that moves a weight by more than 1% of its norm
#: (a bound from the size of a step; the measured distributions are pending, see the module docstring).
DEFAULT_DIVERGENCE_THRESHOLD = 0.01

#: Host reads of the largest values come after these steps (then every 512 steps).
_CHECK_PERIOD = 512


class DivergenceWarning(UserWarning):
    """A step moved a weight by more than its group's ``divergence_threshold`` of its norm."""


class StepSizeReport(NamedTuple):
    """The relative step sizes of one low-rank matrix (see the module docstring)."""

    #: The largest ``ρ = s·‖ΔW‖/‖W₀‖`` of one step so far.
    largest: float
    #: ``ρ`` of the latest step taken (a skipped step records nothing).
    last: float
    #: The group's ``divergence_threshold`` (``None``: no warning).
    threshold: float | None


def init_step_size_state(weight: Tensor, projection: Projection, rank: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Guard state for the ``out×in`` matrix ``weight`` (one norm of it), in the factor ``dtype``: the
    reference ``(a₀, b₀, a₁, b₁)/‖W₀‖_F²`` and two zeros. A zero weight is taken as ``‖W₀‖ = 1``
    (the guard then measures the absolute ``s·‖ΔW‖``)."""
    out_features, in_features = weight.shape
    norm_sq = torch.linalg.vector_norm(weight, dtype=torch.promote_types(weight.dtype, dtype)).to(dtype).square()
    norm_sq = torch.where(norm_sq > 0, norm_sq, torch.ones_like(norm_sq))
    a0, a1, b0, b1 = projection.step_size_coefficients(out_features, in_features, rank)
    coefficients = torch.tensor((a0, b0, a1, b1), dtype=dtype, device=weight.device)
    zero = torch.zeros((), dtype=dtype, device=weight.device)
    return {STEP_SIZE_REFERENCE: coefficients / norm_sq, STEP_SIZE_LARGEST: zero, STEP_SIZE_LAST: zero.clone()}


def record_step_sizes_(
    scale: float,
    states: Sequence[dict[str, Any]],
    factors: Sequence[tuple[Tensor, Tensor]],
    steps: Sequence[tuple[Tensor | None, Tensor | None]],
    taken: Sequence[Tensor] | None = None,
) -> None:
    """Record ``ρ²`` of this step for a batch of matrices of one device (module docstring): a fixed
    handful of launching ops whatever the number of matrices, no host read.

    ``factors[i]`` is ``(A', B')`` of matrix ``i`` after the step, ``steps[i]`` its ``(dA, dB)``
    (``None`` for a factor that did not train), ``states[i]`` its state with the guard's keys.
    ``taken[i]`` (a 0-dim bool on the device, the engine's flag) says whether matrix ``i`` took
    the step: a skipped matrix records nothing (its latest and largest values stay exactly as they
    were, as all of a skipped parameter's state does), masked with ``torch.where`` on the device,
    so a NaN in the factors of a skipped step never reaches the guard's values.
    """
    if not states:
        return
    count = len(states)
    # Norms of (B', A') per matrix (swapped: each multiplies the other factor's step), then of (dA, dB).
    norms = list(torch._foreach_norm([t for A, B in factors for t in (B, A)]))
    trained = [t for pair in steps for t in pair if t is not None]
    step_norms = iter(torch._foreach_norm(trained) if trained else [])
    if len(trained) == 2 * count:
        norms += list(step_norms)
    else:  # a factor that did not train took no step
        zero = norms[0].new_zeros(())
        norms += [next(step_norms) if t is not None else zero for pair in steps for t in pair]
    squares = torch.stack(norms).square_().view(2, count, 2)
    reference = torch.stack([state[STEP_SIZE_REFERENCE] for state in states])  # (a0, b0, a1, b1) / ‖W0‖²
    weights = torch.addcmul(reference[:, :2], reference[:, 2:], squares[0])  # (a0 + a1‖B'‖², b0 + b1‖A'‖²)/‖W0‖²
    ratios = torch.bmm(squares[1].unsqueeze(1), weights.unsqueeze(2)).view(count).mul_(scale * scale)  # ρ²
    lasts = [state[STEP_SIZE_LAST] for state in states]
    if taken is not None:
        # A skipped step records nothing: its matrix keeps its latest value (which is at most its
        # largest, so the maximum below keeps that too). `where`: a NaN of the masked side does not leak.
        ratios = torch.where(torch.stack(list(taken)).to(ratios.device), ratios, torch.stack(lasts))
    ratios = ratios.unbind()
    torch._foreach_maximum_([state[STEP_SIZE_LARGEST] for state in states], ratios)
    torch._foreach_copy_(lasts, ratios)


def step_size_report(state: dict[str, Any], threshold: float | None) -> StepSizeReport:
    """:class:`StepSizeReport` of one matrix's state (one host read); zeros before its first step."""
    if STEP_SIZE_LARGEST not in state:
        return StepSizeReport(0.0, 0.0, threshold)
    values = torch.stack((state[STEP_SIZE_LARGEST], state[STEP_SIZE_LAST])).sqrt().to("cpu", copy=True).tolist()
    return StepSizeReport(values[0], values[1], threshold)


def is_check_step(count: int) -> bool:
    """Whether the guard reads the largest values after step ``count`` (1, 2, 4, …, 512, 1024, 1536, …)."""
    return count > 0 and (count & (count - 1) == 0 if count <= _CHECK_PERIOD else count % _CHECK_PERIOD == 0)


def _by_device(entries: Iterable[tuple[str, dict[str, Any], float]]) -> dict[torch.device, list[tuple[str, Tensor, float]]]:
    by_device: dict[torch.device, list[tuple[str, Tensor, float]]] = {}
    for name, state, threshold in entries:
        largest = state.get(STEP_SIZE_LARGEST)
        if largest is not None:
            by_device.setdefault(largest.device, []).append((name, largest, threshold))
    return by_device


def _warn_above(rows: Sequence[tuple[str, Tensor, float]], values: Sequence[float], warned: set[str],
                stacklevel: int = 4) -> list[str]:
    """Warn once per name for the values above their thresholds; the names above."""
    above = []
    for (name, _, threshold), value in zip(rows, values):
        if value > threshold:
            above.append(name)
            if name not in warned:
                warned.add(name)
                warnings.warn(
                    f"LoRAAdam: a step moved {name} by {value:.3g} of its norm (s·‖ΔW‖/‖W₀‖), above the "
                    f"divergence_threshold {threshold:g}. The learning rate "
                    "(or alpha) is likely too large for this projection, and the run may collapse to chance "
                    "without a NaN. See opt.step_size_report() and docs/choosing.md.",
                    DivergenceWarning, stacklevel=stacklevel,
                )
    return above


def check_step_sizes(entries: Iterable[tuple[str, dict[str, Any], float]], warned: set[str]) -> list[str]:
    """Warn (:class:`DivergenceWarning`) for every matrix whose largest ``ρ`` exceeds its threshold.

    ``entries`` holds ``(name, state, threshold)`` per matrix with a threshold; names in ``warned``
    are not warned again and new ones are added. One host read per device (a sync on an
    accelerator). Returns the names of the matrices above their threshold (warned now or before).
    """
    above = []
    for rows in _by_device(entries).values():
        # One device-to-host copy (a copy even on the CPU, so that a TorchDispatchMode counting syncs sees it).
        values = torch.stack([largest for _, largest, _ in rows]).sqrt().to("cpu", copy=True).tolist()
        above += _warn_above(rows, values, warned)
    return above


class PendingStepSizes:
    """A read of the largest values started after a check step, without a sync
    (:func:`start_step_size_read`): per device the matrices, a host tensor the values are copied
    into, and an event that says when the copy has landed (``None``: it has)."""

    def __init__(self) -> None:
        self.parts: list[tuple[list[tuple[str, Tensor, float]], Tensor, Any]] = []

    def finish(self, warned: set[str]) -> bool:
        """Warn (as :func:`check_step_sizes`) from every part whose copy has landed, without waiting
        (``event.query()``); whether nothing is left pending."""
        left = []
        for rows, host, event in self.parts:
            if event is not None and not event.query():
                left.append((rows, host, event))
                continue
            _warn_above(rows, host.tolist(), warned, stacklevel=5)  # host memory: no sync
        self.parts = left
        return not left


def start_step_size_read(entries: Iterable[tuple[str, dict[str, Any], float]]) -> PendingStepSizes:
    """Start reading the largest values of ``entries`` (as :func:`check_step_sizes`) without a host
    sync: values that live on the CPU are read from memory (:func:`PendingStepSizes.finish` warns at
    once); on CUDA they are copied into pinned host memory with ``non_blocking=True`` and an event
    is recorded after the copy (``finish`` warns once it has completed). On the CPU with the
    accelerator code paths (:func:`lora_optim.kernels.paths.accelerator_paths`) the copy is treated
    as on its way until the next ``finish``, as on CUDA. On other accelerators nothing is started
    (only :func:`check_step_sizes` reads there)."""
    pending = PendingStepSizes()
    for device, rows in _by_device(entries).items():
        values = torch.stack([largest for _, largest, _ in rows]).sqrt()
        if cpu_paths(device):
            pending.parts.append((rows, values, None))
        elif device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.parts.append((rows, host, event))
        elif device.type == "cpu":
            pending.parts.append((rows, values.clone(), _Landed()))
    return pending


class _Landed:
    """The event of a copy on the CPU with the accelerator code paths: not complete when first
    asked (right after the copy, as a CUDA copy would not be), complete afterwards."""

    def __init__(self) -> None:
        self._asked = False

    def query(self) -> bool:
        done, self._asked = self._asked, True
        return done
