"""Projection variants, registered by name.

``LoRAAdam(..., projection="lora")`` looks the name up here. A new variant is one module with a
:class:`Projection` subclass decorated by :func:`register_projection`; the optimizer loop does
not change.
"""

from __future__ import annotations

from lora_optim.projections.base import FactorState, Projection

__all__ = [
    "Projection",
    "FactorState",
    "register_projection",
    "get_projection",
    "available_projections",
    "projection_option_defaults",
]

_REGISTRY: dict[str, Projection] = {}


def register_projection(cls: type[Projection]) -> type[Projection]:
    """Class decorator: register a :class:`Projection` subclass under its ``name``.

    Raises ``ValueError`` if the name is taken by another class, or if an option name clashes
    with a different default of an already registered variant (options share one namespace in
    the param groups).
    """
    if not (isinstance(cls, type) and issubclass(cls, Projection)):
        raise TypeError(f"register_projection expects a Projection subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and type(existing).__qualname__ != cls.__qualname__:
        raise ValueError(f"projection name {name!r} is already registered by {type(existing).__name__}")
    _REGISTRY[name] = cls()
    return cls


def get_projection(name: str) -> Projection:
    """The registered projection called ``name``; ``ValueError`` listing the known names if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown projection {name!r}; registered projections: {sorted(_REGISTRY)}"
        ) from None


def available_projections() -> list[str]:
    """Names of the registered projections, sorted."""
    return sorted(_REGISTRY)


def projection_option_defaults() -> dict[str, object]:
    """Every option any registered projection declares, with its default."""
    defaults: dict[str, object] = {}
    for projection in _REGISTRY.values():
        defaults.update(projection.options)
    return defaults


# Built-in variants register themselves on import.
from lora_optim.projections import additive, lora, random  # noqa: E402,F401
