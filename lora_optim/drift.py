"""An opt-in check that ``W`` really moved by what the optimizer stepped.

With ``drift_probes=k`` (a group option, ``0`` = off and free), each low-rank parameter keeps
``k`` Rademacher probe vectors ``X`` (``in×k``, ±1 entries), the probe of the initial weight
``W₀X`` and the running sum of the *exact* (fp64) change of the probe,

.. math::

    C_t = \\sum_{\\tau \\le t} s\\,\\big(\\Delta(A_{\\tau+1}, B_{\\tau+1}) - \\Delta(A_\\tau, B_\\tau)\\big)\\,X,

one term per step, computed by the projection's :meth:`~lora_optim.projections.Projection.probe_delta`
from the factors as they are stored. For ``lora`` this telescopes to
``s·(A_t B_t − A_0 B_0)·X``; for ``random`` it is the sum over draws; for ``additive`` the
additive formula. The expected weight seen through the probes is ``E_t = W₀X + C_t`` and

* ``relative_to_weight = ‖W_t X − E_t‖ / ‖E_t‖``: how far ``W`` has drifted from where the
  steps put it (rounding in ``W``'s dtype, or changes made to ``W`` outside the optimizer);
* ``relative_to_change = ‖(W_t − W₀)X − C_t‖ / ‖C_t‖``: the share of the intended change that
  is missing or spurious (about 0.66 for bf16 ``nearest`` at lr 1e-3, see the docs);
* ``largest_step``: the divergence guard's largest ``s·‖ΔW‖/‖W₀‖`` of one step
  (:mod:`lora_optim.divergence`), recorded without the probes.

Cost per parameter: state ``k·(in + 2·out)`` fp64 numbers; per step, for ``lora``/``random``
four products of inner size ``r`` with ``k`` columns (``additive``: two), in fp64; a report
reads ``W`` once (in row chunks, no full-size copy).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from lora_optim.projections.base import FactorChange, Projection
from lora_optim.seeding import derive_seed, seeded_generator
from lora_optim.sparsity import masked_probe_delta
from lora_optim.state_keys import DRIFT_CHANGE, DRIFT_KEYS, DRIFT_PROBES, DRIFT_REFERENCE, STEP_SIZE_LARGEST

__all__ = ["DRIFT_KEYS", "DriftReport", "init_drift_state", "record_drift_step_", "measure_drift", "probe_weight"]

_PROBE_STREAM = 0x4452  # "DR": separates the probes from the factor draws of the parameter
_CHUNK_ELEMENTS = 1 << 20


class DriftReport(NamedTuple):
    """Drift of one parameter, seen through its probe vectors (see the module docstring)."""

    #: ``‖W X − (W₀X + C)‖ / ‖W₀X + C‖``.
    relative_to_weight: float
    #: ``‖(W − W₀)X − C‖ / ‖C‖`` (``0.0`` if both are zero, ``inf`` if only ``C`` is).
    relative_to_change: float
    #: ``‖C‖``: the size of the intended change seen through the probes.
    change_norm: float
    #: The divergence guard's largest relative step so far, ``s·‖ΔW‖/‖W₀‖`` of one step
    #: (:mod:`lora_optim.divergence`); ``nan`` when the group has ``divergence_threshold=None``.
    largest_step: float = float("nan")


def probe_weight(weight: Tensor, probes: Tensor) -> Tensor:
    """``W·X`` in fp64 for a matrix ``W`` of any float dtype, in row chunks (no fp64 copy of ``W``)."""
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return torch.cat([
        weight[start:start + rows_per_chunk].to(torch.float64) @ probes
        for start in range(0, weight.shape[0], rows_per_chunk)
    ]) if weight.shape[0] else probes.new_zeros(0, probes.shape[1])


def init_drift_state(weight: Tensor, count: int, seed: int) -> dict[str, Any]:
    """Probe state for the ``out×in`` matrix ``weight`` with ``count`` Rademacher probes drawn
    from the int ``seed`` (torch's global RNG is untouched)."""
    generator = seeded_generator(derive_seed(seed, _PROBE_STREAM), weight.device)
    signs = torch.randint(0, 2, (weight.shape[1], count), generator=generator, device=weight.device)
    probes = signs.to(torch.float64).mul_(2).sub_(1)
    return {
        DRIFT_PROBES: probes,
        DRIFT_REFERENCE: probe_weight(weight, probes),
        DRIFT_CHANGE: torch.zeros(weight.shape[0], count, dtype=torch.float64, device=weight.device),
    }


def record_drift_step_(state: dict[str, Any], projection: Projection, change: FactorChange, scale: float,
                       mask: Tensor | None = None) -> None:
    """Add this step's exact change of the probes to ``drift_change``: ``projection.probe_delta(...)``,
    or with the packed sparsity ``mask`` of a ``preserve_sparsity=True`` group the masked change
    (:func:`lora_optim.sparsity.masked_probe_delta`)."""
    if mask is None:
        state[DRIFT_CHANGE].add_(projection.probe_delta(change, scale, state[DRIFT_PROBES]))
    else:
        state[DRIFT_CHANGE].add_(masked_probe_delta(projection, change, scale, state[DRIFT_PROBES], mask))


def measure_drift(weight: Tensor, state: dict[str, Any]) -> DriftReport:
    """:class:`DriftReport` of the matrix ``weight`` against its probe state."""
    observed = probe_weight(weight, state[DRIFT_PROBES])
    reference, change = state[DRIFT_REFERENCE], state[DRIFT_CHANGE]
    expected = reference + change
    error = torch.linalg.norm(observed - expected).item()
    change_norm = torch.linalg.norm(change).item()
    observed_change_error = torch.linalg.norm((observed - reference) - change).item()
    return DriftReport(
        relative_to_weight=_ratio(error, torch.linalg.norm(expected).item()),
        relative_to_change=_ratio(observed_change_error, change_norm),
        change_norm=change_norm,
        largest_step=float(state[STEP_SIZE_LARGEST]) ** 0.5 if STEP_SIZE_LARGEST in state else float("nan"),
    )


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else float("inf")
