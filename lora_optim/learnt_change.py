"""``W − W_base``: the change a run made to one weight, in one place.

The optimizer only ever adds changes of the factors to ``W`` (:mod:`lora_optim.engine`), each one
masked in a ``preserve_sparsity=True`` group (:mod:`lora_optim.sparsity`), so at every step

.. math::

    W = W_{\\text{base}} + \\big(s\\,(\\Delta(A, B) - \\Delta(A_0, B_0))\\big) \\odot M,

with ``W_base`` and ``(A₀, B₀)`` as recorded by :mod:`lora_optim.initial_factors` and ``M`` the
stored mask (all ones without ``preserve_sparsity``). Every consumer of "the change this
optimizer made to ``W``" asks :meth:`LoRAAdam.learnt_change <lora_optim.LoRAAdam.learnt_change>`
for a :class:`LearntChange`, which says, per parameter:

* ``factors``: ``(L, R)`` with ``s·(Δ(A, B) − Δ(A₀, B₀)) = s·L·R``
  (:meth:`Projection.change_factors <lora_optim.projections.Projection.change_factors>`), or
  ``None`` when that is unknown (``random`` and ``svd``, whose change sums every draw or basis; a
  non-zero ``A₀·B₀`` that was not kept, once ``W`` has moved);
* ``mask``: the packed ``M`` of a ``preserve_sparsity=True`` group, or ``None`` when there is no
  mask or ``W_base`` had no zero (``M = 1``);
* ``initial``: ``(A₀, B₀)``, to move the factors back to (unmerge), or ``None``.

So the change is **exactly low rank** (``s·L·R``, an exact adapter of rank ``k = L.shape[1]``)
when it is known and unmasked (:attr:`LearntChange.low_rank`); **known but dense** when masked,
``(s·L·R) ⊙ M``, which an adapter can only approximate (a truncated SVD of
:meth:`LearntChange.masked_product`, no base weights needed); and **unknown** otherwise: only
``W − W₀`` from the base weights tells it.

The writes that move ``W`` to a chosen change go through the same record: :meth:`LoRAAdam.set_factors
<lora_optim.LoRAAdam.set_factors>` with ``update_weight=True`` (unmerge) and
:meth:`LoRAAdam.merge_factors <lora_optim.LoRAAdam.merge_factors>` (an adapter's load, task
switching) write masked changes (:func:`lora_optim.weight_change.weight_delta`) and record them in
the drift probes (:func:`lora_optim.drift.record_drift_step_`) as a step does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_optim.projections.base import FactorState, Projection
from lora_optim.sparsity import sparsity_mask, unpack_mask
from lora_optim.state_keys import EXP_AVG_B

__all__ = ["LearntChange", "learnt_change_of", "masked_share"]


@dataclass(frozen=True)
class LearntChange:
    """``W − W_base = (s·L·R) ⊙ M`` of one low-rank parameter (module docstring).

    Attributes:
        scale: the group's ``s`` (:meth:`~lora_optim.LoRAAdam.factor_scale`).
        factors: ``(L, R)`` (``out×k``, ``k×in``, the factors' dtype), or ``None`` when the change
            is unknown.
        mask: the packed mask ``M`` (uint8 ``out×⌈in/8⌉``, :func:`~lora_optim.sparsity.pack_mask`),
            or ``None`` (no ``preserve_sparsity``, or no zero in ``W_base``).
        initial: ``(A₀, B₀)`` with ``set_factors(p, A₀, B₀, update_weight=True)`` giving back
            ``W_base``, or ``None`` when unknown.
        unknown: why the change is unknown (the projection, its ``init`` and
            ``keep_initial_factors``), for error messages; ``""`` when it is known.
    """

    scale: float
    factors: tuple[Tensor, Tensor] | None
    mask: Tensor | None
    initial: tuple[Tensor, Tensor] | None
    unknown: str = ""

    @property
    def known(self) -> bool:
        """Whether the change is known from the optimizer state alone (no base weights)."""
        return self.factors is not None

    @property
    def low_rank(self) -> bool:
        """Whether the change is exactly ``s·L·R``: known and not masked."""
        return self.factors is not None and self.mask is None

    def masked_product(self) -> Tensor:
        """``(L·R) ⊙ M``, the change divided by ``s``, formed in full (``out×in``, the factors'
        dtype). ``ValueError`` when the change is unknown."""
        if self.factors is None:
            raise ValueError(f"the change is not known from the optimizer state: {self.unknown}")
        L, R = self.factors
        product = L @ R
        if self.mask is not None:
            product.mul_(unpack_mask(self.mask, product.shape[1]))
        return product


def learnt_change_of(projection: Projection, state: FactorState, group: Mapping[str, Any], scale: float) -> LearntChange:
    """The :class:`LearntChange` of a low-rank parameter with ``state`` in ``group`` (``scale`` its
    ``s``), from the projection's record of the base (:mod:`lora_optim.initial_factors`). Reads the
    mask and the step count once on the host; forms nothing ``out×in``."""
    factors = projection.change_factors(state, group)
    initial = projection.initial_factors(state, group)
    mask = sparsity_mask(state, group)
    if mask is not None and bool(unpack_mask(mask, state[EXP_AVG_B].shape[1]).all()):
        mask = None  # no zero to keep: the change is s·L·R exactly
    unknown = ""
    if factors is None:
        init = f", init={group['init']!r}" if "init" in group else ""
        unknown = (
            f"projection={group['projection']!r}{init}, keep_initial_factors={group.get('keep_initial_factors', False)}"
            ": the change is not a function of the current factors (projections 'random' and 'svd' sum it over every"
            " draw or basis), or the initial factors have a non-zero product that was not kept and W has moved since"
            " (construct the optimizer with keep_initial_factors=True)"
        )
    return LearntChange(scale, factors, mask, initial, unknown)


def masked_share(L: Tensor, R: Tensor, mask: Tensor | None) -> float:
    """``‖(L·R) ⊙ M‖_F² / ‖L·R‖_F²``: the share of a change ``s·L·R`` that a ``preserve_sparsity``
    group's mask (packed) keeps, in fp64 (``1.0`` without a mask or for a zero change)."""
    if mask is None:
        return 1.0
    product = L.to(torch.float64) @ R.to(torch.float64)
    total = float(product.square().sum())
    if total == 0.0:
        return 1.0
    kept = float(product.mul_(unpack_mask(mask.to(product.device), product.shape[1])).square().sum())
    return min(1.0, kept / total)
