"""Per-layer mode: each parameter steps inside ``backward`` and its gradient is freed at once.

``opt.enable_per_layer(accumulation_steps=N)`` registers a
``register_post_accumulate_grad_hook`` on every parameter of the optimizer. The hook runs as
soon as autograd has finished a parameter's gradient (after all its uses in the graph):

* low-rank parameter: ``G = p.grad`` is projected at once with the step's factors,
  ``(g_A, g_B) = P(G; A, B)`` (``s·G·Bᵀ``, ``s·Aᵀ·G`` for ``lora``), ``p.grad`` is set to
  ``None`` (``G`` is freed before the next layer's gradient exists), and the projection is added
  to the sums of :mod:`lora_optim.accumulation`. At the ``N``-th micro-batch the factor step runs
  and ``W += s·(A'B' − AB)`` is written, still inside ``backward``.
* dense parameter (``rank=None`` or ndim < 2): autograd keeps summing into ``p.grad``; at the
  ``N``-th micro-batch it takes its AdamW step and ``p.grad`` is set to ``None``.

So at most one layer's full gradient is alive, instead of all of them (the plain mode keeps every
``G`` until ``step()``). Summing projected gradients over micro-batches is exact because the
factors do not change within a step; the result equals the plain mode's up to rounding.

The usual loop keeps working: ``loss.backward()`` for each micro-batch (scaled as in the plain
mode, e.g. a mean over micro-batches), then ``opt.step()`` (which completes whatever is still
summing: a shorter last accumulation, parameters unused in some micro-batch), ``opt.zero_grad()``
(discards sums, as it discards ``p.grad``), LR schedulers (``lr`` is read when a parameter steps,
i.e. during the backward before ``scheduler.step()``), ``state_dict()`` (sums taken between
micro-batches are part of it and resume exactly).

Non-finite gradients: ``G`` is checked in the hook as in the plain mode; a parameter whose
step had a NaN/Inf gradient is skipped or raises (its group's ``nonfinite`` option) when it
would step, i.e. inside ``backward``, where other parameters may already have stepped.

Limitations: ``W`` changes during ``backward``, so a second backward through the same graph
(``retain_graph=True``) fails autograd's in-place check; optimizer step hooks
(``register_step_pre_hook``) do not run for steps taken in ``backward``; parameters that do not
require grad when the mode is enabled are not hooked (``step()`` still handles their gradients).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_optim import accumulation
from lora_optim.matrix import as_matrix
from lora_optim.nonfinite import finite_flags

if TYPE_CHECKING:  # pragma: no cover
    from lora_optim.optimizer import LoRAAdam

__all__ = ["PerLayerStep"]


class PerLayerStep:
    """Handle of the per-layer mode of a :class:`~lora_optim.LoRAAdam` (see the module docstring).

    Made by :meth:`LoRAAdam.enable_per_layer`. ``remove()`` (or leaving a ``with`` block) takes
    the hooks off; sums not yet stepped stay in the optimizer state for ``step()``.

    Args:
        optimizer: the optimizer whose parameters step in ``backward``.
        accumulation_steps: micro-batches per step (an int ≥ 1): a parameter steps at its
            ``accumulation_steps``-th gradient since its last step.
    """

    def __init__(self, optimizer: LoRAAdam, accumulation_steps: int = 1) -> None:
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if any(isinstance(mode, PerLayerStep) for mode in optimizer._grad_modes):
            raise ValueError("the per-layer mode is already enabled on this optimizer; remove() its handle first")
        self.accumulation_steps = accumulation_steps
        self._optimizer = optimizer
        # Micro-batches summed in p.grad by dense parameters (projected sums count in the state).
        self._dense_pieces: dict[int, int] = {}
        self._hooks: list[Any] = []
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    # The group is looked up by index when the hook runs: load_state_dict
                    # replaces the group dicts.
                    hook = functools.partial(self._on_gradient, group_index=index)
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        optimizer._grad_modes.append(self)

    @torch.no_grad()
    def _on_gradient(self, p: Tensor, group_index: int) -> None:
        optimizer = self._optimizer
        group = optimizer.param_groups[group_index]
        grad = p.grad
        if grad is None:
            return
        if not optimizer._is_low_rank(p, group):
            pieces = self._dense_pieces.get(id(p), 0) + 1
            if pieces < self.accumulation_steps:
                self._dense_pieces[id(p)] = pieces
                return
            self._dense_pieces.pop(id(p), None)
            optimizer._step_param(p, group, grad)
            p.grad = None
            return
        if grad.is_sparse:
            raise TypeError("LoRAAdam does not support sparse gradients (got a sparse grad); use dense gradients")
        state = optimizer._state(p, group)
        projection, A, B = accumulation.factors_for_piece(state, group)
        matrix_grad = as_matrix(grad)
        # Projections that read a bf16 G themselves avoid a weight-sized fp32 copy.
        if matrix_grad.dtype != A.dtype and not getattr(projection, "accepts_low_precision_grad", False):
            matrix_grad = matrix_grad.to(A.dtype)
        grad_A, grad_B = projection.project(matrix_grad, A, B, optimizer._scale(group))
        if not finite_flags([grad])[0]:
            # The check is on G, as in the plain mode; a NaN sum makes the factor step skip or raise.
            grad_A = torch.full_like(grad_A, math.nan)
        # Free G before the factor step and before the next layer's gradient exists.
        del grad, matrix_grad
        p.grad = None
        if accumulation.add_piece_(state, grad_A, grad_B) >= self.accumulation_steps:
            accumulation.finish_(optimizer, p, group, state)

    def after_step(self) -> None:
        """Called by ``step()``: dense parameters it stepped start a new accumulation."""
        self._dense_pieces.clear()

    def after_zero_grad(self, set_to_none: bool) -> None:
        """Called by ``zero_grad()``: the discarded micro-batches no longer count."""
        self._dense_pieces.clear()

    def remove(self) -> None:
        """Take the hooks off; ``backward`` leaves full gradients in ``p.grad`` again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self in self._optimizer._grad_modes:
            self._optimizer._grad_modes.remove(self)

    def __enter__(self) -> PerLayerStep:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PerLayerStep(accumulation_steps={self.accumulation_steps}, hooks={len(self._hooks)})"
