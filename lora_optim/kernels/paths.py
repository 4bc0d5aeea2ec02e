"""Which code path a device takes, and a switch to take an accelerator's on the CPU.

Some work is best shaped differently on the CPU and on an accelerator. On an accelerator a step
of many matrices costs kernel launches, so the step takes one launch per list of tensors or per
weight: whole-weight temporaries (:mod:`lora_optim.kernels.blocks`), one fused reduction per list
for the NaN/Inf check (:mod:`lora_optim.nonfinite`). On the CPU launches are cheap and cache and
wall time matter, so the same work runs in cache-sized blocks, with per-tensor reductions that
torch vectorises better than its list versions. The results agree to float rounding.

:func:`accelerator_paths` makes the CPU take the accelerator's paths within a block, so that the
ops a step would issue on a GPU can be counted on the CPU
(:class:`lora_optim.dispatch_count.DispatchCounter`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["cpu_paths", "accelerator_paths"]

_switch = threading.local()


def cpu_paths(device: torch.device | str) -> bool:
    """Whether work on ``device`` takes the CPU's paths (a CPU device, outside :func:`accelerator_paths`
    and outside ``torch.compile``d code, where inductor fuses the accelerator's shape of work)."""
    if torch.compiler.is_compiling():
        return False
    return torch.device(device).type == "cpu" and not getattr(_switch, "accelerator", False)


@contextmanager
def accelerator_paths() -> Iterator[None]:
    """Within the block (in this thread), CPU tensors take the paths an accelerator takes."""
    previous = getattr(_switch, "accelerator", False)
    _switch.accelerator = True
    try:
        yield
    finally:
        _switch.accelerator = previous
