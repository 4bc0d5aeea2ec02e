"""Measuring optimizer state."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["optimizer_state_bytes"]


def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        if value.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(value.untyped_storage().data_ptr())
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        # Peers (GaLore, APOLLO) keep projector objects holding tensors in their state.
        return _tensor_bytes(vars(value), seen)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (shared storages counted once).

    Works for any ``torch.optim.Optimizer``, including peers that keep tensors inside Python
    objects in their state. For :class:`~lora_optim.LoRAAdam` with ``lora`` or ``additive``
    on an ``out×in`` matrix it is ``3·r·(out+in)`` elements of the factor dtype (factors plus
    two moments each); ``random`` with ``resample_every=1`` keeps only the moments,
    ``2·r·(out+in)``; plus a few bytes of 0-dim counters (the step count, the skip count, and
    ``random``'s and stochastic rounding's draw counters).
    """
    seen: set[int] = set()
    return sum(_tensor_bytes(state, seen) for state in optimizer.state.values())
