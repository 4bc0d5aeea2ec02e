"""Truncating a weight change to a low-rank pair of factors, with the share of it that is kept.

Two routes lead to the factors of an adapter:

* the change is known as a product ``ΔW = L·R`` of inner size ``k`` (``lora``, ``additive``;
  :meth:`LoRAAdam.weight_change_factors <lora_optim.LoRAAdam.weight_change_factors>`):
  :func:`truncate_product` gives its best rank-``k'`` approximation exactly, from thin QR
  factorisations, ``L = Q_L R_L``, ``Rᵀ = Q_R R_R``, and the SVD of the ``k×k`` core
  ``R_L R_Rᵀ = U S Vᵀ``: ``ΔW = (Q_L U) S (Q_R V)ᵀ``. Cost ``O((out + in)·k²)``; ``W₀`` is not needed;
* the change is only known as a dense matrix ``ΔW = W − W₀`` (``random``, whose change sums its
  draws; an init whose factors were not kept): :func:`truncate_dense` takes a truncated SVD of
  it, exactly (``torch.linalg.svd``) or randomised (``torch.svd_lowrank``, ``niter`` power
  iterations, seeded from an int under ``torch.random.fork_rng``, so torch's global RNG is
  left as it was).

Either way the factors are balanced, ``L' = U_{k'} S_{k'}^{1/2}``, ``R' = S_{k'}^{1/2} V_{k'}ᵀ``, and
the kept share ``Σ_{i≤k'} σ_i² / ‖ΔW‖_F²`` is exact: for the randomised SVD, whose factors are
``Q·(QᵀΔW)_{k'}`` with ``Q`` orthonormal,
``‖ΔW − Q(QᵀΔW)_{k'}‖² = ‖ΔW‖² − Σ_{i≤k'} σ_i(QᵀΔW)²``.
The rank ``k'`` is given, or the smallest whose kept share reaches an ``energy`` threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Truncation", "truncate_product", "truncate_dense", "choose_rank", "SVD_METHODS", "EXACT_SVD_MAX_DIM"]

#: Values of ``svd=`` (:func:`truncate_dense`).
SVD_METHODS = ("auto", "exact", "lowrank")
#: ``svd="auto"`` uses the exact SVD up to this ``min(out, in)``, the randomised one above.
EXACT_SVD_MAX_DIM = 1024
#: Extra columns of the randomised range finder (``q = k' + OVERSAMPLE``).
OVERSAMPLE = 10


@dataclass(frozen=True)
class Truncation:
    """Factors ``L`` (``out×k'``), ``R`` (``k'×in``) of a truncated change, and what they keep.

    Attributes:
        L, R: the factors, ``L·R ≈ ΔW``.
        kept: ``Σ_{i≤k'} σ_i² / ‖ΔW‖_F²`` (``1.0`` for a zero change).
        singular_values: the singular values found (all of them, or the randomised SVD's ``q``).
    """

    L: Tensor
    R: Tensor
    kept: float
    singular_values: Tensor


def choose_rank(singular_values: Tensor, total_energy: float, rank: int | None, energy: float | None) -> int:
    """``rank`` (clipped to the number of singular values), or the smallest ``k'`` with
    ``Σ_{i≤k'} σ_i² ≥ energy·total_energy`` (all of them if none reaches it), at least 1."""
    available = singular_values.numel()
    if energy is None:
        return max(1, min(int(rank), available))
    if total_energy <= 0:
        return 1
    cumulative = torch.cumsum(singular_values.double().square(), 0)
    reached = torch.nonzero(cumulative >= energy * total_energy * (1 - 1e-12))
    return max(1, int(reached[0]) + 1 if reached.numel() else available)


def _balanced(U: Tensor, S: Tensor, Vh: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    root = S[:keep].sqrt()
    return U[:, :keep] * root, root.unsqueeze(1) * Vh[:keep]


def _kept(S: Tensor, keep: int, total: float) -> float:
    if total <= 0:
        return 1.0
    return min(1.0, float(S[:keep].double().square().sum()) / total)


def truncate_product(L: Tensor, R: Tensor, *, rank: int | None = None, energy: float | None = None) -> Truncation:
    """Best rank-``k'`` factors of ``L·R`` (module docstring), ``k'`` from ``rank`` or ``energy``
    (one of them)."""
    Q_L, R_L = torch.linalg.qr(L)
    Q_R, R_R = torch.linalg.qr(R.t())
    U, S, Vh = torch.linalg.svd(R_L @ R_R.t())
    total = float(S.double().square().sum())
    keep = choose_rank(S, total, rank, energy)
    left, right = _balanced(Q_L @ U, S, Vh @ Q_R.t(), keep)
    return Truncation(left, right, _kept(S, keep, total), S)


def truncate_dense(
    delta: Tensor, *, rank: int | None = None, energy: float | None = None, method: str = "auto",
    niter: int = 4, seed: int = 0,
) -> Truncation:
    """Truncated SVD of the dense ``delta`` (``out×in``), ``k'`` from ``rank`` or ``energy``.

    ``method``: ``"exact"`` (``torch.linalg.svd``), ``"lowrank"`` (``torch.svd_lowrank`` with
    ``q = k' + 10`` columns and ``niter`` power iterations; for an ``energy`` threshold ``q``
    doubles until the threshold is reached within the first ``q − 10`` values, and the exact SVD
    takes over when ``q`` would pass ``min(out, in)/2``), or ``"auto"`` (exact up to
    ``min(out, in) =`` :data:`EXACT_SVD_MAX_DIM`, else lowrank).
    """
    if method not in SVD_METHODS:
        raise ValueError(f"Invalid svd method {method!r}; must be one of {SVD_METHODS}")
    smallest = min(delta.shape)
    total = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    if method == "auto":
        method = "exact" if smallest <= EXACT_SVD_MAX_DIM else "lowrank"
    if method == "lowrank":
        columns = (min(rank, smallest) if energy is None else 8) + OVERSAMPLE
        while 2 * columns <= smallest or (energy is None and columns <= smallest):
            accelerator = delta.device.type != "cpu"
            with torch.random.fork_rng(devices=[delta.device] if accelerator else [],
                                       device_type=delta.device.type if accelerator else "cuda"):
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(delta, q=columns, niter=niter)
            keep = choose_rank(S, total, rank, energy)
            if energy is None or keep <= columns - OVERSAMPLE:
                left, right = _balanced(U, S, V.t(), keep)
                return Truncation(left, right, _kept(S, keep, total), S)
            columns *= 2
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    keep = choose_rank(S, total, rank, energy)
    left, right = _balanced(U, S, Vh, keep)
    return Truncation(left, right, _kept(S, keep, total), S)
