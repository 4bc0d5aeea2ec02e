"""What happens when a gradient holds a NaN or an Inf.

A non-finite gradient must never reach ``W``, the factors or the moments: one NaN in ``G`` makes
a whole row of ``s·G·Bᵀ`` NaN, the Adam moments keep it forever, and ``W`` gets it at the next
write. The per-group option ``nonfinite`` decides what to do:

``"skip"`` (default)
    The parameter with the bad gradient is not stepped this time: ``W``, factors, moments,
    step counts and random draws stay exactly as they were (other parameters step normally).
    A :class:`NonFiniteGradientWarning` is issued and the parameter's ``nonfinite_skips``
    counter (an int in the optimizer state, so it checkpoints) goes up by one.
``"raise"``
    :meth:`LoRAAdam.step` raises :class:`NonFiniteGradientError` before changing anything at
    all (no parameter of any group is stepped).

The check is on ``G`` itself, not on the projected gradients: that a NaN in ``G`` always
reaches ``s·G·Bᵀ`` holds only for IEEE products with no zero-skipping, which depends on the
BLAS and on the projection (a variant may zero or mask entries). Per gradient it is one fused
reduction, ``torch.aminmax(G)`` (NaN propagates to both results, ``+Inf`` shows in the max and
``−Inf`` in the min; unlike a sum it cannot overflow, so there are no false alarms), and the
results of all gradients on a device are read back together: one host sync per device per step.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientWarning",
    "NonFiniteGradientError",
    "validate_policy",
    "finite_flags",
    "warn_skipped",
]

#: Accepted values of the ``nonfinite`` option.
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradientWarning(RuntimeWarning):
    """A parameter's step was skipped because its gradient held a NaN or an Inf."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient held a NaN or an Inf in a group with ``nonfinite="raise"``; nothing was changed."""


def validate_policy(value: object) -> None:
    """``ValueError`` naming the option and the value unless ``value`` is one of :data:`NONFINITE_POLICIES`."""
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite: {value!r}; must be one of {NONFINITE_POLICIES}")


_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__name__.rpartition(".")[0]], torch)
)


def warn_skipped(message: str) -> None:
    """``warnings.warn(message, NonFiniteGradientWarning)`` attributed to the first caller outside
    lora_optim and torch (the user's ``opt.step()`` line, however many wrappers are in between)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, NonFiniteGradientWarning, stacklevel=level)


def finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """``[t has only finite entries for t in tensors]`` with one reduction per tensor and one
    host sync per device (empty tensors are finite)."""
    flags: list[bool] = [True] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        extremes = torch.stack([torch.stack(torch.aminmax(tensors[i].detach())).double() for i in indices])
        for i, ok in zip(indices, torch.isfinite(extremes).all(dim=1).tolist()):
            flags[i] = ok
    return flags
