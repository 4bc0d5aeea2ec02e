"""What a weight's base is: the record of the factors it excludes.

The engine only ever adds changes of the factors to ``W`` (:mod:`lora_optim.engine`), so at every
step

.. math::

    W = W_{\\text{base}} + s\\,\\big(\\Delta(A, B) - \\Delta(A_0, B_0)\\big),

where ``W_base`` is the weight when the factors were made (the parameter's first step) or last
replaced without moving ``W`` (:meth:`LoRAAdam.set_factors <lora_optim.LoRAAdam.set_factors>`),
and ``(A₀, B₀)`` are the factors at that moment. For the ``lora`` projection with PEFT's init,
``A₀ = 0``, so ``W − W_base = s·A·B`` exactly: a rank-``r`` adapter. With a non-zero ``A₀·B₀``
(``init="symmetric"``, PiSSA, ``set_factors`` with two non-zero factors),
``W − W_base = s·[A, −A₀]·[B; B₀]``: rank ``2r``, exact, if ``A₀`` and ``B₀`` are known. Exporting
the change as an adapter (:mod:`lora_optim.interop`) and unmerging it need that knowledge; this
module keeps it in the per-parameter state, as tensors and an int (so checkpoints still load with
``weights_only=True``):

* :data:`ZERO`: ``Δ(A₀, B₀) = 0`` (PEFT's init, ``additive``'s zeros); nothing else is kept;
* :data:`KEPT`: ``Δ(A₀, B₀) ≠ 0`` and copies of ``A₀``, ``B₀`` are kept, because the group has
  ``keep_initial_factors=True`` (``r·(out+in)`` more numbers per matrix: a third more state);
* :data:`AT_BASE`: ``Δ(A₀, B₀) ≠ 0`` and not kept, but ``W`` has not moved since the record
  (no step taken: the step count is still 0, and no :meth:`~lora_optim.LoRAAdam.set_factors`
  with ``update_weight=True``), so the factors as they stand are ``A₀``, ``B₀`` and
  ``W = W_base``. A fresh optimizer with ``init="symmetric"`` or PiSSA is in this state until its
  first step: loading an adapter into it is exact without the kept copies. The first step (or a
  moving :meth:`~lora_optim.LoRAAdam.set_factors`, :func:`moved_`) makes it unknown;
* no status: unknown (non-zero and not kept, or a checkpoint written before the record
  existed). Export then needs the base weights (:func:`lora_optim.interop.export_peft_adapter`'s
  ``base``), and unmerging and loading an adapter are refused.

The projections decide what "zero" means and call :func:`record_`; see
:meth:`Projection.record_base_ <lora_optim.projections.Projection.record_base_>`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lora_optim.state_keys import FACTOR_A, FACTOR_B, INITIAL_A, INITIAL_B, INITIAL_FACTORS, STEP

__all__ = ["ZERO", "KEPT", "AT_BASE", "record_", "moved_", "status", "kept_factors"]

#: Status: the initial factors' weight change is zero.
ZERO = 0
#: Status: copies of the initial factors are in the state.
KEPT = 1
#: Status: not kept, but the factors have not moved since the record (valid while the step count is 0).
AT_BASE = 2


def record_(state: dict[str, Any], A: Tensor, B: Tensor, *, zero: bool, keep: bool) -> None:
    """Record ``(A, B)`` (the stored factors, as they stand) as the factors the base excludes:
    :data:`ZERO` if ``zero`` (their change ``Δ(A, B)`` is zero), else :data:`KEPT` with copies if
    ``keep``, else :data:`AT_BASE` (unknown once ``W`` moves)."""
    for key in (INITIAL_A, INITIAL_B):
        state.pop(key, None)
    if zero:
        state[INITIAL_FACTORS] = ZERO
    elif keep:
        state[INITIAL_FACTORS] = KEPT
        state[INITIAL_A] = A.detach().clone()
        state[INITIAL_B] = B.detach().clone()
    else:
        state[INITIAL_FACTORS] = AT_BASE


def moved_(state: dict[str, Any]) -> None:
    """``W`` moved without a step (:meth:`~lora_optim.LoRAAdam.set_factors` with
    ``update_weight=True``): an :data:`AT_BASE` record no longer tells the base."""
    if state.get(INITIAL_FACTORS) == AT_BASE:
        state.pop(INITIAL_FACTORS)


def status(state: dict[str, Any]) -> int | None:
    """:data:`ZERO`, :data:`KEPT`, :data:`AT_BASE` (while the step count is 0; one host read), or
    ``None`` (unknown)."""
    value = state.get(INITIAL_FACTORS)
    if value == AT_BASE:
        step = state.get(STEP)
        return AT_BASE if step is not None and float(step) == 0 else None
    return value if value in (ZERO, KEPT) else None


def kept_factors(state: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """``(A₀, B₀)`` where they are known as tensors: the kept copies (:data:`KEPT`), or the stored
    factors themselves while they have not moved (:data:`AT_BASE`); else ``None``."""
    found = status(state)
    if found == KEPT:
        return state[INITIAL_A], state[INITIAL_B]
    if found == AT_BASE:
        return state[FACTOR_A], state[FACTOR_B]
    return None
