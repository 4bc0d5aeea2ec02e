"""The protocol through which a gradient mode plugs into :class:`~lora_optim.LoRAAdam`.

A *gradient mode* changes where a low-rank parameter's gradient comes from: the per-layer mode
(:mod:`lora_optim.per_layer`) projects each ``G`` inside ``backward`` and frees it; the
activation-side mode (:mod:`lora_optim.activation`) forms the factor gradients from a layer's
input and output gradient. Both feed the optimizer through its public methods
(:meth:`~lora_optim.LoRAAdam.accumulate_grad_`,
:meth:`~lora_optim.LoRAAdam.accumulate_activation_grad_`) and register with
:meth:`~lora_optim.LoRAAdam.register_grad_mode`, which returns a removable handle as torch's
hooks do. The optimizer never imports a mode; it only calls the two methods below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["GradMode"]


@runtime_checkable
class GradMode(Protocol):
    """What the optimizer calls on a registered mode."""

    def before_step(self) -> None:
        """Called at the start of ``step()``, before the step gathers its gradients (a mode that
        must finish or reduce its pieces first does it here)."""

    def after_zero_grad(self, set_to_none: bool) -> None:
        """Called at the end of ``zero_grad()``."""
