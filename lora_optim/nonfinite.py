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

What is checked, for every parameter that has a gradient this step: ``G`` itself (not only the
projected gradients: that a NaN in ``G`` reaches ``s·G·Bᵀ`` holds only for IEEE products with
no zero-skipping, which depends on the BLAS and on the projection), the factor gradients, and
the factors' Adam moments (a state that overflowed earlier must not reach ``W``). Each list of
tensors of one device and dtype costs one fused reduction, ``torch._foreach_norm(·, inf)`` (the
largest magnitude: NaN propagates, ``±Inf`` shows, and unlike a sum it cannot overflow, so there
are no false alarms), and all answers of a device are read back together by
:class:`FiniteCheck`: one host sync per device per step, whatever the number of parameters.
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
    "FiniteCheck",
    "finite_flags",
    "warn_skipped",
]

#: Accepted values of the ``nonfinite`` option.
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradientWarning(RuntimeWarning):
    """A parameter's step was skipped because its gradient held a NaN or an Inf."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient held a NaN or an Inf in a group with ``nonfinite="raise"``; nothing was changed."""


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


class FiniteCheck:
    """Collects the tensors a step must check and answers with one host read per device.

    ``add(key, tensors)`` registers tensors under a hashable ``key`` (a key is finite if all its
    tensors are); ``add_flag(key, ok)`` registers a 0-dim bool tensor computed elsewhere on the
    device (e.g. ``found_inf == 0`` of a ``GradScaler``). :meth:`read` then runs one
    ``torch._foreach_norm(·, inf)`` per list of one device and dtype and copies the device's
    answers to the host in one transfer: the only host sync of the check.

    ``add(key, tensors, group=g)`` checks tensors that are one rank's part of something sharded
    over the process group ``g`` (FSDP2): their answers are combined over the ranks of ``g`` by
    one small all-reduce before the host read, so every rank gets the same answer. Every rank
    must add the same grouped keys, with the same number of tensors each, in the same order.
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple[torch.device, torch.dtype], list[tuple[object, Tensor]]] = {}
        self._grouped: dict[object, list[tuple[object, Tensor]]] = {}
        self._flags: dict[torch.device, list[tuple[object, Tensor]]] = {}
        self._keys: list[object] = []

    def add(self, key: object, tensors: Sequence[Tensor], group: object = None) -> None:
        """Check ``tensors`` (any shapes, devices, float dtypes) under ``key``; ``group``: see the
        class docstring."""
        self._keys.append(key)
        for tensor in tensors:
            if group is not None:
                # Kept even when empty (a rank may hold no rows): the ranks' lists must align.
                self._grouped.setdefault(group, []).append((key, tensor if tensor.numel() else tensor.new_zeros(1)))
            elif tensor.numel():
                self._tensors.setdefault((tensor.device, tensor.dtype), []).append((key, tensor))

    def add_flag(self, key: object, ok: Tensor) -> None:
        """``key`` is finite only if the 0-dim bool tensor ``ok`` is true."""
        self._keys.append(key)
        self._flags.setdefault(ok.device, []).append((key, ok.reshape(1)))

    @staticmethod
    def _answers(entries: list[tuple[object, Tensor]]) -> tuple[list[object], Tensor]:
        """Keys and a bool vector (entry is finite), one fused reduction per dtype."""
        by_dtype: dict[torch.dtype, list[tuple[object, Tensor]]] = {}
        for key, tensor in entries:
            by_dtype.setdefault(tensor.dtype, []).append((key, tensor))
        keys: list[object] = []
        answers = []
        with torch.no_grad():
            for same in by_dtype.values():
                keys.extend(key for key, _ in same)
                answers.append(torch.stack(torch._foreach_norm([t for _, t in same], float("inf"))).isfinite())
        return keys, (answers[0] if len(answers) == 1 else torch.cat(answers))

    def read(self) -> dict[object, bool]:
        """``{key: all finite}`` for every key added; one host transfer per device."""
        result = {key: True for key in self._keys}
        per_device: dict[torch.device, tuple[list[object], list[Tensor]]] = {}
        for (device, _), entries in self._tensors.items():
            keys, answers = per_device.setdefault(device, ([], []))
            entry_keys, ok = self._answers(entries)
            keys.extend(entry_keys)
            answers.append(ok)
        for group, entries in self._grouped.items():
            entry_keys, ok = self._answers(entries)
            bad = (~ok).to(torch.float32)
            torch.distributed.all_reduce(bad, group=group)  # a NaN on any rank is a NaN on every rank
            keys, answers = per_device.setdefault(bad.device, ([], []))
            keys.extend(entry_keys)
            answers.append(bad == 0)
        for device, entries in self._flags.items():
            keys, answers = per_device.setdefault(device, ([], []))
            keys.extend(key for key, _ in entries)
            answers.append(torch.cat([ok for _, ok in entries]))
        for keys, answers in per_device.values():
            joined = answers[0] if len(answers) == 1 else torch.cat(answers)
            # The one device-to-host read of the step (a copy even on the CPU, so it is visible
            # to a TorchDispatchMode counting syncs).
            for key, ok in zip(keys, joined.to("cpu", copy=True).tolist()):
                if not ok:
                    result[key] = False
        return result


def finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """``[t has only finite entries for t in tensors]``: one fused reduction per device and dtype,
    one host read per device (empty tensors are finite)."""
    check = FiniteCheck()
    for index, tensor in enumerate(tensors):
        check.add(index, [tensor])
    flags = check.read()
    return [flags[index] for index in range(len(tensors))]
