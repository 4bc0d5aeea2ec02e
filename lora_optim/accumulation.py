"""Projected gradients summed over the pieces of one step (micro-batches, layer uses).

In the plain mode autograd sums the full gradients of the micro-batches into ``p.grad`` and the
step projects the sum once. The per-layer mode (:mod:`lora_optim.per_layer`) and the
activation-side mode (:mod:`lora_optim.activation`) never keep ``G``: they project every piece
``G_k`` as soon as it exists and sum the projections,

.. math::

    \\sum_k P(G_k;\\, A, B) = P\\Big(\\sum_k G_k;\\, A, B\\Big),

which is exact because every projection is linear in ``G`` and the factors of a step are fixed
(:meth:`Projection.step_factors <lora_optim.projections.Projection.step_factors>` is pure, and
nothing changes them before the step).

The sums live in the optimizer state (:data:`~lora_optim.state_keys.ACCUMULATOR_KEYS`:
tensors and an int), so a ``state_dict()`` taken between micro-batches resumes exactly. They
play the part of ``p.grad``, with one status int:

* no keys: no gradient yet (``p.grad is None``);
* :data:`OPEN`: sums of this step's pieces (``p.grad`` holds a gradient, possibly zero after
  ``zero_grad(set_to_none=False)``); ``step()`` steps the parameter with them;
* :data:`CONSUMED`: ``step()`` used the sums. The next piece
  starts new sums, as if ``p.grad`` had been zeroed (the optimizer cannot see
  ``model.zero_grad()``); a ``step()`` before any new piece leaves the parameter alone.

A compiled step (``torch.compile``) keeps the two sum tensors after using them (``keep=True``),
and the next step's first piece is copied into them: the compiled step then sees the same state
tensors at every call and recompiles for none (``torch.compile`` guards on the identity of an
optimizer's state tensors), at the cost of ``r·(out+in)`` numbers per matrix kept between
steps. An eager step frees them.

This module holds the functions on one parameter's state; the optimizer calls them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lora_optim.state_keys import ACCUMULATED_GRAD_A, ACCUMULATED_GRAD_B, ACCUMULATION, EXP_AVG_A, EXP_AVG_B

__all__ = ["OPEN", "CONSUMED", "add_piece_", "open_sums", "consume_", "zero_", "clear_"]

#: Status of sums that a ``step()`` will use.
OPEN = 1
#: Status of sums a ``step()`` has used.
CONSUMED = 2


def add_piece_(state: dict[str, Any], grad_A: Tensor, grad_B: Tensor) -> None:
    """Add one piece's factor gradients (at ``s = 1``, factor dtype) to the sums; the first piece
    of a step is copied into the sum tensors of earlier steps, or becomes them (kept, not copied,
    unless it is not contiguous)."""
    if state.get(ACCUMULATION) == OPEN:
        state[ACCUMULATED_GRAD_A].add_(grad_A)
        state[ACCUMULATED_GRAD_B].add_(grad_B)
        return
    for key, piece in ((ACCUMULATED_GRAD_A, grad_A), (ACCUMULATED_GRAD_B, grad_B)):
        buffer = state.get(key)
        if _reusable(buffer, piece):
            buffer.copy_(piece)
        else:
            state[key] = piece.contiguous()
    state[ACCUMULATION] = OPEN


def _reusable(buffer: Any, piece: Tensor) -> bool:
    return (isinstance(buffer, Tensor) and buffer.shape == piece.shape and buffer.dtype == piece.dtype
            and buffer.device == piece.device and buffer.is_contiguous())


def open_sums(state: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """The sums a ``step()`` should use, or ``None``."""
    if state.get(ACCUMULATION) != OPEN:
        return None
    return state[ACCUMULATED_GRAD_A], state[ACCUMULATED_GRAD_B]


def consume_(state: dict[str, Any], keep: bool = False) -> None:
    """Mark the sums used by a step (or a skipped step) and free them, or with ``keep`` keep the
    tensors for the next step's sums (a compiled step: see the module docstring)."""
    if not keep:
        state.pop(ACCUMULATED_GRAD_A, None)
        state.pop(ACCUMULATED_GRAD_B, None)
    state[ACCUMULATION] = CONSUMED


def zero_(state: dict[str, Any]) -> None:
    """``zero_grad(set_to_none=False)``: a parameter that had a gradient keeps a zero one, so the
    next ``step()`` steps it (moments decay, weight decay applies), as in the plain mode."""
    if ACCUMULATION not in state:
        return
    for key, moment in ((ACCUMULATED_GRAD_A, EXP_AVG_A), (ACCUMULATED_GRAD_B, EXP_AVG_B)):
        buffer = state.get(key)
        if _reusable(buffer, state[moment]):
            buffer.zero_()
        else:
            state[key] = torch.zeros_like(state[moment])
    state[ACCUMULATION] = OPEN


def clear_(state: dict[str, Any]) -> None:
    """``zero_grad(set_to_none=True)``: forget the sums and that there were any; tensors a compiled
    step kept (status :data:`CONSUMED`) stay for the next step."""
    if state.get(ACCUMULATION) == CONSUMED and ACCUMULATED_GRAD_A in state:
        return
    for key in (ACCUMULATED_GRAD_A, ACCUMULATED_GRAD_B, ACCUMULATION):
        state.pop(key, None)
