"""Truncated singular value decompositions: exact, or randomized from an int seed.

The factor inits of ``lora`` (``init="pissa"``, ``"minor"``, ``"gradient"``) and the ``svd``
projection need the top (or bottom) ``r`` singular triplets of an ``m×n`` matrix ``M``,

.. math::

    M = U\\,\\mathrm{diag}(S)\\,V^\\top, \\qquad
    M_r = U_{:, :r}\\,\\mathrm{diag}(S_{:r})\\,V_{:, :r}^\\top
    = \\arg\\min_{\\mathrm{rank}\\,X \\le r} \\lVert M - X \\rVert_F
    \\quad\\text{(Eckart–Young)}, \\qquad
    \\lVert M - M_r \\rVert_F^2 = \\sum_{i > r} S_i^2 .

:func:`top_singular` computes them with ``torch.linalg.svd`` (``niter=None``: exact, a full
decomposition, ``O(m·n·min(m, n))``) or with the randomized algorithm of ``torch.svd_lowrank``
(Halko, Martinsson and Tropp 2011, Algorithms 4.4 and 5.1: ``O(m·n·q·(2·niter + 2))`` with
``q = r + oversample`` columns), which is the "fast SVD" PiSSA uses. The randomized path is the
same sequence of operations as ``torch.svd_lowrank(M, q, niter)`` except for one thing: its
Gaussian test matrix is drawn from an int ``seed`` (:func:`lora_optim.seeding.seeded_generator`)
instead of torch's global RNG, which this library never touches. With the global RNG seeded to
the same int, ``torch.svd_lowrank`` returns the same numbers (``tests/test_inits.py`` checks it).

``niter`` is the number of subspace (power) iterations: each one multiplies the error of the
subspace by about ``(S_{q+1}/S_r)²``, so few are needed when the spectrum decays and many when
it is flat. Measured errors against the exact SVD for MiniLM's weights and 4096² matrices are
in ``benchmarks/svd_init.py``; :data:`DEFAULT_NITER` was chosen from them.

:func:`bottom_singular` (MiLoRA's minor components) has no randomized counterpart here:
randomized range finders see the top of the spectrum only, so it always runs the exact SVD.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_optim.seeding import seeded_generator

__all__ = ["DEFAULT_NITER", "DEFAULT_OVERSAMPLE", "top_singular", "bottom_singular"]

#: Default number of subspace iterations of the randomized SVD (the ``svd_niter`` option).
DEFAULT_NITER = 16
#: Extra columns of the randomized range finder, ``q = r + oversample`` (clipped to ``min(m, n)``).
DEFAULT_OVERSAMPLE = 8


def _check_rank(matrix: Tensor, rank: int) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(matrix.shape)}], got {rank}")
    if not matrix.is_floating_point() or matrix.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"expected a float32 or float64 matrix, got {matrix.dtype}")


def _approximate_basis(matrix: Tensor, columns: int, niter: int, seed: int) -> Tensor:
    """``Q`` (``m×q``, orthonormal columns) with ``Q·Qᵀ·M ≈ M``: ``torch._lowrank.get_approximate_basis``
    with the test matrix drawn from ``seed``."""
    generator = seeded_generator(seed, matrix.device)
    test = torch.randn(matrix.shape[-1], columns, generator=generator, dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(matrix @ test).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.mH @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    return basis


@torch.compiler.disable(reason="a seeded generator and LAPACK: run eagerly, between two graphs of a compiled step")
def top_singular(
    matrix: Tensor, rank: int, *, niter: int | None = DEFAULT_NITER, seed: int = 0,
    oversample: int = DEFAULT_OVERSAMPLE,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets ``(U, S, V)`` of ``matrix`` (``m×n``, fp32 or fp64):
    ``U`` is ``m×r``, ``S`` (descending) has ``r`` entries, ``V`` is ``n×r``, and
    ``U·diag(S)·Vᵀ`` is the best rank-``r`` approximation (exactly for ``niter=None``).

    ``niter=None`` runs ``torch.linalg.svd``. An int runs ``torch.svd_lowrank``'s algorithm with
    ``q = min(rank + oversample, m, n)`` columns and ``niter`` subspace iterations, its test
    matrix drawn from the int ``seed`` (torch's global RNG is not used). Pure: the same
    arguments give the same result. ``matrix`` must be finite.
    """
    _check_rank(matrix, rank)
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank].mH
    columns = min(rank + oversample, *matrix.shape)
    tall = matrix.shape[0] >= matrix.shape[1]
    work = matrix if tall else matrix.mH  # as torch.svd_lowrank: the range finder runs on a tall matrix
    basis = _approximate_basis(work, columns, niter, seed)
    U, S, Vh = torch.linalg.svd(basis.mH @ work, full_matrices=False)
    U, V = basis @ U, Vh.mH
    if not tall:
        U, V = V, U
    return U[:, :rank], S[:rank], V[:, :rank]


def bottom_singular(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rank`` singular triplets of ``matrix`` with the *smallest* singular values (of the
    ``min(m, n)`` of the thin SVD), as ``(U, S, V)`` in descending order of ``S``; exact
    (``torch.linalg.svd``)."""
    _check_rank(matrix, rank)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, -rank:], S[-rank:], Vh[-rank:].mH
