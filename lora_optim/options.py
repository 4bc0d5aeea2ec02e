"""The type of a param-group option and the checks that validate it.

An :class:`Option` carries a name, a default, a check and whether a checkpoint must match it.
The table of the options every group has is :data:`lora_optim.option_table.COMMON_OPTIONS`;
each projection declares its own in :attr:`Projection.options
<lora_optim.projections.Projection.options>` with the same type, so validation, defaults and
checkpoint checks read one kind of entry wherever it is declared.

Validation normalises as it checks: NumPy and other ``numbers.Integral``/``numbers.Real`` scalars
become plain ``int``/``float`` (the optimizer state then stays loadable with
``torch.load(..., weights_only=True)``), ``bool`` is refused where a number is expected, and
floats must be finite.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "Option",
    "integer",
    "real",
    "choice",
    "optional",
    "learning_rate",
    "beta_pair",
    "boolean",
]

#: ``check(name, value) -> normalised value``; raises ``ValueError``/``TypeError`` naming the option.
Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One param-group option.

    Attributes:
        name: the key in the param group and the keyword of :class:`~lora_optim.LoRAAdam`.
        default: the value a group gets when neither the group nor the constructor sets it.
        check: ``check(name, value)`` returns the normalised value or raises ``ValueError`` /
            ``TypeError`` with the option's name and the value in the message.
        structural: whether the option decides the layout of the per-parameter state, so that a
            checkpoint made with another value cannot be loaded (``load_state_dict`` raises).
        doc: one line for error messages and the docs.
    """

    name: str
    default: Any
    check: Check
    structural: bool = False
    doc: str = ""

    def validate(self, value: Any) -> Any:
        """The normalised ``value``, or ``ValueError``/``TypeError`` naming the option."""
        return self.check(self.name, value)


def _is_integral(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int) -> Check:
    """An int ``>= minimum`` (any ``numbers.Integral`` but ``bool``; returned as ``int``)."""

    def check(name: str, value: Any) -> int:
        if not _is_integral(value) or operator.index(value) < minimum:
            raise ValueError(f"Invalid {name}: {value!r}; must be an int >= {minimum}")
        return int(operator.index(value))

    return check


def real(minimum: float, *, inclusive: bool = True) -> Check:
    """A finite real number ``>= minimum`` (``> minimum`` if not ``inclusive``), returned as ``float``."""
    relation = ">=" if inclusive else ">"

    def check(name: str, value: Any) -> float:
        if not _is_real(value) or not math.isfinite(float(value)) or not (
            float(value) >= minimum if inclusive else float(value) > minimum
        ):
            raise ValueError(f"Invalid {name}: {value!r}; must be a finite number {relation} {minimum:g}")
        return float(value)

    return check


def choice(values: Callable[[], Collection[Any]] | Collection[Any]) -> Check:
    """One of ``values`` (a collection, or a callable giving it at check time: registries grow)."""

    def check(name: str, value: Any) -> Any:
        allowed = values() if callable(values) else values
        try:
            known = value in allowed
        except TypeError:  # unhashable
            known = False
        if not known:
            raise ValueError(f"Invalid {name}: {value!r}; must be one of {sorted(allowed, key=repr)}")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` or a value ``inner`` accepts."""

    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` (a ``bool``, or a NumPy bool; numbers are refused, as a typo guard)."""
    kind = type(value)
    if isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        return bool(value)
    raise ValueError(f"Invalid {name}: {value!r}; must be True or False")


def learning_rate(name: str, value: Any) -> float | Tensor:
    """A finite number ``>= 0``, or a one-element float tensor holding one (kept as a tensor)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"Invalid {name}: a tensor lr must be one floating-point element, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        number = float(value.detach().reshape(()).cpu())  # once, at validation
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"Invalid {name}: {value!r}; must be a finite number >= 0")
        return value
    return real(0.0)(name, value)


def beta_pair(name: str, value: Any) -> tuple[float, float]:
    """A pair ``(beta1, beta2)``, each a number in ``[0, 1)``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid {name}: {value!r}; must be a pair (beta1, beta2)")
    for index, beta in enumerate(value):
        if not _is_real(beta) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index} ({name}={value!r}): {beta!r}; must be in [0, 1)")
    return float(value[0]), float(value[1])


