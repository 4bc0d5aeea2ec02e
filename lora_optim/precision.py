"""How a factor step is written into ``W``.

Factors and their moments are kept in ``factor_dtype(W.dtype)``: the weight's own dtype for
fp32/fp64 weights, fp32 for bf16/fp16 ones. The projection forms ``s·ΔW`` in that dtype and a
*write mode* adds it to ``W``:

``nearest``
    ``W ← round(W + s·ΔW)`` to ``W``'s dtype. Exact for fp32/fp64 weights (no rounding beyond the
    dtype's own); for bf16/fp16 weights small updates are lost.

Modes are looked up by name from the ``precision`` option of a param group
(``None`` picks :func:`default_precision` for the weight's dtype).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "WeightWriter",
    "register_writer",
    "get_writer",
    "available_writers",
    "factor_dtype",
    "default_precision",
]

_WRITERS: dict[str, WeightWriter] = {}


def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype of the factors and moments for a weight of ``weight_dtype``: fp64 stays fp64, else fp32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def default_precision(weight_dtype: torch.dtype) -> str:
    """The write mode used when a group's ``precision`` is ``None``."""
    return "nearest"


class WeightWriter(abc.ABC):
    """Adds ``s·ΔW`` into ``W``; subclasses set :attr:`name` and register with :func:`register_writer`."""

    name: ClassVar[str]

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """Extra per-parameter state (tensors and ints); none by default."""
        return {}

    @abc.abstractmethod
    def write_(self, weight: Tensor, state: dict[str, Any], add_delta: Callable[[Tensor], None],
               compute_dtype: torch.dtype) -> None:
        """Apply the update: ``add_delta(buffer)`` adds ``s·ΔW`` into any ``buffer`` of ``weight``'s
        shape and dtype ``compute_dtype``."""


def register_writer(cls: type[WeightWriter]) -> type[WeightWriter]:
    """Class decorator registering a :class:`WeightWriter` under its ``name``."""
    _WRITERS[cls.name] = cls()
    return cls


def get_writer(name: str) -> WeightWriter:
    """The write mode called ``name``; ``ValueError`` listing the known modes if none."""
    try:
        return _WRITERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {name!r}; known: {sorted(_WRITERS)}") from None


def available_writers() -> list[str]:
    """Names of the registered write modes, sorted."""
    return sorted(_WRITERS)


@register_writer
class NearestWriter(WeightWriter):
    """``W ← round_to_nearest(W + s·ΔW)``; in place, no extra memory when dtypes agree."""

    name = "nearest"

    def write_(self, weight: Tensor, state: dict[str, Any], add_delta: Callable[[Tensor], None],
               compute_dtype: torch.dtype) -> None:
        """Add directly into ``W`` when it has the compute dtype, else through a temporary."""
        if weight.dtype == compute_dtype:
            add_delta(weight)
            return
        delta = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
        add_delta(delta)
        weight.add_(delta)
