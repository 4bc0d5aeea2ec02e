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
to ``W``. On the CPU one pass over ``G`` forms both sums and one pass over ``W`` writes the change
(:mod:`lora_optim.kernels`). Elsewhere both are GEMMs with the constant block-identity matrices,
``(G·E_cᵀ, E_rᵀ·G)`` and ``W += s·[dA, E_r]·[E_c; dB]``: the same shape of work as ``lora`` (one
read of ``G``, one read and write of ``W``), in a fixed handful of launches whatever ``r``
divides. ``ΔW`` can have rank up to ``2r`` for ``2r`` factor
columns (LoRA's ``A·B`` has rank at most ``r``). Both factors start at zero, so training starts
exactly at ``W``. State: ``A``, ``B``. Any ``out``, ``in`` works, divisible by ``r`` or not.
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from lora_optim import initial_factors
from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import row_blocks
from lora_optim.kernels.product import add_thin_product_
from lora_optim.projections.registry import register_projection
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.state_keys import FACTOR_A, FACTOR_B

__all__ = [
    "AdditiveProjection",
    "block_identity",
    "fold_columns",
    "fold_rows",
    "spread_rows_",
    "additive_project",
    "additive_step_product",
    "additive_add_delta_",
]

_BLOCK_IDENTITIES: dict[tuple, Tensor] = {}


def block_identity(size: int, rank: int, *, dtype: torch.dtype, device: torch.device, transposed: bool = False) -> Tensor:
    """``E`` of shape ``size×r`` with ``E[i, k] = 1`` if ``i mod r == k`` else 0, or its transpose
    (``r×size``, contiguous) if ``transposed``. Cached per shape, dtype and device; read-only.

    ``G·E`` sums the columns of ``G`` with equal index mod ``r``, and ``Eᵀ·G`` its rows.
    """
    key = (size, rank, dtype, torch.device(device), transposed)
    compiling = torch.compiler.is_compiling()  # inside a compiled step: made in the graph, not cached
    cached = None if compiling else _BLOCK_IDENTITIES.get(key)
    if cached is None:
        index = torch.arange(size, device=device)
        cached = (index.remainder(rank).unsqueeze(1) == torch.arange(rank, device=device)).to(dtype)
        if transposed:
            cached = cached.t().contiguous()
        if not compiling:
            if len(_BLOCK_IDENTITIES) > 256:  # a bound, for programs that see many shapes
                _BLOCK_IDENTITIES.clear()
            _BLOCK_IDENTITIES[key] = cached
    return cached


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


def spread_rows_(target: Tensor, rows: Tensor, scale: float) -> None:
    """``target[i, j] += scale·rows[i mod r, j]`` in place (``rows`` is r×in)."""
    rank = rows.shape[0]
    blocks, rest = divmod(target.shape[0], rank)
    target[: blocks * rank].unflatten(0, (blocks, rank)).add_(rows.unsqueeze(0), alpha=scale)
    if rest:
        target[blocks * rank :].add_(rows[:rest], alpha=scale)


def additive_project(grad: Tensor, rank: int, dtype: torch.dtype, row_offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(Σ_{j≡k mod r} G_ij, Σ_{i≡k mod r} G_ij)`` in ``dtype``: the factor gradients at ``s = 1``.

    ``grad`` may have a lower precision than ``dtype`` (a bf16 ``G``). On the CPU one pass over
    ``G`` forms both sums in ``G``'s own dtype (:mod:`lora_optim.kernels`); elsewhere two GEMMs
    with the block identities (:func:`block_identity`), after converting a low-precision ``G``
    block by block. The paths agree to float rounding. ``row_offset`` is the global index of
    ``grad``'s first row (a row shard): the row sums go to the classes ``(row_offset + i) mod r``.
    """
    kernels = native_kernels()
    if kernels is not None and kernels.supports(grad, dtype):
        grad_A, grad_B = kernels.fold_additive(grad, rank, dtype)
    else:
        grad_A, grad_B = _additive_project_torch(grad, rank, dtype)
    # Local row i belongs to the class (row_offset + i) mod r: rotate the classes.
    return grad_A, (grad_B.roll(row_offset % rank, dims=0) if row_offset % rank else grad_B)


def _additive_project_torch(grad: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    out_features, in_features = grad.shape
    columns = block_identity(in_features, rank, dtype=dtype, device=grad.device)  # in×r
    rows_t = block_identity(out_features, rank, dtype=dtype, device=grad.device, transposed=True)  # r×out
    if grad.dtype == dtype:
        return torch.mm(grad, columns), torch.mm(rows_t, grad)
    blocks = list(row_blocks(out_features, in_features, dtype, grad.device))
    if len(blocks) == 1:
        wide = grad.to(dtype)
        return torch.mm(wide, columns), torch.mm(rows_t, wide)
    grad_A = torch.empty(out_features, rank, dtype=dtype, device=grad.device)
    grad_B = torch.zeros(rank, in_features, dtype=dtype, device=grad.device)
    for start, stop in blocks:
        block = grad[start:stop].to(dtype)
        torch.mm(block, columns, out=grad_A[start:stop])
        grad_B.addmm_(rows_t[:, start:stop], block)
    return grad_A, grad_B


def additive_add_delta_(
    target: Tensor, dA: Tensor, dB: Tensor, scale: float, row_start: int = 0, row_offset: int = 0
) -> None:
    """``target[i, j] += s·(dA[i, j mod r] + dB[g mod r, j])`` for the rows
    ``row_start : row_start + len(target)`` of ``dA`` that ``target`` holds, where
    ``g = row_offset + row_start + i`` is the row's index in the whole weight (``row_offset``:
    the global index of ``dA``'s first row, non-zero on a row shard).

    ``target`` may have ``dA``'s dtype or a lower precision (a bf16 ``W``); then each element is
    rounded to nearest once. On the CPU one pass reads and writes each element once
    (:mod:`lora_optim.kernels`); elsewhere one GEMM, ``s·[dA, E_r]·[E_c; dB]``, into ``target``
    (or into one temporary of its size for a lower precision).
    """
    kernels = native_kernels()
    if kernels is not None and kernels.supports(target, dA.dtype):
        columns = dA if target.shape[0] == dA.shape[0] else dA[row_start : row_start + target.shape[0]]
        kernels.spread_additive_(target, columns, _rotated_rows(dB, row_start, row_offset), scale)
        torch.autograd.graph.increment_version(target)  # as an in-place torch op would
        return
    left, right = additive_step_product(dA, dB, row_start, target.shape[0], row_offset)
    add_thin_product_(target, left, right, scale)


def _rotated_rows(dB: Tensor, row_start: int, row_offset: int) -> Tensor:
    # Row i of a target starting at global row g0 = row_offset + row_start takes dB[(g0 + i) mod r]:
    # rotate dB to start there.
    shift = (row_offset + row_start) % dB.shape[0]
    return dB.roll(-shift, dims=0) if shift else dB


def additive_step_product(
    dA: Tensor, dB: Tensor, row_start: int = 0, rows: int | None = None, row_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """``([dA, E_r], [E_c; dB])``: the change ``dA[i, j mod r] + dB[g mod r, j]`` as a product of inner
    size ``2r`` for the rows ``row_start : row_start + rows`` of ``dA`` (``rows=None``: through the
    last), ``g`` the global row index (``row_offset``: that of ``dA``'s first row). ``E_r`` and
    ``E_c`` are the block identities of :func:`block_identity` (``[i ≡ k mod r]``)."""
    rank = dA.shape[1]
    stop = dA.shape[0] if rows is None else row_start + rows
    columns = dA if (row_start, stop) == (0, dA.shape[0]) else dA[row_start:stop]
    block_rows = block_identity(stop - row_start, rank, dtype=dA.dtype, device=dA.device)  # rows×r
    left = torch.cat((columns, block_rows), dim=1)
    right = torch.cat((block_identity(dB.shape[1], rank, dtype=dB.dtype, device=dB.device, transposed=True),
                       _rotated_rows(dB, row_start, row_offset)), dim=0)
    return left, right


@register_projection
class AdditiveProjection(Projection):
    """Additive block decomposition ``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}`` (see module docstring)."""

    name = "additive"
    accepts_low_precision_grad = True
    supports_row_sharding = True  # the row folds use global row indices (row_offset)
    grad_nonfinite_propagates = True  # every G_ij enters a row sum and a column sum

    def init_state(self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group) -> FactorState:
        """``A`` (out×r) and ``B`` (r×in), both zero (so the base is ``W`` itself)."""
        out_features, in_features = weight.shape
        state = {
            FACTOR_A: torch.zeros(out_features, rank, dtype=factor_dtype, device=weight.device),
            FACTOR_B: torch.zeros(rank, in_features, dtype=factor_dtype, device=weight.device),
        }
        initial_factors.record_(state, state[FACTOR_A], state[FACTOR_B], zero=True, keep=False)
        return state

    def current_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``."""
        return state[FACTOR_A], state[FACTOR_B]

    def project(self, grad: Tensor, A: Tensor, B: Tensor, *, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Block row and column sums of ``G``; ``grad`` may be of lower precision. On a row shard
        the row sums are this rank's part, in the classes of the global row indices."""
        return additive_project(grad, A.shape[1], A.dtype, row_offset)

    def project_activations(self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(δYᵀ·fold(X), fold(δY)ᵀ·X)`` without forming ``G = δYᵀX``.

        ``fold`` sums the feature columns with equal index mod ``r`` (:func:`fold_columns`):
        ``Σ_{j≡k} G_ij = Σ_n δY_ni·fold(X)_nk`` and ``Σ_{i≡k} G_ij = Σ_n fold(δY)_nk·X_nj``.
        """
        rank = A.shape[1]
        # (fold(X)ᵀ·δY)ᵀ: BLAS is faster with r rows than with r columns (see lowrank_project_activations).
        grad_A = torch.mm(fold_columns(inputs, rank).t(), output_grads).t()
        grad_B = torch.mm(fold_columns(output_grads, rank).t(), inputs)
        return grad_A, grad_B

    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += s·(dA[:, j mod r] + dB[i mod r, :])`` (``ΔW`` is linear in the factors)."""
        additive_add_delta_(target, change.dA, change.dB, scale, row_start, change.row_offset)

    def step_product(
        self, change: FactorChange, row_start: int = 0, rows: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``([dA, E_r], [E_c; dB])`` (:func:`additive_step_product`)."""
        return additive_step_product(change.dA, change.dB, row_start, rows, change.row_offset)

    def record_base_(self, state: FactorState, group) -> None:
        """Record the stored factors as the base's (zero if both are all zeros; one host read)."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        initial_factors.record_(state, A, B, zero=not (bool(A.any()) or bool(B.any())),
                                keep=group.get("keep_initial_factors", False))

    def initial_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor] | None:
        """Zeros for a zero base, the kept ``(A0, B0)``, or ``None`` if unknown."""
        if initial_factors.status(state) == initial_factors.ZERO:
            return torch.zeros_like(state[FACTOR_A]), torch.zeros_like(state[FACTOR_B])
        kept = initial_factors.kept_factors(state)
        return None if kept is None else (kept[0].clone(), kept[1].clone())

    def change_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor] | None:
        """``ΔW = dA·E_c + E_r·dB = [dA, E_r]·[E_c; dB]`` with ``dA = A − A0``, ``dB = B − B0``: exact
        LoRA factors of inner size ``2r`` (the block identities ``E_r``, ``E_c`` of the module
        docstring). ``None`` if the base is unknown."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        initial = self.initial_factors(state, group)
        if initial is None:
            return None
        dA, dB = A - initial[0], B - initial[1]
        rank = A.shape[1]
        rows = block_identity(A.shape[0], rank, dtype=A.dtype, device=A.device)  # E_r, out×r
        columns = block_identity(B.shape[1], rank, dtype=B.dtype, device=B.device, transposed=True)  # E_c, r×in
        return torch.cat((dA, rows), dim=1), torch.cat((columns, dB), dim=0)

    def probe_delta(self, change: FactorChange, scale: float, probes: Tensor) -> Tensor:
        """``s·(dA·fold_rows(X) + spread_rows(dB·X))`` in fp64, with the stored steps ``dA``, ``dB``:
        ``Σ_j dA[i, j mod r]·X[j] = (dA·fold_rows(X))[i]``."""
        rank = change.A.shape[1]
        step_A = change.A_new.to(probes.dtype) - change.A.to(probes.dtype)
        step_B = change.B_new.to(probes.dtype) - change.B.to(probes.dtype)
        result = step_A @ fold_rows(probes, rank)
        spread_rows_(result, step_B @ probes, 1.0)
        return result.mul_(scale)
