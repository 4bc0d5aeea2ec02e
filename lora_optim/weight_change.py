"""The pending change ``s·ΔW`` of one parameter, as the step engine hands it to a write mode.

A :class:`WeightDelta` is what :meth:`lora_optim.precision.WeightWriter.write_` receives for each
weight. It adds rows of ``s·(Δ(A', B') − Δ(A, B))`` into any target:

``delta.add_to_(target, row_start=0)``
    adds rows ``row_start : row_start + len(target)`` of ``s·ΔW`` into ``target``, which may have
    the compute dtype (the factors') or a lower precision (a bf16 ``W`` or a block of its rows);
    with a lower precision each element is rounded to nearest once,
    ``target ← round(target + s·ΔW)``.

``delta.product()`` gives the change as a thin product ``L·R`` where the projection can
(:meth:`Projection.step_product <lora_optim.projections.Projection.step_product>`), so that the
rounding write modes update ``W`` in one pass.

So ``nearest`` on a bf16 ``W`` is ``delta.add_to_(W)`` (no temporary at all on the CPU, where the
compiled kernels round in place), and a write mode that needs ``s·ΔW`` itself in full precision
(compensated, stochastic) takes it one block of rows at a time
(:func:`lora_optim.kernels.blocks.row_blocks`)::

    for start, stop in row_blocks(rows, cols, delta.compute_dtype, W.device):
        buffer = compensation[start:stop].to(delta.compute_dtype)
        delta.add_to_(buffer, start)
        ...  # round buffer + W[start:stop] into W[start:stop]
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_optim.kernels.blocks import row_blocks
from lora_optim.projections.base import FactorChange, Projection
from lora_optim.sparsity import unpack_mask

__all__ = ["WeightDelta", "MaskedWeightDelta", "weight_delta"]


class WeightDelta:
    """``s·(Δ(A', B') − Δ(A, B))`` of one parameter, not yet written (see the module docstring)."""

    __slots__ = ("projection", "change", "scale")

    def __init__(self, projection: Projection, change: FactorChange, scale: float) -> None:
        self.projection = projection
        self.change = change
        self.scale = scale

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the change is formed in (the factors')."""
        return self.change.A.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight matrix."""
        return self.change.A.shape[0], self.change.B.shape[1]

    def add_to_(self, target: Tensor, row_start: int = 0) -> None:
        """Add rows ``row_start : row_start + len(target)`` of ``s·ΔW`` into ``target`` (compute
        dtype, or lower precision: then rounded to nearest once per element)."""
        self.projection.add_delta_(target, self.change, self.scale, row_start)

    def product(self, row_start: int = 0, rows: int | None = None) -> tuple[Tensor, Tensor] | None:
        """``(L, R)`` with ``ΔW = L·R`` on rows ``row_start : row_start + rows`` (so ``s·ΔW`` is
        ``scale·L·R``), or ``None`` when the change is not a thin product
        (:meth:`Projection.step_product <lora_optim.projections.Projection.step_product>`)."""
        return self.projection.step_product(self.change, row_start, rows)

    @property
    def row_offset(self) -> int:
        """Global index of the weight's first row (non-zero on a row shard)."""
        return self.change.row_offset


class MaskedWeightDelta(WeightDelta):
    """``(s·(Δ(A', B') − Δ(A, B))) ⊙ M``: the change of a ``preserve_sparsity=True`` parameter
    (:mod:`lora_optim.sparsity`), with ``M`` its packed mask (uint8 ``out×⌈in/8⌉``).

    ``add_to_`` adds exactly ``0`` where ``M`` is false, so every write mode keeps those entries
    of ``W`` (and of its own buffers) as they are. The change is formed one block of rows at a
    time (:func:`~lora_optim.kernels.blocks.row_blocks`) in the compute dtype, masked, and added
    into ``target`` (rounded once per element into a lower precision).
    """

    __slots__ = ("mask",)

    def __init__(self, projection: Projection, change: FactorChange, scale: float, mask: Tensor) -> None:
        super().__init__(projection, change, scale)
        self.mask = mask

    def product(self, row_start: int = 0, rows: int | None = None) -> None:
        """``None``: a masked change is not a thin product."""
        return None

    def add_to_(self, target: Tensor, row_start: int = 0) -> None:
        """Add rows ``row_start : row_start + len(target)`` of ``(s·ΔW) ⊙ M`` into ``target``."""
        rows, cols = target.shape
        for start, stop in row_blocks(rows, cols, self.compute_dtype, target.device):
            block = torch.zeros(stop - start, cols, dtype=self.compute_dtype, device=target.device)
            self.projection.add_delta_(block, self.change, self.scale, row_start + start)
            block.mul_(unpack_mask(self.mask[row_start + start : row_start + stop], cols))
            target[start:stop].add_(block)


def weight_delta(projection: Projection, change: FactorChange, scale: float, mask: Tensor | None) -> WeightDelta:
    """The change a write receives for a step ``change`` of the factors: ``s·(Δ(A', B') − Δ(A, B))``,
    masked by the packed ``mask`` (:class:`MaskedWeightDelta`) when the group has
    ``preserve_sparsity=True`` (:func:`lora_optim.sparsity.sparsity_mask`), else plain."""
    if mask is None:
        return WeightDelta(projection, change, scale)
    return MaskedWeightDelta(projection, change, scale, mask)
