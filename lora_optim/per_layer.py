"""Per-layer mode: each low-rank gradient is projected inside ``backward`` and freed at once.

``opt.enable_per_layer()`` (or ``PerLayerStep(opt)``) registers a
``register_post_accumulate_grad_hook`` on every low-rank parameter of the optimizer. The hook
runs as soon as autograd has finished a parameter's gradient ``G`` (after all its uses in the
graph): it projects ``G`` with the factors of the coming step,
``(g_A, g_B) = P(G; A, B)`` (``G·Bᵀ``, ``Aᵀ·G`` for ``lora``), adds them to the parameter's
projected-gradient sums (:meth:`LoRAAdam.accumulate_grad_ <lora_optim.LoRAAdam.accumulate_grad_>`,
:mod:`lora_optim.accumulation`) and sets ``p.grad = None``, so ``G`` is freed before the next
layer's gradient exists. At most one layer's full gradient is alive, instead of all of them.

``opt.step()`` then steps every parameter through the same engine as the plain mode
(:mod:`lora_optim.engine`), with the sums in place of ``G``. Summing projected gradients over
micro-batches is exact, because every projection is linear and the factors do not change before
the step, so the results equal the plain mode's up to rounding, and everything the plain step
does holds here too: one fused Adam call, one NaN/Inf check before anything changes
(``nonfinite="raise"`` raises with nothing changed), ``torch.amp.GradScaler`` (its scale is
divided out of the sums at the step), LR schedulers, closures, and ``state_dict()`` between
micro-batches (the sums are optimizer state and resume exactly).

The usual loop is unchanged: ``loss.backward()`` for each micro-batch, ``opt.step()``,
``opt.zero_grad()`` (which discards the sums as it discards ``p.grad``; with
``set_to_none=False`` a parameter that had a gradient keeps a zero one and steps, as in the plain
mode). Dense parameters (``rank=None`` groups, vectors) keep their gradient in ``p.grad`` until
``step()``, as in the plain mode: they are the small ones, and a ``GradScaler`` has to see them.

Limitations: parameters that do not require grad when the mode is enabled are not hooked (their
gradients, if any, go through ``p.grad`` as usual); ``torch.nn.utils.clip_grad_norm_`` sees no
low-rank gradient (they are projected already).

Not in a multi-process run: enabling the mode in a process group of more than one rank raises.
Under ``DistributedDataParallel`` the mode could not save memory (DDP's buckets hold a copy of
every gradient until its all-reduce) and would break DDP's reduction (it frees ``p.grad`` that
DDP reads and writes back); under FSDP2 the sharded gradients are assigned, not accumulated, so
the hooks would never run. Use the plain mode there (FSDP2 already frees each unsharded gradient
after its reduce-scatter), or the activation-side mode with DDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_optim.distributed import world_size

if TYPE_CHECKING:  # pragma: no cover
    from lora_optim.optimizer import LoRAAdam

__all__ = ["PerLayerStep"]


class PerLayerStep:
    """Handle of the per-layer mode of a :class:`~lora_optim.LoRAAdam` (see the module docstring).

    ``remove()`` (or leaving a ``with`` block) takes the hooks off; sums not yet stepped stay in
    the optimizer state for ``step()``.

    Args:
        optimizer: the optimizer whose low-rank parameters' gradients are projected in ``backward``.
    """

    def __init__(self, optimizer: LoRAAdam) -> None:
        if any(isinstance(mode, PerLayerStep) for mode in optimizer.grad_modes):
            raise ValueError("the per-layer mode is already enabled on this optimizer; remove() its handle first")
        if world_size() > 1:
            raise RuntimeError(
                f"the per-layer mode does not run in a process group of {world_size()} ranks: under DDP its hooks "
                "would free gradients that DDP's buckets copy and write back (no memory saved, DDP's reduction "
                "broken); under FSDP2 they would never run. Use the plain mode (FSDP2 frees each unsharded "
                "gradient after its reduce-scatter), or opt.attach(model) before wrapping the model in DDP."
            )
        self._optimizer = optimizer
        self._hooks: list[Any] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and optimizer.is_low_rank(p):
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_gradient))
        self._registration = optimizer.register_grad_mode(self)

    @torch.no_grad()
    def _on_gradient(self, p: Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        self._optimizer.accumulate_grad_(p, grad)
        p.grad = None  # G is freed before the next layer's gradient exists

    @property
    def hooked(self) -> int:
        """Number of parameters whose gradients are projected in ``backward``."""
        return len(self._hooks)

    def before_step(self) -> None:
        """Nothing to finish: every piece is in the optimizer state when ``backward`` returns."""

    def after_zero_grad(self, set_to_none: bool) -> None:
        """Nothing to reset: the sums are the optimizer's, and ``zero_grad`` resets them."""

    def remove(self) -> None:
        """Take the hooks off; ``backward`` leaves full gradients in ``p.grad`` again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._registration.remove()

    def __enter__(self) -> PerLayerStep:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PerLayerStep(hooked={len(self._hooks)})"
