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
    larger than ``compensated``'s, and it does not bias training). Nothing is kept but two ints:
    the random bits come from ``derive_seed(rounding seed, writes so far)``, never from torch's
    global RNG, so a resumed run redraws the same bits. For a bf16 ``W`` whose change is a thin
    product (:meth:`~lora_optim.projections.Projection.step_product`: every built-in projection)
    the CPU writes in one pass with no temporary (:mod:`lora_optim.kernels`: the bits are a hash
    of the seed, the row and the column); an accelerator writes through one fp32 copy of ``W``
    with bits from a seeded generator (a handful of ops per matrix); otherwise blocks of
    :data:`BLOCK_ELEMENTS` elements. The bits differ between those paths, so a run is
    reproducible on one kind of device. For weights already in the compute dtype there is
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
from lora_optim.kernels.paths import cpu_paths
from lora_optim.seeding import derive_seed, seeded_generator
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

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """Extra per-parameter state (tensors and ints); none by default."""
        return {}

    @abc.abstractmethod
    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta) -> None:
        """Apply the update to the matrix ``weight`` in place: ``delta.add_to_(target, row_start)``
        adds rows of ``s·ΔW`` into any target of ``weight``'s rows, in the compute dtype
        (``delta.compute_dtype``) or lower precision (:class:`~lora_optim.weight_change.WeightDelta`)."""


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

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta) -> None:
        """Add into ``W`` directly when it has the compute dtype or the compiled kernels round in
        place; else one block of rows at a time through a compute-dtype temporary."""
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

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta) -> None:
        """``y = c + s·ΔW``; ``W' = round(W + y)``; ``c' = (W + y) − W'``: in one pass on the CPU for a
        bf16 ``W`` whose change is a thin product, else one block of rows at a time."""
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
            _add_change_(pending, delta, product, start)  # y = c + s·ΔW
            if wide:
                # W + y is (all but) exact in the wider dtype, and so is the residual after
                # rounding (W' and W + y are within half an ulp of W's dtype: Sterbenz).
                pending.add_(w)
                w.copy_(pending)
                torch.sub(pending, w, out=c)
                continue
            # Same dtype: classic Kahan, t = W + y, c' = (W − t) + y (W − t is exact), with c
            # and W as scratch so that the block of y is the only temporary.
            c.copy_(w).add_(pending)  # t
            w.sub_(c).add_(pending)  # c'
            pending.copy_(w)
            w.copy_(c)
            c.copy_(pending)


def _add_change_(target: Tensor, delta: WeightDelta, product: tuple[Tensor, Tensor] | None, row_start: int) -> None:
    """``target += s·ΔW`` on ``target``'s rows (from ``row_start``), a compute-dtype block: one
    ``addmm_`` from the thin product when there is one, else through the projection."""
    if product is None:
        delta.add_to_(target, row_start)
        return
    left, right = product
    if row_start != 0 or target.shape[0] != left.shape[0]:
        left = left[row_start : row_start + target.shape[0]]
    target.addmm_(left, right, alpha=delta.scale)


@register_writer
class StochasticWriter(WeightWriter):
    """Unbiased stochastic rounding of ``W + s·ΔW`` into ``W``'s dtype, seeded by ints (module docstring)."""

    name = "stochastic"

    def init_state(self, weight: Tensor, seed: int) -> dict[str, Any]:
        """``rounding_seed`` (an int derived from the parameter's seed) and ``rounding_draws`` (writes so far)."""
        return {ROUNDING_SEED: derive_seed(seed, _ROUNDING_STREAM), ROUNDING_DRAWS: 0}

    def write_(self, weight: Tensor, state: dict[str, Any], delta: WeightDelta) -> None:
        """``W ← SR(W + s·ΔW)`` with bits from ``derive_seed(rounding_seed, rounding_draws)``: in one
        pass on the CPU for a bf16 ``W`` whose change is a thin product; elsewhere through a
        compute-dtype copy, one block of rows at a time (the whole weight on an accelerator)."""
        compute = delta.compute_dtype
        if not _is_narrower(weight.dtype, compute):
            delta.add_to_(weight)  # nothing to round beyond the compute dtype's own arithmetic
            return
        seed = derive_seed(state[ROUNDING_SEED], state[ROUNDING_DRAWS])
        state[ROUNDING_DRAWS] += 1
        product = delta.product()
        kernels = native_kernels()
        if product is not None and kernels is not None and kernels.supports_bf16_write(weight, compute):
            kernels.add_lowrank_stochastic_(weight, *product, delta.scale, seed, delta.row_offset)
            torch.autograd.graph.increment_version(weight)  # as an in-place torch op would
            return
        generator = seeded_generator(seed, weight.device)
        for start, stop in _rounding_blocks(weight):
            rows = weight[start:stop] if (start, stop) != (0, weight.shape[0]) else weight
            exact = rows.to(compute, copy=True)
            _add_change_(exact, delta, product, start)
            _round_rows_(rows, exact, generator)


def _rounding_blocks(weight: Tensor) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of blocks of whole rows: about :data:`BLOCK_ELEMENTS` elements on the CPU,
    the blocks of :func:`~lora_optim.kernels.blocks.row_blocks` in fp32 elsewhere (one block for
    any weight up to 256 MiB in fp32: one launch per op). The blocks depend on the shape and the
    device type only, so seeded rounding is reproducible on a kind of device."""
    rows = weight.shape[0]
    if not cpu_paths(weight.device):
        yield from row_blocks(rows, weight[0].numel() if rows else 1, torch.float32, weight.device)
        return
    step = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel() if rows else 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def stochastic_round_(target: Tensor, source: Tensor, seed: int) -> None:
    """``target ← SR(source)``: each element becomes one of its two neighbours in ``target``'s
    dtype, the upper with probability ``(x − lo)/(hi − lo)``, so ``E[target] = source``.

    ``source`` is a wider float tensor of ``target``'s shape and is used as scratch. Random bits
    come from a generator seeded with the int ``seed``, in blocks of whole rows (dim 0) of at
    most :data:`BLOCK_ELEMENTS` elements (the blocks depend on the shape only, so results are
    reproducible). bf16 from fp32 adds 16 random bits below bf16's mantissa and truncates
    (exact and branch-free); other dtypes pick between the nearest value and its neighbour.
    """
    if target.shape != source.shape:
        raise ValueError(f"stochastic_round_: shapes differ, {tuple(target.shape)} vs {tuple(source.shape)}")
    if source.ndim == 0:
        target, source = target.view(1), source.view(1)
    generator = seeded_generator(seed, source.device)
    for start, stop in _rounding_blocks(source):
        _round_rows_(target[start:stop], source[start:stop], generator)


def _round_rows_(target: Tensor, source: Tensor, generator: torch.Generator) -> None:
    if (target.dtype, source.dtype) == (torch.bfloat16, torch.float32):
        _truncate_bf16_(target, source, generator)
    else:
        _pick_neighbour_(target, source, generator)


def _truncate_bf16_(target: Tensor, source: Tensor, generator: torch.Generator) -> None:
    # fp32 bits: sign | 8 exponent | 23 mantissa; bf16 keeps the top 16. Adding a uniform
    # 16-bit integer to the magnitude and clearing the low 16 bits rounds the magnitude up with
    # probability (dropped bits)/2¹⁶: unbiased, and symmetric in the sign. Five ops.
    noise = torch.empty(source.shape, dtype=torch.int32, device=source.device).random_(0, 1 << 16, generator=generator)
    bits = source.view(torch.int32)
    bits.add_(noise).bitwise_and_(-(1 << 16))  # 0xFFFF0000
    target.copy_(source)  # exact: the dropped bits are zero


def _pick_neighbour_(target: Tensor, source: Tensor, generator: torch.Generator) -> None:
    nearest = source.to(target.dtype)
    residual = source - nearest.to(source.dtype)
    toward = torch.where(residual > 0, torch.inf, -torch.inf).to(target.dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.to(source.dtype) - nearest.to(source.dtype)
    chance = (residual / gap).nan_to_num_(0.0)  # gap is ±inf at the dtype's edge: stay put
    draw = torch.rand(source.shape, dtype=source.dtype, generator=generator, device=source.device)
    target.copy_(torch.where(draw < chance, neighbour, nearest))
