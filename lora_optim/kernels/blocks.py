"""Row blocks: the torch path's way to avoid weight-sized temporaries.

Where a full-precision copy of a low-precision ``G`` or ``W`` would be needed (a bf16 weight
with fp32 factors), the torch path converts one block of rows at a time; a block is about
:data:`BLOCK_BYTES` in the compute dtype, so it stays in cache between the conversion and its
use, and the extra memory is one block instead of one weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["BLOCK_BYTES", "row_blocks", "add_in_row_blocks_"]

#: Size of one block of rows in the compute dtype.
BLOCK_BYTES = 1 << 20


def row_blocks(
    rows: int, cols: int, dtype: torch.dtype, *, multiple: int = 1, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row blocks covering ``rows`` rows of ``cols`` columns,
    each about ``block_bytes`` in ``dtype``; every ``start`` is a multiple of ``multiple``."""
    row_bytes = max(1, cols * torch.empty((), dtype=dtype).element_size())
    step = max(1, block_bytes // row_bytes // multiple) * multiple
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def add_in_row_blocks_(
    target: Tensor, compute_dtype: torch.dtype, add_rows_: Callable[[Tensor, int], None], *, multiple: int = 1
) -> None:
    """``target ← round(target + Δ)`` where ``add_rows_(buffer, row_start)`` adds rows
    ``row_start:row_start+len(buffer)`` of ``Δ`` into a ``compute_dtype`` buffer.

    A target of ``compute_dtype`` is passed straight through; a lower-precision one goes
    through one block-sized buffer at a time, each element rounded once to ``target``'s dtype
    (as ``target.add_(delta)`` rounds). Block starts are multiples of ``multiple``.
    """
    if target.dtype == compute_dtype:
        add_rows_(target, 0)
        return
    for start, stop in row_blocks(target.shape[0], target.shape[1], compute_dtype, multiple=multiple):
        buffer = target[start:stop].to(compute_dtype)
        add_rows_(buffer, start)
        target[start:stop].copy_(buffer)
