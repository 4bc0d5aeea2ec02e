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

**Redrawn index maps** (option ``remap_every=K``, default ``0``: never, the seed's definition).
``ΔW = A·P + Q·B`` is LoRA with both other factors fixed to the 0/1 indicator matrices
``P_{cj} = [c(j) = c]`` (r×in) and ``Q_{ic} = [c'(i) = c]`` (out×r), with the class maps
``c(j) = j mod r`` and ``c'(i) = i mod r``: its subspace never moves. With ``remap_every=K`` the maps
are redrawn every ``K`` steps as ``random`` redraws its factors: draw ``k ≥ 1`` takes seeded
permutations ``π`` (of the columns) and ``σ`` (of the rows) and sets ``c(j) = π(j) mod r``,
``c'(i) = σ(i) mod r`` (every class keeps its size); draw 0 is the fixed map, so the first ``K``
steps are plain ``additive``. A redraw does not move ``W`` (only changes are ever written); the
factors restart at zero in the new maps, and the moments follow ``moment_rule`` (``keep``,
``reset`` or ``transport`` of :mod:`lora_optim.moment_rules`, with ``(Q, P)`` as the outgoing and
incoming frozen factors). The gradients are then ``(G·Pᵀ, Qᵀ·G)``, the write
``W += s·[dA, Q]·[P; dB]``: LoRA's products with one-hot factors, on the torch path (no native
kernel). State adds ``draws`` and ``age`` (ints); the maps are regenerated from the seed. After
the first redraw the learnt change is a sum over maps, so it exports (like ``random``'s) by an
SVD against the base weights.

The counters and maps live on the host, so with ``remap_every > 0`` every step reads its NaN/Inf
flags on the host (one sync per step, :meth:`AdditiveProjection.host_decides`) and commits a
count or a redraw only for a step that is taken. A step compiled with ``torch.compile`` then
breaks its graph at that read (compile it without ``fullgraph=True``; it equals the eager step,
``tests/test_additive_remap.py``). The default, ``remap_every=0``, commits nothing: no host read,
and the step compiles whole.
"""

from __future__ import annotations

import weakref

import einops
import torch
from torch import Tensor

from collections.abc import Mapping
from typing import Any


from lora_optim import initial_factors
from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import row_blocks
from lora_optim.kernels.product import add_thin_product_
from lora_optim.moment_rules import MOMENT_RULES, apply_moment_rule_
from lora_optim.options import Option, choice, integer
from lora_optim.projections.registry import register_projection
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.projections.lora import lowrank_project, lowrank_project_activations
from lora_optim.seeding import derive_seed, seeded_generator
from lora_optim.state_keys import AGE, DRAWS, FACTOR_A, FACTOR_B, GLOBAL_ROWS, ROW_OFFSET, SEED

__all__ = [
    "AdditiveProjection",
    "block_identity",
    "fold_columns",
    "fold_rows",
    "spread_rows_",
    "additive_project",
    "additive_step_product",
    "additive_add_delta_",
    "class_maps",
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


_REMAP_STREAM = 0x524D  # "RM": separates the index maps from the other draws of the parameter


def class_maps(out_features: int, in_features: int, rank: int, seed: int, draw: int, *,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``(c'(i), c(j))``: the row and column classes (int64, ``out`` and ``in`` long) of index map
    ``draw`` of a parameter with int ``seed``. Draw 0 is the fixed map ``i mod r``, ``j mod r``;
    draw ``k ≥ 1`` is ``σ(i) mod r``, ``π(j) mod r`` for permutations ``σ``, ``π`` drawn from
    ``(seed, k)`` (a pure function of them; torch's global RNG is not used)."""
    rows = torch.arange(out_features, device=device)
    columns = torch.arange(in_features, device=device)
    if draw:
        generator = seeded_generator(derive_seed(seed, _REMAP_STREAM, draw), device)
        rows = torch.randperm(out_features, generator=generator, device=device)
        columns = torch.randperm(in_features, generator=generator, device=device)
    return rows.remainder(rank), columns.remainder(rank)


class _Maps:
    """The indicator factors of one index map, in the factor dtype: ``Q`` (global rows × r) and
    ``P`` (r × in)."""

    __slots__ = ("draw", "Q", "P")

    def __init__(self, draw: int, rows: Tensor, columns: Tensor, rank: int, dtype: torch.dtype):
        self.draw = draw
        classes = torch.arange(rank, device=rows.device)
        self.Q = (rows.unsqueeze(1) == classes).to(dtype)
        self.P = (columns.unsqueeze(0) == classes.unsqueeze(1)).to(dtype)

    def rows(self, start: int, stop: int) -> Tensor:
        """``Q`` of the global rows ``start:stop``."""
        return self.Q if (start, stop) == (0, self.Q.shape[0]) else self.Q[start:stop]


#: The index map each stored ``A`` (of a ``remap_every > 0`` state) projects and writes with next,
#: keyed by ``id`` of the tensor, with a weak reference to it (an entry counts only while it names
#: that very tensor). A cache of what the state determines (``seed``, ``draws``): the protocol
#: hands :meth:`Projection.project` and the writes the factors only, so the map travels with the
#: stored factor. Absent (fixed map ``j mod r``) before the first redraw. A plain dict of ints, so
#: that a compiled step of a fixed-map group looks its ``A`` up (and finds nothing) without a graph
#: break; dead entries are dropped when a map is bound (no finalizer changes it at random times).
_CURRENT_MAPS: dict[int, tuple[weakref.ref, "_Maps"]] = {}


def _bound_maps(A: Tensor) -> _Maps | None:
    """The redrawn map bound to the stored factor ``A``, or ``None`` (the fixed map)."""
    entry = _CURRENT_MAPS.get(id(A))
    if entry is None or entry[0]() is not A:
        return None
    return entry[1]


def _remaps(group: Mapping[str, Any]) -> bool:
    return bool(group.get("remap_every", 0))


@register_projection
class AdditiveProjection(Projection):
    """Additive block decomposition ``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}``, optionally with the
    index maps redrawn every ``remap_every`` steps (see module docstring)."""

    name = "additive"
    options = (
        Option("remap_every", 0, integer(0),
               doc="steps per draw of additive's index maps (0: never, the fixed map j mod r)"),
        Option("moment_rule", "keep", choice(tuple(MOMENT_RULES)), doc="what a redraw does to the moments"),
    )
    accepts_low_precision_grad = True
    supports_row_sharding = True  # the row folds use global row indices (row_offset)
    grad_nonfinite_propagates = True  # every G_ij enters a row sum and a column sum

    def validate_options(self, group: Mapping[str, Any]) -> None:
        """Redrawn maps are refused with the drift check of a ``preserve_sparsity`` group (its
        masked probe recomputes the change from copies of the factors, which carry no map)."""
        if _remaps(group) and group.get("preserve_sparsity") and group.get("drift_probes"):
            raise ValueError(
                f"Invalid combination remap_every={group['remap_every']!r} with preserve_sparsity=True and "
                f"drift_probes={group['drift_probes']!r}: the masked drift probe of a redrawn additive map is not "
                "implemented; use drift_probes=0 or remap_every=0"
            )

    def init_state(self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group) -> FactorState:
        """``A`` (out×r) and ``B`` (r×in), both zero (so the base is ``W`` itself); with
        ``remap_every > 0`` also ``draws = 1`` and ``age = 0`` (map 0 is the fixed one)."""
        out_features, in_features = weight.shape
        state = {
            FACTOR_A: torch.zeros(out_features, rank, dtype=factor_dtype, device=weight.device),
            FACTOR_B: torch.zeros(rank, in_features, dtype=factor_dtype, device=weight.device),
        }
        if _remaps(group):
            state.update({DRAWS: 1, AGE: 0})
        initial_factors.record_(state, state[FACTOR_A], state[FACTOR_B], zero=True, keep=False)
        return state

    # --- redrawn index maps -------------------------------------------------------------

    @staticmethod
    def _maps(state: FactorState, draw: int) -> _Maps | None:
        """The indicator factors of map ``draw`` (``None`` for the fixed map 0)."""
        if draw == 0:
            return None
        A, B = state[FACTOR_A], state[FACTOR_B]
        rows, columns = class_maps(state.get(GLOBAL_ROWS, A.shape[0]), B.shape[1], A.shape[1], state[SEED], draw,
                                   device=A.device)
        return _Maps(draw, rows, columns, A.shape[1], A.dtype)

    @staticmethod
    def _bind(state: FactorState, maps: _Maps | None) -> None:
        A = state[FACTOR_A]
        if maps is None:
            _CURRENT_MAPS.pop(id(A), None)
        elif getattr(_bound_maps(A), "draw", None) != maps.draw:
            for key in [key for key, (ref, _) in _CURRENT_MAPS.items() if ref() is None]:
                del _CURRENT_MAPS[key]  # factors of optimizers that are gone
            _CURRENT_MAPS[id(A)] = (weakref.ref(A), maps)

    @staticmethod
    def _due(state: FactorState, group: Mapping[str, Any]) -> bool:
        return _remaps(group) and state[AGE] >= group["remap_every"]

    def current_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)`` (with redrawn maps, the current map is bound to ``A`` if nothing is)."""
        if _remaps(group) and _bound_maps(state[FACTOR_A]) is None:
            self._bind(state, self._maps(state, state[DRAWS] - 1))
        return state[FACTOR_A], state[FACTOR_B]

    def step_factors(self, state: FactorState, group, grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``; with redrawn maps, the map of the coming step (the next one when a
        redraw is due) is bound to ``A`` for :meth:`project` and the write. The state is unchanged."""
        if _remaps(group):
            draw = state[DRAWS] if self._due(state, group) else state[DRAWS] - 1
            self._bind(state, self._maps(state, draw))
        return state[FACTOR_A], state[FACTOR_B]

    def host_decides(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """With redrawn maps (``remap_every > 0``): true, every step. The map counters are host ints
        and the maps Python objects, so :meth:`begin_step` runs only for a step that is taken (one
        host read of the step's flags per step, as for ``nonfinite="raise"``). With the fixed map
        (the default): false, the step is decided on the device and commits nothing."""
        return _remaps(group)

    def begin_step(self, state: FactorState, group, A: Tensor, B: Tensor, *,
                   taken: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Count the step; at a due redraw apply the moment rule from the outgoing to the incoming
        indicator factors ``(Q, P)``, zero the factors (their change is in ``W``) and advance the
        map counter. With the fixed map nothing is committed (``taken`` is not read); with redrawn
        maps the engine calls it only for a taken step, decided on the host (:meth:`host_decides`),
        so a skipped step leaves the counters and maps as they were."""
        if not _remaps(group):
            return A, B
        if not self._due(state, group):
            state[AGE] += 1
            return A, B
        new = self._maps(state, state[DRAWS])
        old = self._maps(state, state[DRAWS] - 1)
        if group["moment_rule"] != "keep":
            rows = slice(state.get(ROW_OFFSET, 0), state.get(ROW_OFFSET, 0) + A.shape[0])
            old_QP = self._indicators(old, A, B)
            old_QP = (old_QP[0][rows], old_QP[1])
            apply_moment_rule_(group["moment_rule"], state, old_QP, (new.Q[rows], new.P))
        A.zero_()
        B.zero_()
        state[DRAWS] += 1
        state[AGE] = 1
        self._bind(state, new)
        return A, B

    @staticmethod
    def _indicators(maps: _Maps | None, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q, P)`` of ``maps`` (the fixed map's block identities for ``None``), global rows."""
        if maps is not None:
            return maps.Q, maps.P
        rows = A.shape[0]
        return (block_identity(rows, A.shape[1], dtype=A.dtype, device=A.device),
                block_identity(B.shape[1], A.shape[1], dtype=B.dtype, device=B.device, transposed=True))

    # --- projection and write -----------------------------------------------------------

    def project(self, grad: Tensor, A: Tensor, B: Tensor, *, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Block row and column sums of ``G``; ``grad`` may be of lower precision. On a row shard
        the row sums are this rank's part, in the classes of the global row indices. With a
        redrawn map bound to ``A``: ``(G·Pᵀ, Qᵀ·G)``."""
        maps = _bound_maps(A)
        if maps is None:
            return additive_project(grad, A.shape[1], A.dtype, row_offset)
        return lowrank_project(grad, maps.rows(row_offset, row_offset + grad.shape[0]), maps.P)

    def project_activations(self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(δYᵀ·fold(X), fold(δY)ᵀ·X)`` without forming ``G = δYᵀX``.

        ``fold`` sums the feature columns with equal index mod ``r`` (:func:`fold_columns`):
        ``Σ_{j≡k} G_ij = Σ_n δY_ni·fold(X)_nk`` and ``Σ_{i≡k} G_ij = Σ_n fold(δY)_nk·X_nj``. With a
        redrawn map, LoRA's products with ``(Q, P)``.
        """
        maps = _bound_maps(A)
        if maps is not None:
            return lowrank_project_activations(inputs, output_grads, maps.Q, maps.P)
        rank = A.shape[1]
        # (fold(X)ᵀ·δY)ᵀ: BLAS is faster with r rows than with r columns (see lowrank_project_activations).
        grad_A = torch.mm(fold_columns(inputs, rank).t(), output_grads).t()
        grad_B = torch.mm(fold_columns(output_grads, rank).t(), inputs)
        return grad_A, grad_B

    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += s·(dA[:, j mod r] + dB[i mod r, :])`` (``ΔW`` is linear in the factors); with a
        redrawn map, ``s·[dA, Q]·[P; dB]``."""
        if _bound_maps(change.A_new) is None:
            additive_add_delta_(target, change.dA, change.dB, scale, row_start, change.row_offset)
            return
        left, right = self.step_product(change, row_start, target.shape[0])
        add_thin_product_(target, left, right, scale)

    def step_product(
        self, change: FactorChange, row_start: int = 0, rows: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``([dA, E_r], [E_c; dB])`` (:func:`additive_step_product`); with a redrawn map
        ``([dA, Q], [P; dB])``."""
        maps = _bound_maps(change.A_new)
        if maps is None:
            return additive_step_product(change.dA, change.dB, row_start, rows, change.row_offset)
        stop = change.dA.shape[0] if rows is None else row_start + rows
        first = change.row_offset + row_start
        left = torch.cat((change.dA[row_start:stop], maps.rows(first, first + stop - row_start)), dim=1)
        return left, torch.cat((maps.P, change.dB), dim=0)

    def step_size_coefficients(self, out_features: int, in_features: int, rank: int) -> tuple[float, float, float, float]:
        """``(in/r, 0, out/r, 0)``: ``‖dA·P‖_F² = Σ_ik dA_ik²·|{j: c(j) = k}| = (in/r)·‖dA‖_F²`` (exact when
        ``r`` divides ``in``; every map keeps the class sizes), likewise ``‖Q·dB‖_F² = (out/r)·‖dB‖_F²``;
        the cross term is left out."""
        return in_features / rank, 0.0, out_features / rank, 0.0

    def first_step_norm_sq(self, out_features: int, in_features: int, rank: int) -> float:
        """``2·out·in``: both factors start at zero and both move by ``±η`` per entry; each entry of
        ``A`` is spread over its class of columns, so ``‖dA·P‖_F² = Σ_ik dA_ik²·|{j: c(j) = k}|
        = η²·out·in`` exactly (any ``r``, any map), likewise ``‖Q·dB‖_F² = η²·in·out``: every entry of
        ``W`` moves by ``s·(±η ± η)``. The cross term ``2⟨dA·P, Q·dB⟩`` has mean zero for independent
        signs (relative ``≈ (2/π)·r/√(out·in)`` for a ``G`` with i.i.d. entries)."""
        return 2.0 * out_features * in_features

    def record_base_(self, state: FactorState, group) -> None:
        """Record the stored factors as the base's (zero if both are all zeros; one host read)."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        initial_factors.record_(state, A, B, zero=not (bool(A.any()) or bool(B.any())),
                                keep=group.get("keep_initial_factors", False))

    def initial_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor] | None:
        """Zeros for a zero base, the kept ``(A0, B0)``, or ``None`` if unknown (and after a redraw
        of the index maps: the change is a sum over maps)."""
        if _remaps(group) and state[DRAWS] > 1:
            return None
        if initial_factors.status(state) == initial_factors.ZERO:
            return torch.zeros_like(state[FACTOR_A]), torch.zeros_like(state[FACTOR_B])
        kept = initial_factors.kept_factors(state)
        return None if kept is None else (kept[0].clone(), kept[1].clone())

    def change_factors(self, state: FactorState, group) -> tuple[Tensor, Tensor] | None:
        """``ΔW = dA·E_c + E_r·dB = [dA, E_r]·[E_c; dB]`` with ``dA = A − A0``, ``dB = B − B0``: exact
        LoRA factors of inner size ``2r`` (the block identities ``E_r``, ``E_c`` of the module
        docstring). ``None`` if the base is unknown, or after a redraw of the index maps."""
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
        ``Σ_j dA[i, j mod r]·X[j] = (dA·fold_rows(X))[i]``; with a redrawn map ``s·(dA·(P·X) + Q·(dB·X))``."""
        rank = change.A.shape[1]
        step_A = change.A_new.to(probes.dtype) - change.A.to(probes.dtype)
        step_B = change.B_new.to(probes.dtype) - change.B.to(probes.dtype)
        maps = _bound_maps(change.A_new)
        if maps is not None:
            Q = maps.rows(change.row_offset, change.row_offset + step_A.shape[0]).to(probes.dtype)
            return (step_A @ (maps.P.to(probes.dtype) @ probes)).add_(Q @ (step_B @ probes)).mul_(scale)
        result = step_A @ fold_rows(probes, rank)
        spread_rows_(result, step_B @ probes, 1.0)
        return result.mul_(scale)
