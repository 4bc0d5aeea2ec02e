"""What happens when a gradient holds a NaN or an Inf.

A non-finite gradient must never reach ``W``, the factors or the moments: one NaN in ``G`` makes
a whole row of ``s·G·Bᵀ`` NaN, the Adam moments keep it forever, and ``W`` gets it at the next
write. The per-group option ``nonfinite`` decides what to do:

``"skip"`` (default)
    The parameter with the bad gradient is not stepped this time: ``W``, factors, moments,
    step counts, random draws and rounding draws stay exactly as they were (other parameters
    step normally), and the parameter's ``nonfinite_skips`` counter (a 0-dim int64 tensor in the
    optimizer state, so it checkpoints) goes up by one. The decision is taken **on the device**:
    no host read, so the step can be compiled whole and captured in a CUDA graph
    (:mod:`lora_optim.engine`). A :class:`NonFiniteGradientWarning` names every skipped
    parameter when the counts are next read on the host: at once after a step on the CPU
    (reading there costs nothing), and on an accelerator or in a compiled step at the next
    ``nonfinite_skips()``, ``state_dict()`` or step that reads the host anyway (``"raise"``
    groups, an ``svd`` refresh, a gradient init).
``"raise"``
    :meth:`LoRAAdam.step` raises :class:`NonFiniteGradientError` before changing anything at
    all (no parameter of any group is stepped). It reads the flags on the host: the one mode
    with a host sync in every step (a compiled step breaks its graph there).

What is checked, for every parameter that has a gradient this step: the factor gradients, the
factors and their Adam moments (a state that overflowed earlier must not reach ``W``), and ``G``
itself only where a step reads ``G`` other than through the projection (an ``svd`` refresh, the
first step of ``init="gradient"``: an SVD of ``G``), or where the projection does not declare
that every NaN/Inf of ``G`` reaches its factor gradients
(:attr:`Projection.grad_nonfinite_propagates
<lora_optim.projections.Projection.grad_nonfinite_propagates>`). Every built-in projection
declares it: each entry of ``G`` enters the factor gradients through a product with a factor
entry or a plain sum, and IEEE arithmetic keeps a NaN or Inf there (``0·NaN`` and ``0·Inf`` are
NaN, ``Inf + (−Inf)`` is NaN), so a zero factor cannot hide one (``tests/test_nonfinite.py``
puts a NaN and an Inf at every position of ``G``). That saves the one extra read of ``G`` a step
used to make (a third of the CPU step at 4096²).

The check is :func:`finite_table`: one fused reduction per list, ``torch._foreach_norm(·, 2)``
accumulated in float64 (NaN and ``±Inf`` propagate; finite fp32/bf16/fp16 values cannot
overflow a float64 sum of squares), and one stack, on the device. :class:`FiniteCheck` is the
host-side answer (one read per device) for ``"raise"`` groups and for tools.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lora_optim.kernels.paths import cpu_paths

__all__ = [
    "NONFINITE_POLICIES",
    "finite_table",
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
    device (e.g. ``found_inf == 0`` of a ``GradScaler``). :meth:`read` screens every list of
    one device and dtype with one ``torch._foreach_norm`` (the 2-norm: NaN and ``±Inf``
    propagate, and it runs at memory speed on every device, where the inf-norm does not on the
    CPU) and copies the device's answers to the host in one transfer: the only host sync of a
    step with finite gradients. A 2-norm can overflow on finite values (entries above ~1e19 in
    fp32); only then are the tensors it flagged checked again exactly, one ``torch.aminmax``
    each, in a second read, so a huge but finite gradient is never taken for a NaN.

    ``add(key, tensors, group=g)`` checks tensors that are one rank's part of something sharded
    over the process group ``g`` (FSDP2): their answers are combined over the ranks of ``g`` by
    one small all-reduce before the host read, so every rank gets the same answer. Every rank
    must add the same grouped keys, with the same number of tensors each, in the same order.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[object, Tensor, object]] = []  # (key, tensor, group)
        self._flags: dict[torch.device, list[tuple[object, Tensor]]] = {}
        self._keys: list[object] = []

    def add(self, key: object, tensors: Sequence[Tensor], group: object = None) -> None:
        """Check ``tensors`` (any shapes, devices, float dtypes) under ``key``; ``group``: see the
        class docstring."""
        self._keys.append(key)
        for tensor in tensors:
            if group is not None:
                # Kept even when empty (a rank may hold no rows): the ranks' lists must align.
                self._entries.append((key, tensor if tensor.numel() else tensor.new_zeros(1), group))
            elif tensor.numel():
                self._entries.append((key, tensor, None))

    def add_flag(self, key: object, ok: Tensor) -> None:
        """``key`` is finite only if the 0-dim bool tensor ``ok`` is true."""
        self._keys.append(key)
        self._flags.setdefault(ok.device, []).append((key, ok.reshape(1)))

    @classmethod
    def _screen(cls, tensors: list[Tensor]) -> Tensor:
        """A bool per tensor (one device, one dtype): on an accelerator, its 2-norm is finite (one
        fused reduction for the list); on the CPU, the exact check (torch's per-tensor reductions
        are several times faster there than its list version: :mod:`lora_optim.kernels.paths`)."""
        if cpu_paths(tensors[0].device):
            return cls._exact(tensors)
        return torch.stack(torch._foreach_norm(tensors, 2.0)).isfinite()

    @staticmethod
    def _exact(tensors: list[Tensor]) -> Tensor:
        """A bool per tensor (one device): its smallest and largest entries are finite."""
        return torch.stack([torch.stack(torch.aminmax(t)).to(torch.float32) for t in tensors]).isfinite().all(dim=1)

    def _run(self, indices: list[int], check, flags: bool = False) -> dict[object, bool]:
        """``check`` over the entries ``indices`` (answers keyed by entry index), bucketed as the
        lists must be, and with ``flags`` the :meth:`add_flag` flags (keyed by their key, as
        ``("flag", key)``); one host read per device, after one all-reduce per process group for
        the grouped entries."""
        buckets: dict[tuple, list[int]] = {}
        for index in indices:
            _, tensor, group = self._entries[index]
            bucket = ("group", id(group), tensor.dtype) if group is not None else ("local", tensor.device, tensor.dtype)
            buckets.setdefault(bucket, []).append(index)
        per_device: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        grouped: dict[int, tuple[object, list[int], list[Tensor]]] = {}
        with torch.no_grad():
            for bucket, members in buckets.items():
                ok = check([self._entries[i][1] for i in members])
                if bucket[0] == "group":
                    group = self._entries[members[0]][2]
                    _, order, answers = grouped.setdefault(id(group), (group, [], []))
                    order.extend(members)
                    answers.append(ok)
                else:
                    order, answers = per_device.setdefault(ok.device, ([], []))
                    order.extend(members)
                    answers.append(ok)
            for group, members, answers in grouped.values():
                bad = (~torch.cat(answers)).to(torch.float32)
                torch.distributed.all_reduce(bad, group=group)  # a NaN on any rank is a NaN on every rank
                order, device_answers = per_device.setdefault(bad.device, ([], []))
                order.extend(members)
                device_answers.append(bad == 0)
            for device, entries in (self._flags.items() if flags else ()):
                order, device_answers = per_device.setdefault(device, ([], []))
                order.extend(("flag", key) for key, _ in entries)
                device_answers.append(torch.cat([ok for _, ok in entries]))
        result: dict[object, bool] = {}
        for order, answers in per_device.values():
            joined = answers[0] if len(answers) == 1 else torch.cat(answers)
            # A device-to-host read (a copy even on the CPU, so that a TorchDispatchMode counting
            # syncs sees it).
            result.update(zip(order, joined.to("cpu", copy=True).tolist()))
        return result

    def read(self) -> dict[object, bool]:
        """``{key: all finite}`` for every key added: one host transfer per device, and a second
        one only when the screen flagged something (see the class docstring)."""
        result = {key: True for key in self._keys}
        screened = self._run(list(range(len(self._entries))), self._screen, flags=True)
        for index, ok in screened.items():
            if isinstance(index, tuple) and not ok:  # a flag
                result[index[1]] = False
        suspects = [index for index, ok in screened.items() if not ok and not isinstance(index, tuple)]
        if suspects:
            for index, ok in self._run(suspects, self._exact).items():
                if not ok:
                    result[self._entries[index][0]] = False
        return result


def finite_table(rows: Sequence[Sequence[Tensor | None]], width: int, device: torch.device | str) -> Tensor:
    """Bool ``(len(rows), width)`` tensor on ``device``: entry ``[i, j]`` is whether ``rows[i][j]`` has
    only finite entries (``None`` and missing entries: true), computed on the device with no host
    read. Every tensor must be on ``device``; each row holds at most ``width`` tensors.

    One ``torch._foreach_norm(·, 2, dtype=float64)`` over every tensor (NaN and ``±Inf``
    propagate into the norm; a finite fp32, bf16 or fp16 tensor cannot overflow it; float64
    entries above ~1e154 would, and are then reported as not finite) and one ``stack``.
    """
    tensors: list[Tensor] = []
    slots: list[int] = []  # where each row entry's norm sits in `norms`, -1: finite by definition
    for row in rows:
        if len(row) > width:
            raise ValueError(f"finite_table: a row has {len(row)} tensors, more than width={width}")
        for tensor in row:
            if tensor is None:
                slots.append(-1)
            else:
                slots.append(len(tensors))
                tensors.append(tensor)
        slots.extend([-1] * (width - len(row)))
    if not rows:
        return torch.ones(0, width, dtype=torch.bool, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float64) if tensors else []
    return torch.stack([zero if slot < 0 else norms[slot] for slot in slots]).view(len(rows), width).isfinite()


def finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """``[t has only finite entries for t in tensors]``: one fused reduction per device and dtype,
    one host read per device (empty tensors are finite)."""
    check = FiniteCheck()
    for index, tensor in enumerate(tensors):
        check.add(index, [tensor])
    flags = check.read()
    return [flags[index] for index in range(len(tensors))]
