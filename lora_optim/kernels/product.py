"""``target += s·L·R`` for a thin product (``L``: ``n×k``, ``R``: ``k×m``, ``k`` a few times ``r``):
the torch forms of the weight-change pass, for code paths without the native kernels.

Eager code takes one ``addmm_`` (the GEMM library's pass over ``target``), or one GEMM into a
temporary of ``target``'s size for a lower-precision ``target``. Compiled code on the CPU takes
``Σ_k L[:, k]·R[k, :]`` written as a broadcast sum, which inductor fuses, with any pointwise
work that follows (rounding, random bits), into one pass over ``target`` (measured against the
``addmm`` form in ``benchmarks/step.py``: about half the time for a bf16 stochastic write);
on an accelerator it keeps the ``addmm`` (a library GEMM) and fuses what follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["thin_product", "add_thin_product_"]

#: Largest inner size ``k`` written as a broadcast sum in compiled CPU code.
BROADCAST_INNER = 64


def _broadcast(left: Tensor, right: Tensor, target: Tensor) -> bool:
    return (torch.compiler.is_compiling() and target.device.type == "cpu" and left.shape[1] <= BROADCAST_INNER)


def thin_product(left: Tensor, right: Tensor) -> Tensor:
    """``L·R`` in ``L``'s dtype (a broadcast sum inside compiled CPU code, else ``torch.mm``)."""
    if _broadcast(left, right, left):
        return (left.unsqueeze(2) * right.unsqueeze(0)).sum(1)
    return torch.mm(left, right)


def add_thin_product_(target: Tensor, left: Tensor, right: Tensor, scale: float) -> None:
    """``target += scale·left·right`` in place; ``target`` has ``left``'s dtype or a lower precision
    (then each element is rounded once)."""
    if _broadcast(left, right, target):
        target.add_((left.unsqueeze(2) * right.unsqueeze(0)).sum(1), alpha=scale)
    elif target.dtype == left.dtype:
        target.addmm_(left, right, alpha=scale)
    else:
        target.add_(torch.mm(left, right), alpha=scale)
