"""How a factor step is written into ``W``: the write modes, and what each costs.

Factors and their moments are kept in ``factor_dtype(W.dtype)``: the weight's own dtype for
fp32/fp64 weights, fp32 for bf16/fp16 ones. The projection forms ``s·ΔW`` in that dtype (the
*compute dtype*) and a *write mode* adds it to ``W``. For a bf16 weight ``|W| ≈ 0.02`` has an
ulp of ``2⁻¹³ ≈ 1.2e-4``; an update below half of that is rounded away by ``nearest`` every
step, which is why bf16/fp16 weights default to ``stochastic``, which loses nothing on average
and keeps nothing of ``W``'s size.

Each mode has three costs: bytes kept per element of ``W``, ops per matrix and step on an
accelerator (counted by ``tests/test_engine.py``), and how far ``W`` strays from
``W₀ + Σ s·ΔW`` (``benchmarks/precision.py``; accuracy on a real task: ``docs/precision-and-checkpoints.md``).

``nearest``
    ``W ← round(W + s·ΔW)`` to ``W``'s dtype. Exact up to the dtype's own rounding for
    fp32/fp64 weights (their default); for bf16/fp16 weights updates below half an ulp are lost,
    every step, so the change written falls short of the factors' change (a bias).
    Memory: nothing kept; while writing, none for a weight of the compute dtype, and none on the
    CPU for a bf16 weight (the compiled kernels round in place); otherwise one compute-dtype
    block of rows (:mod:`lora_optim.kernels.blocks`: about 1 MiB on the CPU, the whole weight up
    to 256 MiB on an accelerator).

``stochastic`` (default for bf16/fp16 weights)
    Stochastic rounding: ``W' = ⌊W + y⌋`` or ``⌈W + y⌉`` (the two neighbours in ``W``'s dtype)
    with probabilities that make ``E[W'] = W + y`` exactly, so no update is lost on average and
    the error is a zero-mean random walk (its size grows like ``√(steps·|update|·ulp)``, far
    larger than ``compensated``'s, and it does not bias training). Nothing is kept but an int
    seed and a counter of writes (a 0-dim int64 tensor, advanced on the device only by writes
    that are taken). Element ``(i, j)`` of a write rounds with the 16 bits ``a_i ^ b_j`` of
    :func:`rounding_bits`, hashes of the global row and of the column under the write's key
    ``step_key(rounding seed, writes so far)`` (:mod:`lora_optim.seeding`), never torch's global
    RNG: so a resumed run redraws the same bits, and every path makes the same bits: the
    one-pass CPU kernel for a bf16 ``W`` whose change is a thin product
    (:meth:`~lora_optim.projections.Projection.step_product`: every built-in projection;
    :mod:`lora_optim.kernels`), the torch path (one fp32 copy of ``W`` on an accelerator, a
    handful of ops per matrix; blocks of :data:`BLOCK_ELEMENTS` elements on the CPU) and a
    compiled step (one fused kernel). For weights already in the compute dtype there is
    nothing to round and it equals ``nearest``.

``compensated``
    Kahan / error feedback. A buffer ``c`` of ``W``'s shape *and dtype* carries what rounding
    threw away; each write is

    .. math::

        y = c + s\\,\\Delta W, \\qquad W' = \\mathrm{round}(W + y), \\qquad c' = (W + y) - W'

    so ``W + c`` follows ``W_0 + Σ s·ΔW`` to the precision of a pair of numbers of ``W``'s
    dtype (for bf16 about 16 significant bits instead of 8), and ``W`` itself never lags the
    exact sum by more than half an ulp plus ``c``'s own rounding. The buffer is kept in ``W``'s
    dtype because ``|c| ≤ ulp(W)/2``: a bf16 buffer resolves ``c`` to ``2⁻⁹·|c| ≤ 2⁻¹⁷·|W|``
    (fp16: absolute ``2⁻²⁴`` at worst, through subnormals), which ``benchmarks/precision.py``
    shows is enough for 1% accuracy at lr 1e-4, while an fp32 buffer would cost twice as much
    for no measurable gain in that range. Memory: ``numel·itemsize`` kept (bf16: 2 bytes per
    element, +100% of ``W``: the most exact mode, and the most expensive one); while writing,
    nothing more on the CPU for a bf16 ``W`` whose change is a thin product (one pass), else one
    block of rows in the compute dtype (:mod:`lora_optim.kernels.blocks`).
    The buffer is part of the optimizer state and checkpoints with it. A change to ``W`` made
    outside the optimizer leaves ``c`` as it was (it is at most half an ulp, so harmless).

Modes are looked up by name from the ``precision`` option of a param group
(``None`` picks :func:`default_precision` for the weight's dtype).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import row_blocks
from lora_optim.kernels.product import add_thin_product_
from lora_optim.kernels.paths import cpu_paths
from lora_optim.seeding import derive_seed, hash_bits, step_key
from lora_optim.state_keys import ROUNDING_DRAWS, ROUNDING_SEED, WEIGHT_COMPENSATION
from lora_optim.weight_change import WeightDelta

__all__ = [
    "WeightWriter",
    "register_writer",
    "get_writer",
    "available_writers",
    "factor_dtype",
    "default_precision",
    "stochastic_round_",
    "rounding_bits",
    "round_to_",
    "BLOCK_ELEMENTS",
]

_WRITERS: dict[str, WeightWriter] = {}

#: Blocks of whole rows of about this many elements (1 MiB in fp32) for the random bits of
#: stochastic rounding, on every device (so seeded rounding gives the same bits for a shape).
BLOCK_ELEMENTS = 1 << 18

# Stream tag that separates the rounding stream from the factor draws of the same parameter.
_ROUNDING_STREAM = 0x5352  # "SR"


def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype of the factors and moments for a weight of ``weight_dtype``: fp64 stays fp64, else fp32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def default_precision(weight_dtype: torch.dtype) -> str:
    """The write mode used when a group's ``precision`` is ``None``: ``"stochastic"`` for weights
    narrower than their factor dtype (bf16, fp16), whose small updates ``nearest`` would lose and
    for which ``compensated`` would keep a buffer of the weight's size; ``"nearest"`` otherwise
    (fp32/fp64 weights, where it is exact up to the dtype's rounding)."""
    return "stochastic" if _is_narrower(weight_dtype, factor_dtype(weight_dtype)) else "nearest"


def _is_narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).eps > torch.finfo(than).eps


def _blocks(weight: Tensor, compute_dtype: torch.dtype) -> Iterator[tuple[int, slice | None]]:
    """``(row_start, rows)`` of the blocks of :func:`~lora_optim.kernels.blocks.row_blocks`;
    ``rows`` is ``None`` when one block covers the weight (no slicing then)."""
    blocks = list(row_blocks(weight.shape[0], weight.shape[1], compute_dtype, weight.device))
    if len(blocks) <= 1:
        yield 0, None
        return
    for start, stop in blocks:
        yield start, slice(start, stop)


class WeightWriter(abc.ABC):
    """Adds ``s·ΔW`` into ``W``; subclasses set :attr:`name` and register with :func:`register_writer`."""

    name: ClassVar[str]
    #: State keys of tensors with the shape of ``W``'s matrix view (checked when a checkpoint loads).
    weight_shaped_keys: ClassVar[tuple[str, ...]] = ()
    #: State keys held as 0-dim int64 tensors on the weight's device (counters advanced on the
    #: device); an int from an older checkpoint is made one when it loads.
    counter_keys: ClassVar[tuple[str, ...]] = ()

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """Extra per-parameter state (tensors and ints); none by default."""
        return {}

    @abc.abstractmethod
    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta, *, taken: Tensor | None = None) -> None:
        """Apply the update to the matrix ``weight`` in place: ``delta.add_to_(target, row_start)``
        adds rows of ``s·ΔW`` into any target of ``weight``'s rows, in the compute dtype
        (``delta.compute_dtype``) or lower precision (:class:`~lora_optim.weight_change.WeightDelta`).

        ``taken`` (a 0-dim bool tensor on the weight's device, or ``None`` for true) says whether
        the step is taken; the engine decides it on the device. Where it is false ``delta`` is
        exactly zero, and the write must leave ``W`` and the writer's state as they were, without
        reading ``taken`` on the host (masked updates)."""


def _skipped_on_host(taken: Tensor | None, weight: Tensor) -> bool:
    """Whether a step known not to be taken can skip its write at no cost: a CPU weight on the
    CPU's paths, outside a compiled region (reading the flag there is a memory read, not a sync)."""
    return (taken is not None and cpu_paths(weight.device) and not torch.compiler.is_compiling()
            and not bool(taken))


def register_writer(cls: type[WeightWriter]) -> type[WeightWriter]:
    """Class decorator registering a :class:`WeightWriter` under its ``name``."""
    _WRITERS[cls.name] = cls()
    return cls


def get_writer(name: str) -> WeightWriter:
    """The write mode called ``name``; ``ValueError`` listing the known modes if none."""
    try:
        return _WRITERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {name!r}; known: {sorted(_WRITERS)}") from None


def available_writers() -> list[str]:
    """Names of the registered write modes, sorted."""
    return sorted(_WRITERS)


@register_writer
class NearestWriter(WeightWriter):
    """``W ← round_to_nearest(W + s·ΔW)``; in place, no extra memory when dtypes agree."""

    name = "nearest"

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta, *, taken: Tensor | None = None) -> None:
        """Add into ``W`` directly when it has the compute dtype or the compiled kernels round in
        place; else one block of rows at a time through a compute-dtype temporary. A skipped
        step adds an exact zero (``W`` unchanged, up to the sign of a zero entry)."""
        if _skipped_on_host(taken, weight):
            return
        compute = delta.compute_dtype
        kernels = native_kernels()
        if weight.dtype == compute or (kernels is not None and kernels.supports(weight, compute)):
            delta.add_to_(weight)
            return
        for start, rows in _blocks(weight, compute):
            delta.add_to_(weight if rows is None else weight[rows], start)  # rounds once per element


@register_writer
class CompensatedWriter(WeightWriter):
    """Kahan-compensated writes: a buffer in ``W``'s dtype keeps what rounding drops (module docstring)."""

    name = "compensated"
    weight_shaped_keys = (WEIGHT_COMPENSATION,)

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """``weight_compensation``: zeros of ``W``'s shape and dtype."""
        return {WEIGHT_COMPENSATION: torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)}

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta, *, taken: Tensor | None = None) -> None:
        """``y = c + s·ΔW``; ``W' = round(W + y)``; ``c' = (W + y) − W'``: in one pass on the CPU for a
        bf16 ``W`` whose change is a thin product, else one block of rows at a time. A skipped
        step (``taken`` false) folds nothing in: ``y = 0·c``, so ``W' = W``, and ``c`` is kept."""
        if _skipped_on_host(taken, weight):
            return
        compensation = state[WEIGHT_COMPENSATION]
        compute = delta.compute_dtype
        product = delta.product()
        kernels = native_kernels()
        if (product is not None and kernels is not None and kernels.supports_bf16_write(weight, compute)
                and kernels.supports_bf16_write(compensation, compute)):
            kernels.add_lowrank_compensated_(weight, compensation, *product, delta.scale)
            torch.autograd.graph.increment_version(weight)  # as an in-place torch op would
            return
        wide = _is_narrower(weight.dtype, compute)
        for start, rows in _blocks(weight, compute):
            w, c = (weight, compensation) if rows is None else (weight[rows], compensation[rows])
            pending = c.to(compute, copy=True)
            if taken is not None:
                pending.mul_(taken)  # 0·c: a skipped step rounds nothing
            _add_change_(pending, delta, product, start)  # y = c + s·ΔW
            if wide:
                # W + y is (all but) exact in the wider dtype, and so is the residual after
                # rounding (W' and W + y are within half an ulp of W's dtype: Sterbenz). A compiled
                # write forms W' in the wider dtype (round_to_): inductor keeps fused values in the
                # wider dtype and would skip the rounding the residual measures.
                pending.add_(w)
                if torch.compiler.is_compiling():
                    rounded = round_to_(pending.clone(), w.dtype)
                    w.copy_(rounded)  # exact
                else:
                    w.copy_(pending)
                    rounded = w
                if taken is None:
                    torch.sub(pending, rounded, out=c)
                else:
                    c.copy_(torch.where(taken, pending - rounded, c))
                continue
            # Same dtype: classic Kahan, t = W + y, c' = (W − t) + y (W − t is exact), with c
            # and W as scratch so that the block of y is the only temporary.
            kept = None if taken is None else (w.clone(), c.clone())
            c.copy_(w).add_(pending)  # t
            w.sub_(c).add_(pending)  # c'
            pending.copy_(w)
            w.copy_(c)
            c.copy_(pending)
            if kept is not None:
                w.copy_(torch.where(taken, w, kept[0]))
                c.copy_(torch.where(taken, c, kept[1]))


def round_to_(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Round the float32 tensor ``values`` in place to the nearest value of ``dtype`` (ties to
    even), kept in float32; returns it. For bf16, integer ops on the bits (``u + 0x7FFF +
    lsb``, then the low 16 bits cleared; NaN and ±Inf kept), which no compiler fuses away (a
    compiled ``x.to(bf16).to(float32)`` may be elided: inductor keeps fused values in float32);
    other dtypes through ``to(dtype)``."""
    if values.dtype != torch.float32 or dtype != torch.bfloat16:
        return values.copy_(values.to(dtype))
    bits = values.view(torch.int32)
    nan = values.isnan()
    bits.add_(0x7FFF + ((bits >> 16) & 1)).bitwise_and_(-(1 << 16))
    return values.masked_fill_(nan, float("nan"))


def _add_change_(target: Tensor, delta: WeightDelta, product: tuple[Tensor, Tensor] | None, row_start: int) -> None:
    """``target += s·ΔW`` on ``target``'s rows (from ``row_start``), a compute-dtype block: one
    ``addmm_`` from the thin product when there is one, else through the projection."""
    if product is None:
        delta.add_to_(target, row_start)
        return
    left, right = product
    if row_start != 0 or target.shape[0] != left.shape[0]:
        left = left[row_start : row_start + target.shape[0]]
    add_thin_product_(target, left, right, delta.scale)


@register_writer
class StochasticWriter(WeightWriter):
    """Unbiased stochastic rounding of ``W + s·ΔW`` into ``W``'s dtype, seeded by ints (module docstring)."""

    name = "stochastic"
    counter_keys = (ROUNDING_DRAWS,)

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """``rounding_seed`` (an int derived from the parameter's seed) and ``rounding_draws`` (writes
        so far: a 0-dim int64 tensor on the weight's device)."""
        return {ROUNDING_SEED: derive_seed(seed, _ROUNDING_STREAM),
                ROUNDING_DRAWS: torch.zeros((), dtype=torch.int64, device=weight.device)}

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta, *, taken: Tensor | None = None) -> None:
        """``W ← SR(W + s·ΔW)`` with the bits of :func:`rounding_bits` for the key
        ``step_key(rounding_seed, rounding_draws)`` (computed on the device): in one pass on the CPU
        for a bf16 ``W`` whose change is a thin product; elsewhere through a compute-dtype copy, one
        block of rows at a time (the whole weight on an accelerator). The counter advances by
        ``taken``; a skipped step rounds ``W + 0``, which is ``W``."""
        compute = delta.compute_dtype
        if not _is_narrower(weight.dtype, compute):
            delta.add_to_(weight)  # nothing to round beyond the compute dtype's own arithmetic
            return
        if _skipped_on_host(taken, weight):
            return
        draws = state[ROUNDING_DRAWS]
        key = step_key(state[ROUNDING_SEED], draws)
        draws.add_(1 if taken is None else taken.to(draws.dtype))
        row_bits, column_bits = rounding_bits(weight.shape[0], weight.shape[1], key, delta.row_offset, weight.device)
        product = delta.product()
        kernels = native_kernels()
        if product is not None and kernels is not None and kernels.supports_bf16_write(weight, compute):
            kernels.add_lowrank_stochastic_(weight, *product, delta.scale, row_bits, column_bits)
            torch.autograd.graph.increment_version(weight)  # as an in-place torch op would
            return
        for start, stop in _rounding_blocks(weight):
            whole = (start, stop) == (0, weight.shape[0])
            rows = weight if whole else weight[start:stop]
            exact = rows.to(compute, copy=True)
            _add_change_(exact, delta, product, start)
            _round_rows_(rows, exact, row_bits if whole else row_bits[start:stop], column_bits)


def _rounding_blocks(weight: Tensor) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of blocks of whole rows: about :data:`BLOCK_ELEMENTS` elements on the CPU,
    the blocks of :func:`~lora_optim.kernels.blocks.row_blocks` in fp32 elsewhere (one block for
    any weight up to 256 MiB in fp32: one launch per op). The bits of an element do not depend on
    the blocks (:func:`rounding_bits`)."""
    rows = weight.shape[0]
    if not cpu_paths(weight.device):
        yield from row_blocks(rows, weight[0].numel() if rows else 1, torch.float32, weight.device)
        return
    step = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel() if rows else 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


_INDEX_CACHE: dict[tuple, Tensor] = {}


def _rounding_index(rows: int, columns: int, row_base: int, device: torch.device) -> Tensor:
    """``[row_base, …, row_base + rows − 1, 2³¹, …, 2³¹ + columns − 1]`` (int64): the hash inputs of
    the rows and of the columns (cached per shape outside compiled code)."""
    key = (rows, columns, row_base, torch.device(device))
    cached = None if torch.compiler.is_compiling() else _INDEX_CACHE.get(key)
    if cached is not None:
        return cached
    index = torch.cat((torch.arange(row_base, row_base + rows, dtype=torch.int64, device=device),
                       torch.arange(1 << 31, (1 << 31) + columns, dtype=torch.int64, device=device)))
    if not torch.compiler.is_compiling():
        if len(_INDEX_CACHE) > 256:  # a bound, for programs that see many shapes
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = index
    return index


def rounding_bits(rows: int, columns: int, key: Tensor | int, row_base: int = 0,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The random bits of one stochastic-rounding write of a ``rows×columns`` matrix whose first row
    is row ``row_base`` of the whole weight: ``(a, b)``, int32 vectors of ``rows`` and ``columns``
    16-bit words, and element ``(i, j)`` rounds with the 16 bits ``a_i ^ b_j``.

    ``a_i = lowbias32((row_base + i) ^ key) mod 2¹⁶`` and ``b_j = lowbias32((2³¹ + j) ^ key) mod 2¹⁶``
    (:func:`~lora_optim.seeding.hash_bits`). For independent uniform ``a`` and ``b`` every
    ``a_i ^ b_j`` is uniform on ``[0, 2¹⁶)`` (so the rounding is unbiased) and any two elements
    are independent (so the rounding errors are uncorrelated: the variance of any sum of them is
    that of independent rounding), from ``rows + columns`` hashes instead of ``rows·columns``. The
    bits depend on the key and the global row and column only: the same on every device, in
    eager and compiled code, and for every split of the rows (blocks, chunks, shards)."""
    bits = (hash_bits(_rounding_index(rows, columns, row_base, torch.device(device)), key) & 0xFFFF).to(torch.int32)
    return bits[:rows], bits[rows:]


def stochastic_round_(target: Tensor, source: Tensor, seed: int) -> None:
    """``target ← SR(source)``: each element becomes one of its two neighbours in ``target``'s
    dtype, the upper with probability ``(x − lo)/(hi − lo)``, so ``E[target] = source``.

    ``source`` is a wider float tensor of ``target``'s shape and is used as scratch. The random
    bits are :func:`rounding_bits` for the key ``step_key(seed, 0)`` (``seed`` an int; rows are
    dim 0, columns the rest). bf16 from fp32 adds 16 random bits below bf16's mantissa and
    truncates (exact and branch-free); other dtypes pick between the nearest value and its
    neighbour with the bits as a 16-bit uniform number.
    """
    if target.shape != source.shape:
        raise ValueError(f"stochastic_round_: shapes differ, {tuple(target.shape)} vs {tuple(source.shape)}")
    if source.ndim == 0:
        target, source = target.view(1), source.view(1)
    rows = source.shape[0]
    columns = source[0].numel() if rows else 0
    row_bits, column_bits = rounding_bits(rows, columns, step_key(seed, 0), 0, source.device)
    _round_rows_(target.reshape(rows, columns), source.reshape(rows, columns), row_bits, column_bits)


def _round_rows_(target: Tensor, source: Tensor, row_bits: Tensor, column_bits: Tensor) -> None:
    """Round the matrix ``source`` into ``target`` with the bits ``row_bits[i] ^ column_bits[j]``."""
    if target.ndim != 2:
        target, source = target.reshape(target.shape[0], -1), source.reshape(source.shape[0], -1)
    if (target.dtype, source.dtype) == (torch.bfloat16, torch.float32):
        _truncate_bf16_(target, source, row_bits, column_bits)
    else:
        _pick_neighbour_(target, source, row_bits, column_bits)


def _truncate_bf16_(target: Tensor, source: Tensor, row_bits: Tensor, column_bits: Tensor) -> None:
    # fp32 bits: sign | 8 exponent | 23 mantissa; bf16 keeps the top 16. Adding a uniform
    # 16-bit integer to the magnitude and clearing the low 16 bits rounds the magnitude up with
    # probability (dropped bits)/2¹⁶: unbiased, and symmetric in the sign.
    bits = source.view(torch.int32)
    bits.add_(row_bits.unsqueeze(1) ^ column_bits).bitwise_and_(-(1 << 16))  # 0xFFFF0000
    target.copy_(source)  # exact: the dropped bits are zero


def _pick_neighbour_(target: Tensor, source: Tensor, row_bits: Tensor, column_bits: Tensor) -> None:
    nearest = source.to(target.dtype)
    residual = source - nearest.to(source.dtype)
    toward = torch.where(residual > 0, torch.inf, -torch.inf).to(target.dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.to(source.dtype) - nearest.to(source.dtype)
    chance = (residual / gap).nan_to_num_(0.0)  # gap is ±inf at the dtype's edge: stay put
    draw = (row_bits.unsqueeze(1) ^ column_bits).to(source.dtype).add_(0.5).mul_(2.0**-16)  # uniform on (0, 1)
    target.copy_(torch.where(draw < chance, neighbour, nearest))
