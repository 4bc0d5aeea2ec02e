"""Projected gradients summed over the pieces of one step (micro-batches, layer uses).

In the plain mode autograd sums the full gradients of the micro-batches into ``p.grad`` and
:meth:`~lora_optim.LoRAAdam.step` projects the sum once. The per-layer mode
(:mod:`lora_optim.per_layer`) and the activation-side mode (:mod:`lora_optim.activation`) never
keep ``G``: they project every piece ``G_k`` as soon as it exists and sum the projections,

.. math::

    \\sum_k P(G_k;\\, A, B) = P\\Big(\\sum_k G_k;\\, A, B\\Big),

which is exact because every projection is linear in ``G`` and the factors do not change within
a step. The factors are fixed by :meth:`Projection.begin_step` at the first piece of the step
(its only call for that step, as in the plain mode, so ``random`` redraws once) and read back by
:meth:`Projection.step_factors` for every later piece.

The sums live in the optimizer state under :data:`ACCUMULATOR_KEYS` (tensors and an int), so a
``state_dict()`` taken between micro-batches resumes exactly, and :func:`finish_` removes them
with the factor step, so the state after a step is the plain mode's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_optim.matrix import as_matrix
from lora_optim.nonfinite import NonFiniteGradientError, finite_flags
from lora_optim.projections import Projection, get_projection

if TYPE_CHECKING:  # pragma: no cover
    from lora_optim.optimizer import LoRAAdam

__all__ = [
    "ACCUMULATOR_KEYS",
    "factors_for_piece",
    "add_piece_",
    "has_pieces",
    "finish_",
    "finish_all_",
    "discard_all_",
]

#: State keys of the sums of projected gradients ``Σ_k ∂L_k/∂A``, ``Σ_k ∂L_k/∂B`` and of the
#: number of pieces added since the step began.
GRAD_A, GRAD_B, PIECES = "accumulated_grad_A", "accumulated_grad_B", "accumulated_pieces"
ACCUMULATOR_KEYS = (GRAD_A, GRAD_B, PIECES)


def factors_for_piece(state: dict[str, Any], group: dict[str, Any]) -> tuple[Projection, Tensor, Tensor]:
    """``(projection, A, B)`` to project a piece of the current step with.

    At the first piece of a step this is the step's only :meth:`Projection.begin_step` (redraw if
    due, moment rule) and creates zero accumulators; later pieces read the same factors back
    with :meth:`Projection.step_factors`.
    """
    projection = get_projection(group["projection"])
    if PIECES not in state:
        A, B = projection.begin_step(state, group)
        state[GRAD_A] = torch.zeros_like(A)
        state[GRAD_B] = torch.zeros_like(B)
        state[PIECES] = 0
        return projection, A, B
    A, B = projection.step_factors(state, group)
    return projection, A, B


def add_piece_(state: dict[str, Any], grad_A: Tensor, grad_B: Tensor) -> int:
    """Add one piece's ``(∂L/∂A, ∂L/∂B)`` to the sums; returns the number of pieces so far."""
    state[GRAD_A].add_(grad_A)
    state[GRAD_B].add_(grad_B)
    state[PIECES] += 1
    return state[PIECES]


def has_pieces(state: dict[str, Any]) -> bool:
    """Whether projected gradients were added since the step began (and not discarded)."""
    return state.get(PIECES, 0) > 0


def finish_(optimizer: LoRAAdam, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    """The factor step of ``p`` with the summed projected gradients; removes the accumulators.

    The learning rate and the other hyperparameters are read from ``group`` now, as the plain
    :meth:`~lora_optim.LoRAAdam.step` reads them. Sums with a NaN or an Inf are not applied: the
    group's ``nonfinite`` policy raises or skips (:mod:`lora_optim.nonfinite`), as for a
    non-finite ``G`` in the plain mode (``begin_step`` has run, so a due redraw has happened).
    """
    projection = get_projection(group["projection"])
    A, B = projection.step_factors(state, group)
    grad_A, grad_B = state.pop(GRAD_A), state.pop(GRAD_B)
    del state[PIECES]
    if not all(finite_flags([grad_A, grad_B])):
        optimizer._skip_nonfinite(p, group, state)
        return
    optimizer._factor_step(p, group, state, projection, A, B, grad_A, grad_B,
                           optimizer._scale(group), optimizer._hyper(group))


@torch.no_grad()
def finish_all_(optimizer: LoRAAdam) -> set[int]:
    """Step every parameter with accumulated pieces; returns the ``id``s of those parameters.

    A full gradient ``p.grad`` present next to the pieces (a plain backward mixed into an
    accumulation, e.g. after loading a mid-accumulation checkpoint without the mode) is projected
    with the step's factors and added, so it is counted once, as in the plain mode.
    """
    pending = [(group, p, optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]
               if p in optimizer.state and has_pieces(optimizer.state[p])]
    # As the plain step: refuse before changing anything when a nonfinite="raise" group has a bad sum.
    flags = finite_flags([t for _, _, state in pending for t in (state[GRAD_A], state[GRAD_B])])
    refused = [f"parameter {optimizer._position(p)} (shape {tuple(p.shape)})"
               for (group, p, _), ok_A, ok_B in zip(pending, flags[::2], flags[1::2])
               if not (ok_A and ok_B) and group["nonfinite"] == "raise"]
    if refused:
        raise NonFiniteGradientError(f"non-finite accumulated factor gradient (NaN or Inf) in {', '.join(refused)} "
                                     "with nonfinite='raise'; nothing was changed")
    for group, p, state in pending:
        if p.grad is not None:
            projection, A, B = factors_for_piece(state, group)
            grad = as_matrix(p.grad)
            grad = grad.to(A.dtype) if grad.dtype != A.dtype else grad
            add_piece_(state, *projection.project(grad, A, B, optimizer._scale(group)))
        finish_(optimizer, p, group, state)
    return {id(p) for _, p, _ in pending}


@torch.no_grad()
def discard_all_(optimizer: LoRAAdam, set_to_none: bool) -> None:
    """What ``zero_grad`` does to accumulated pieces: zero the sums; with ``set_to_none`` also
    forget that pieces arrived, so ``step()`` skips the parameter as it skips ``grad=None``.

    The step's factors stay fixed (``begin_step`` has run; a second call would redraw twice).
    """
    for state in optimizer.state.values():
        if PIECES in state:
            state[GRAD_A].zero_()
            state[GRAD_B].zero_()
            if set_to_none:
                state[PIECES] = 0
