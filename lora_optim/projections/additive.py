"""``additive``: the weight change ``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}``.

With ``A`` (out×r) and ``B`` (r×in), ``ΔW = A·E_c + E_r·B`` where ``E_c`` (r×in) and ``E_r``
(out×r) are stacks of ``r×r`` identity blocks (cut short when ``r`` does not divide the size).
For ``r = 1`` this is ``Δw_ij = u_i + v_j``. The gradients are block row and column sums of
``G = ∂L/∂W``:

.. math::

    \\frac{\\partial L}{\\partial A_{ik}} = s \\sum_{j \\equiv k \\ (\\mathrm{mod}\\ r)} G_{ij},
    \\qquad
    \\frac{\\partial L}{\\partial B_{kj}} = s \\sum_{i \\equiv k \\ (\\mathrm{mod}\\ r)} G_{ij}.

``ΔW`` is linear in the factors, so a step ``(dA, dB)`` adds ``s·(dA[:, j mod r] + dB[i mod r, :])``
to ``W`` by broadcasting, with no GEMM. ``ΔW`` can have rank up to ``2r`` for ``2r`` factor
columns (LoRA's ``A·B`` has rank at most ``r``). Both factors start at zero, so training starts
exactly at ``W``. State: ``A``, ``B``. Any ``out``, ``in`` works, divisible by ``r`` or not.
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from lora_optim.projections import register_projection
from lora_optim.projections.base import FactorState, Projection

__all__ = ["AdditiveProjection", "fold_columns", "fold_rows", "spread_columns_", "spread_rows_"]


def fold_columns(matrix: Tensor, rank: int) -> Tensor:
    """``out×r`` sums of the columns of ``matrix`` (out×in) with equal index mod ``rank``."""
    blocks, rest = divmod(matrix.shape[1], rank)
    folded = einops.reduce(matrix[:, : blocks * rank], "o (q k) -> o k", "sum", k=rank)
    if rest:
        folded[:, :rest] += matrix[:, blocks * rank :]
    return folded


def fold_rows(matrix: Tensor, rank: int) -> Tensor:
    """``r×in`` sums of the rows of ``matrix`` (out×in) with equal index mod ``rank``."""
    blocks, rest = divmod(matrix.shape[0], rank)
    folded = einops.reduce(matrix[: blocks * rank], "(q k) n -> k n", "sum", k=rank)
    if rest:
        folded[:rest] += matrix[blocks * rank :]
    return folded


def spread_columns_(target: Tensor, columns: Tensor, scale: float) -> None:
    """``target[i, j] += scale·columns[i, j mod r]`` in place (``columns`` is out×r)."""
    rank = columns.shape[1]
    blocks, rest = divmod(target.shape[1], rank)
    target[:, : blocks * rank].unflatten(1, (blocks, rank)).add_(columns.unsqueeze(1), alpha=scale)
    if rest:
        target[:, blocks * rank :].add_(columns[:, :rest], alpha=scale)


def spread_rows_(target: Tensor, rows: Tensor, scale: float) -> None:
    """``target[i, j] += scale·rows[i mod r, j]`` in place (``rows`` is r×in)."""
    rank = rows.shape[0]
    blocks, rest = divmod(target.shape[0], rank)
    target[: blocks * rank].unflatten(0, (blocks, rank)).add_(rows.unsqueeze(0), alpha=scale)
    if rest:
        target[blocks * rank :].add_(rows[:rest], alpha=scale)


@register_projection
class AdditiveProjection(Projection):
    """Additive block decomposition ``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}`` (see module docstring)."""

    name = "additive"

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group
    ) -> FactorState:
        """``A`` (out×r) and ``B`` (r×in), both zero."""
        out_features, in_features = weight.shape
        return {
            "A": torch.zeros(out_features, rank, dtype=factor_dtype, device=weight.device),
            "B": torch.zeros(rank, in_features, dtype=factor_dtype, device=weight.device),
        }

    def current_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``."""
        return state["A"], state["B"]

    def project(self, grad: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Block row and column sums of ``G``, times ``s``."""
        rank = A.shape[1]
        grad_A = fold_columns(grad, rank)
        grad_B = fold_rows(grad, rank)
        if scale != 1.0:
            grad_A.mul_(scale)
            grad_B.mul_(scale)
        return grad_A, grad_B

    def add_delta_(self, target: Tensor, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
        """``target += s·(dA[:, j mod r] + dB[i mod r, :])`` (``ΔW`` is linear in the factors)."""
        spread_columns_(target, dA, scale)
        spread_rows_(target, dB, scale)
