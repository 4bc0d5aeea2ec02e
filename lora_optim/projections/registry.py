"""The registry of projection variants: a name for each :class:`~lora_optim.projections.base.Projection`.

``LoRAAdam(..., projection="lora")`` looks the name up here. The built-in variants register
themselves when :mod:`lora_optim.projections` is imported.
"""

from __future__ import annotations

from lora_optim.options import Option
from lora_optim.projections.base import Projection

__all__ = ["register_projection", "unregister_projection", "get_projection", "available_projections",
           "projection_options"]

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


def unregister_projection(name: str) -> None:
    """Remove the variant registered as ``name`` (for tests and notebooks that register their own);
    ``ValueError`` if there is none. Optimizers using it keep working until they look it up again."""
    if name not in _REGISTRY:
        raise ValueError(f"no projection registered as {name!r}; registered projections: {sorted(_REGISTRY)}")
    del _REGISTRY[name]
