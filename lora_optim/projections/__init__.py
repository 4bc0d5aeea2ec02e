"""Projection variants, registered by name.

``LoRAAdam(..., projection="lora")`` looks the name up in the registry
(:mod:`lora_optim.projections.registry`). A new variant is one module with a :class:`Projection`
subclass decorated by :func:`register_projection`; neither the step engine nor the optimizer
changes.
"""

from __future__ import annotations

from lora_optim.projections import additive, lora, random, svd  # noqa: F401  (the built-ins register themselves)
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.projections.registry import (
    available_projections,
    get_projection,
    projection_options,
    register_projection,
    unregister_projection,
)

__all__ = [
    "Projection",
    "FactorState",
    "FactorChange",
    "register_projection",
    "unregister_projection",
    "get_projection",
    "available_projections",
    "projection_options",
]
