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

from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import add_in_row_blocks_, row_blocks
from lora_optim.projections import register_projection
from lora_optim.projections.base import FactorState, Projection

__all__ = [
    "AdditiveProjection",
    "fold_columns",
    "fold_rows",
    "spread_columns_",
    "spread_rows_",
    "additive_project",
    "additive_add_delta_",
]


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


def additive_project(grad: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(fold_columns(G, r), fold_rows(G, r))`` in ``dtype``: the unscaled factor gradients.

    ``grad`` may have a lower precision than ``dtype`` (a bf16 ``G``): it is converted one block
    of rows at a time, never whole. On the CPU one pass over ``G`` forms both sums
    (:mod:`lora_optim.kernels`). The paths agree to float rounding.
    """
    kernels = native_kernels()
    if kernels is not None and kernels.supports(grad, dtype):
        return kernels.fold_additive(grad, rank, dtype)
    if grad.dtype == dtype:
        return fold_columns(grad, rank), fold_rows(grad, rank)
    grad_A = torch.empty(grad.shape[0], rank, dtype=dtype, device=grad.device)
    grad_B = torch.zeros(rank, grad.shape[1], dtype=dtype, device=grad.device)
    # Blocks start at multiples of r, so a block's row i mod r is the matrix's.
    for start, stop in row_blocks(grad.shape[0], grad.shape[1], dtype, multiple=rank):
        block = grad[start:stop].to(dtype)
        grad_A[start:stop] = fold_columns(block, rank)
        grad_B += fold_rows(block, rank)
    return grad_A, grad_B


def additive_add_delta_(target: Tensor, dA: Tensor, dB: Tensor, scale: float, *, row_start: int = 0) -> None:
    """``target[i, j] += s·(dA[i, j mod r] + dB[i mod r, j])`` for the rows
    ``row_start : row_start + len(target)`` of ``W`` that ``target`` holds.

    ``target`` may have ``dA``'s dtype or a lower precision (a bf16 ``W``); then each element is
    rounded to nearest once, with no weight-sized temporary. On the CPU one pass reads and
    writes each element once (:mod:`lora_optim.kernels`); elsewhere two broadcast adds.
    """
    rank = dA.shape[1]
    columns = dA[row_start : row_start + target.shape[0]]
    # Row i of target is row row_start + i of W: it takes dB[(row_start + i) mod r].
    rows = dB.roll(-(row_start % rank), dims=0) if row_start % rank else dB
    kernels = native_kernels()
    if kernels is not None and kernels.supports(target, dA.dtype):
        kernels.spread_additive_(target, columns, rows, scale)
        torch.autograd.graph.increment_version(target)  # as an in-place torch op would
        return

    def add_rows_(buffer: Tensor, start: int) -> None:
        spread_columns_(buffer, columns[start : start + buffer.shape[0]], scale)
        spread_rows_(buffer, rows, scale)

    add_in_row_blocks_(target, dA.dtype, add_rows_, multiple=rank)


@register_projection
class AdditiveProjection(Projection):
    """Additive block decomposition ``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}`` (see module docstring)."""

    name = "additive"
    #: :meth:`project` takes a ``G`` of lower precision than the factors (the optimizer then
    #: skips its weight-sized cast of a bf16 ``G``).
    accepts_low_precision_grad = True

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
        """Block row and column sums of ``G``, times ``s``; ``grad`` may be of lower precision."""
        grad_A, grad_B = additive_project(grad, A.shape[1], A.dtype)
        if scale != 1.0:
            grad_A.mul_(scale)
            grad_B.mul_(scale)
        return grad_A, grad_B

    def project_activations(
        self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor, scale: float
    ) -> tuple[Tensor, Tensor]:
        """``(s·δYᵀ·fold(X), s·fold(δY)ᵀ·X)`` without forming ``G = δYᵀX``.

        ``fold`` sums the feature columns with equal index mod ``r`` (:func:`fold_columns`):
        ``Σ_{j≡k} G_ij = Σ_n δY_ni·fold(X)_nk`` and ``Σ_{i≡k} G_ij = Σ_n fold(δY)_nk·X_nj``.
        """
        rank = A.shape[1]
        # (fold(X)ᵀ·δY)ᵀ: BLAS is faster with r rows than with r columns (see lowrank_project_activations).
        grad_A = torch.mm(fold_columns(inputs, rank).t(), output_grads).t()
        grad_B = torch.mm(fold_columns(output_grads, rank).t(), inputs)
        if scale != 1.0:
            grad_A.mul_(scale)
            grad_B.mul_(scale)
        return grad_A, grad_B

    def add_delta_(self, target: Tensor, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
        """``target += s·(dA[:, j mod r] + dB[i mod r, :])`` (``ΔW`` is linear in the factors)."""
        additive_add_delta_(target, dA, dB, scale)

    def add_delta_rows_(
        self, target: Tensor, row_start: int, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float
    ) -> None:
        """Rows ``row_start : row_start + len(target)`` of the change, into a target of the factor
        dtype or of lower precision (rounded once per element); see :func:`additive_add_delta_`."""
        additive_add_delta_(target, dA, dB, scale, row_start=row_start)

    def probe_delta(self, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float, probes: Tensor) -> Tensor:
        """``s·(δA·fold_rows(X) + spread_rows(δB·X))`` in fp64, where ``δA = (A + dA) − A`` is the
        change of the stored factor: ``Σ_j δA[i, j mod r]·X[j] = (δA·fold_rows(X))[i]``."""
        rank = A.shape[1]
        step_A = (A + dA).to(probes.dtype) - A.to(probes.dtype)
        step_B = (B + dB).to(probes.dtype) - B.to(probes.dtype)
        change = step_A @ fold_rows(probes, rank)
        spread_rows_(change, step_B @ probes, 1.0)
        return change.mul_(scale)
