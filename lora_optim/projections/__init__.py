"""Projection variants, registered by name.

``LoRAAdam(..., projection="lora")`` looks the name up here. A new variant is one module with a
:class:`Projection` subclass decorated by :func:`register_projection`; neither the step engine
nor the optimizer changes.
"""

from __future__ import annotations

from lora_optim.options import Option
from lora_optim.projections.base import FactorChange, FactorState, Projection

__all__ = [
    "Projection",
    "FactorState",
    "FactorChange",
    "register_projection",
    "get_projection",
    "available_projections",
    "projection_options",
]

_REGISTRY: dict[str, Projection] = {}


def register_projection(cls: type[Projection]) -> type[Projection]:
    """Class decorator: register a :class:`Projection` subclass under its ``name``.

    Raises ``TypeError`` if ``cls`` is not a ``Projection`` subclass or an entry of its
    ``options`` is not an :class:`~lora_optim.options.Option`; ``ValueError`` if the name is
    taken by another class, or if an option name is declared by an already registered variant
    with a different default (options share one namespace in the param groups).
    """
    if not (isinstance(cls, type) and issubclass(cls, Projection)):
        raise TypeError(f"register_projection expects a Projection subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    for option in cls.options:
        if not isinstance(option, Option):
            raise TypeError(f"{cls.__name__}.options must hold lora_optim.options.Option entries, got {option!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and type(existing).__qualname__ != cls.__qualname__:
        raise ValueError(f"projection name {name!r} is already registered by {type(existing).__name__}")
    declared = projection_options(excluding=name)
    for option in cls.options:
        if option.name in declared and declared[option.name][0].default != option.default:
            other = declared[option.name]
            raise ValueError(
                f"option {option.name!r} of {cls.__name__} has default {option.default!r}, but projection "
                f"{other[1][0]!r} declares it with default {other[0].default!r}"
            )
    _REGISTRY[name] = cls()
    return cls


def get_projection(name: str) -> Projection:
    """The registered projection called ``name``; ``ValueError`` listing the known names if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown projection {name!r}; registered projections: {sorted(_REGISTRY)}") from None


def available_projections() -> list[str]:
    """Names of the registered projections, sorted."""
    return sorted(_REGISTRY)


def projection_options(excluding: str | None = None) -> dict[str, tuple[Option, tuple[str, ...]]]:
    """``{option name: (its Option, names of the projections declaring it)}`` over the registry."""
    found: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for projection_name, projection in sorted(_REGISTRY.items()):
        if projection_name == excluding:
            continue
        for option in projection.options:
            option_, owners = found.get(option.name, (option, ()))
            found[option.name] = (option_, (*owners, projection_name))
    return found


# Built-in variants register themselves on import.
from lora_optim.projections import additive, lora, random, svd  # noqa: E402,F401
