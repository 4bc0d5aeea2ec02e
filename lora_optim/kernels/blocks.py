"""Row blocks: how the torch path bounds its weight-sized temporaries.

Where a full-precision copy of a low-precision ``G`` or ``W`` is needed (a bf16 weight with fp32
factors, a compensated or stochastic write), the torch path works on blocks of whole rows. On the
CPU a block is about :data:`CPU_BLOCK_BYTES` in the compute dtype, so it stays in cache between
its conversion and its use and the extra memory is one block. On an accelerator every block is a
kernel launch, and launches are what a step of many matrices costs there, so a block is up to
:data:`DEVICE_BLOCK_BYTES`: one block for any weight of a 7B-class model (11008×4096 in fp32 is
172 MiB), at the price of one transient buffer of the weight's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lora_optim.kernels.paths import cpu_paths

__all__ = ["CPU_BLOCK_BYTES", "DEVICE_BLOCK_BYTES", "block_bytes", "row_blocks"]

#: Size of one block of rows in the compute dtype on the CPU.
CPU_BLOCK_BYTES = 1 << 20
#: Size of one block of rows in the compute dtype on other devices.
DEVICE_BLOCK_BYTES = 1 << 28


def block_bytes(device: torch.device) -> int:
    """Bytes of one block of rows on ``device`` (see the module docstring; an accelerator's size
    within :func:`lora_optim.kernels.paths.accelerator_paths`)."""
    return CPU_BLOCK_BYTES if cpu_paths(device) else DEVICE_BLOCK_BYTES


def row_blocks(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device | str = "cpu", *, multiple: int = 1,
    block_bytes_: int | None = None,
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row blocks covering ``rows`` rows of ``cols`` columns, each
    about :func:`block_bytes` (or ``block_bytes_``) in ``dtype``; every ``start`` is a multiple of
    ``multiple``. The blocks depend on the shape, dtype and device type only, so seeded rounding
    over them is reproducible."""
    budget = block_bytes(torch.device(device)) if block_bytes_ is None else block_bytes_
    row_bytes = max(1, cols * dtype.itemsize)
    step = max(1, budget // row_bytes // multiple) * multiple
    for start in range(0, rows, step):
        yield start, min(rows, start + step)
