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
* no status: unknown (non-zero and not kept, or a checkpoint written before the record
  existed). Export then needs the base weights (:func:`lora_optim.interop.export_peft_adapter`'s
  ``base``), and unmerging is refused.

The projections decide what "zero" means and call :func:`record_`; see
:meth:`Projection.record_base_ <lora_optim.projections.Projection.record_base_>`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lora_optim.state_keys import INITIAL_A, INITIAL_B, INITIAL_FACTORS

__all__ = ["ZERO", "KEPT", "record_", "status", "kept_factors"]

#: Status: the initial factors' weight change is zero.
ZERO = 0
#: Status: copies of the initial factors are in the state.
KEPT = 1


def record_(state: dict[str, Any], A: Tensor, B: Tensor, *, zero: bool, keep: bool) -> None:
    """Record ``(A, B)`` as the factors the base excludes: :data:`ZERO` if ``zero`` (their
    change ``Δ(A, B)`` is zero), else :data:`KEPT` with copies if ``keep``, else unknown."""
    for key in (INITIAL_A, INITIAL_B):
        state.pop(key, None)
    if zero:
        state[INITIAL_FACTORS] = ZERO
    elif keep:
        state[INITIAL_FACTORS] = KEPT
        state[INITIAL_A] = A.detach().clone()
        state[INITIAL_B] = B.detach().clone()
    else:
        state.pop(INITIAL_FACTORS, None)


def status(state: dict[str, Any]) -> int | None:
    """:data:`ZERO`, :data:`KEPT`, or ``None`` (unknown)."""
    value = state.get(INITIAL_FACTORS)
    return value if value in (ZERO, KEPT) else None


def kept_factors(state: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """The kept copies ``(A₀, B₀)`` (status :data:`KEPT`), else ``None``."""
    if status(state) != KEPT:
        return None
    return state[INITIAL_A], state[INITIAL_B]
