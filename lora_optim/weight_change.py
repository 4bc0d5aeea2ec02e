"""The pending change ``s·ΔW`` of one parameter, as the optimizer hands it to a write mode.

A :class:`WeightChange` is what :meth:`lora_optim.precision.WeightWriter.write_` receives as
``add_delta``. It is callable exactly as before — ``change(buffer)`` adds all of ``s·ΔW`` into a
buffer of ``W``'s shape in the compute dtype — and it adds one method that lets a writer avoid
weight-sized temporaries:

``change.add_rows_(target, row_start=0)``
    adds rows ``row_start : row_start + len(target)`` of ``s·ΔW`` into ``target``, which may have
    the compute dtype or a lower precision than it (a bf16 ``W`` or a slice of it). With a lower
    precision each element is rounded to nearest once, ``target ← round(target + s·ΔW)``.

So ``nearest`` on a bf16 ``W`` is ``change.add_rows_(W)`` (no temporary at all: the CPU kernels
round in place), and a writer that needs ``s·ΔW`` itself in full precision (compensated,
stochastic) can take it one block of rows at a time::

    for start, stop in row_blocks(rows, cols, compute_dtype):   # lora_optim.kernels.blocks
        buffer = torch.zeros(stop - start, cols, dtype=compute_dtype)
        change.add_rows_(buffer, start)
        ...  # round buffer + W[start:stop] into W[start:stop]

The rows come from the projection's optional ``add_delta_rows_(target, row_start, A, B, dA, dB,
scale)`` (every built-in projection has it); for a projection without it, ``add_rows_`` forms
the whole change once in a buffer and adds the requested rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_optim.projections.base import Projection

__all__ = ["WeightChange"]


class WeightChange:
    """``s·(Δ(A+dA, B+dB) − Δ(A, B))`` of one parameter, not yet written (see module docstring)."""

    __slots__ = ("projection", "A", "B", "dA", "dB", "scale")

    def __init__(self, projection: Projection, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
        self.projection = projection
        self.A, self.B, self.dA, self.dB = A, B, dA, dB
        self.scale = scale

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the change is formed in (the factors')."""
        return self.A.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight matrix."""
        return self.A.shape[0], self.B.shape[1]

    def __call__(self, buffer: Tensor) -> None:
        """Add all of ``s·ΔW`` into ``buffer`` (``W``'s shape, compute dtype)."""
        self.projection.add_delta_(buffer, self.A, self.B, self.dA, self.dB, self.scale)

    def add_rows_(self, target: Tensor, row_start: int = 0) -> None:
        """Add rows ``row_start : row_start + len(target)`` of ``s·ΔW`` into ``target`` (compute
        dtype, or lower precision: then rounded to nearest once per element)."""
        add_rows = getattr(self.projection, "add_delta_rows_", None)
        if add_rows is not None:
            add_rows(target, row_start, self.A, self.B, self.dA, self.dB, self.scale)
            return
        full = torch.zeros(self.shape, dtype=self.compute_dtype, device=target.device)
        self(full)
        target.add_(full[row_start : row_start + target.shape[0]])
