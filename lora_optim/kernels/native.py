"""Typed, threaded access to the compiled CPU kernels (``cpu_kernels.cpp``).

Each method does one full pass over a weight-sized matrix, split into row chunks over threads:

* :meth:`NativeKernels.project_lowrank`: ``(G·Bᵀ, Aᵀ·G)`` reading ``G`` once;
* :meth:`NativeKernels.add_lowrank_`: ``W ← round(W + s·L·R)``, reading and writing ``W`` once;
  for bf16 weights also with stochastic rounding (:meth:`NativeKernels.add_lowrank_stochastic_`)
  or Kahan compensation (:meth:`NativeKernels.add_lowrank_compensated_`), the write modes of
  :mod:`lora_optim.precision`, in the same single pass;
* :meth:`NativeKernels.fold_additive` / :meth:`NativeKernels.spread_additive_`: the same two
  passes for the ``additive`` projection.

Supported storage: fp32 and bf16 matrices with fp32 factors, fp64 with fp64 factors, on the CPU,
with unit column stride. ``G`` and ``W`` are read and written in their own dtype (a bf16 ``G`` is
never copied to fp32, a bf16 ``W`` is rounded to nearest-even once per element, as
``W.add_(delta)`` rounds). Sums run in a different order than torch's GEMMs, so results agree
with the torch path to float rounding, not bit for bit. They do not depend on the thread count
or on scheduling: rows are chunked by shape alone and the per-chunk partial sums of ``Aᵀ·G``
are added in chunk order.

:func:`native_kernels` returns the loaded kernels, or ``None`` when they are off or unavailable
(and inside ``torch.compile``d code, which runs the same math in torch ops);
:func:`use_native` switches them off or on within a block (tests compare both paths).
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lora_optim.kernels.build import load_library
from lora_optim.kernels.threads import run_rows, worker_count

__all__ = ["NativeKernels", "native_kernels", "use_native", "native_enabled"]

# storage dtype -> (function suffix, compute dtype)
_STORAGE = {
    torch.float32: ("f32", torch.float32),
    torch.bfloat16: ("bf16", torch.float32),
    torch.float64: ("f64", torch.float64),
}

_P, _I, _D, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
# (matrix, row stride, row0, row1, middle arguments..., chunk_rows, threads)
_SIGNATURES = {
    "project": [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _INT],
    "update": [_P, _I, _I, _I, _I, _I, _P, _P, _D, _I, _INT],
    "fold": [_P, _I, _I, _I, _I, _I, _P, _P, _I, _INT],
    "spread": [_P, _I, _I, _I, _I, _I, _P, _P, _D, _I, _INT],
}

#: The bf16-only write modes of the update pass: (name, arguments after the row range).
_BF16_WRITES = {
    "update_sr": [_P, _I, _I, _I, _I, _I, _P, _P, _D, _P, _P, _I, _INT],
    "update_kahan": [_P, _I, _I, _I, _I, _I, _P, _P, _D, _P, _I, _I, _INT],
}

_switch = threading.local()


def native_enabled() -> bool:
    """Whether native kernels may be used in this thread (see :func:`use_native`)."""
    return getattr(_switch, "enabled", True)


@contextmanager
def use_native(enabled: bool) -> Iterator[None]:
    """Within the block (in this thread), use the native kernels only if ``enabled``."""
    previous = native_enabled()
    _switch.enabled = bool(enabled)
    try:
        yield
    finally:
        _switch.enabled = previous


#: Budget for the per-chunk partial sums of a reduction (``chunks × r × in`` values).
PARTIAL_BYTES = 16 << 20

#: Work (multiply-adds or elements) below which a chunk would cost more to hand out than to do.
CHUNK_WORK = 1 << 20


def _chunk_rows(rows: int, work: int, partial_bytes: int = 0) -> int:
    """Rows per chunk, a function of the shape only (never of the thread count), so that
    reductions summed per chunk give the same bits on any machine: up to 16 chunks of at least
    :data:`CHUNK_WORK` each, fewer (but at least 4) when each needs a large partial sum; a
    multiple of 8 rows."""
    chunks = max(1, min(16, work // CHUNK_WORK))
    if partial_bytes > 0:
        chunks = min(chunks, max(4, PARTIAL_BYTES // partial_bytes))
    chunk_rows = math.ceil(rows / chunks)
    return -(-chunk_rows // 8) * 8


def _sum_in_order(partials: Tensor) -> Tensor:
    # A fixed order of additions, whatever torch's reduction kernels would choose. The total is a
    # tensor of its own: a view of partials[0] would keep every chunk's partial sum alive for as
    # long as the factor gradient lives (in the per-layer mode's sums, until the step).
    total = partials[0].clone()
    for partial in partials[1:]:
        total += partial
    return total


class NativeKernels:
    """The compiled kernels of one loaded library; see the module docstring."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions = {}
        for kind, argtypes in _SIGNATURES.items():
            for suffix, _ in _STORAGE.values():
                function = getattr(library, f"lo_{kind}_{suffix}")
                function.argtypes = argtypes
                function.restype = None
                self._functions[kind, suffix] = function
        for kind, argtypes in _BF16_WRITES.items():
            function = getattr(library, f"lo_{kind}_bf16")
            function.argtypes = argtypes
            function.restype = None
            self._functions[kind, "bf16"] = function
        library.lo_openmp.restype = ctypes.c_int
        library.lo_vector_bytes.restype = ctypes.c_int
        #: Whether the library threads itself (OpenMP, sharing torch's runtime); else Python
        #: threads call it one chunk at a time.
        self.openmp = bool(library.lo_openmp())
        #: SIMD width the library was built for, in bytes.
        self.vector_bytes = int(library.lo_vector_bytes())

    @staticmethod
    def supports(matrix: Tensor, compute_dtype: torch.dtype) -> bool:
        """Whether ``matrix`` (a ``G`` or ``W``) can go through the kernels with factors of
        ``compute_dtype``: a non-empty 2-D CPU tensor of a supported dtype, unit column stride."""
        storage = _STORAGE.get(matrix.dtype)
        return (
            storage is not None
            and storage[1] == compute_dtype
            and matrix.device.type == "cpu"
            and matrix.layout == torch.strided
            and matrix.dim() == 2
            and matrix.numel() > 0
            and matrix.stride(1) == 1
            and (matrix.shape[0] == 1 or matrix.stride(0) >= matrix.shape[1])
            and not matrix.is_conj()
            and not matrix.is_neg()
        )

    def _launch(self, kind: str, matrix: Tensor, middle: tuple, *, work: int, chunk: int,
                partials: Tensor | None = None) -> None:
        """One pass of kernel ``kind`` over all rows of ``matrix``, ``chunk`` rows per task."""
        function = self._functions[kind, _STORAGE[matrix.dtype][0]]
        rows = matrix.shape[0]
        head = (matrix.data_ptr(), matrix.stride(0))
        threads = worker_count(work)
        if self.openmp:
            extra = () if partials is None else (partials.data_ptr(),)
            function(*head, 0, rows, *middle, *extra, chunk, threads)
            return
        partial_ptrs = [] if partials is None else [p.data_ptr() for p in partials]

        def task(index: int, row0: int, row1: int) -> None:
            extra = () if partials is None else (partial_ptrs[index],)
            function(*head, row0, row1, *middle, *extra, chunk, 1)

        run_rows(task, rows, chunk, threads)

    def project_lowrank(self, grad: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(G·Bᵀ, Aᵀ·G)`` in ``A``'s dtype, one pass over ``G`` (``n×m``; ``A`` ``n×r``, ``B`` ``r×m``)."""
        rows, cols = grad.shape
        rank = A.shape[1]
        A, B = A.contiguous(), B.contiguous()
        chunk = _chunk_rows(rows, rows * cols * rank, rank * cols * A.element_size())
        grad_A = torch.empty(rows, rank, dtype=A.dtype)
        partials = torch.empty(math.ceil(rows / chunk), rank, cols, dtype=A.dtype)  # zeroed per chunk
        self._launch("project", grad, (cols, rank, A.data_ptr(), B.data_ptr(), grad_A.data_ptr()),
                     work=rows * cols * rank, chunk=chunk, partials=partials)
        return grad_A, _sum_in_order(partials)

    def add_lowrank_(self, weight: Tensor, left: Tensor, right: Tensor, scale: float) -> None:
        """``W ← round(W + scale·left·right)`` in place (``left`` ``n×K``, ``right`` ``K×m``)."""
        rows, cols = weight.shape
        inner = left.shape[1]
        left, right = left.contiguous(), right.contiguous()
        work = rows * cols * inner
        self._launch("update", weight, (cols, inner, left.data_ptr(), right.data_ptr(), float(scale)),
                     work=work, chunk=_chunk_rows(rows, work))

    @classmethod
    def supports_bf16_write(cls, weight: Tensor, compute_dtype: torch.dtype) -> bool:
        """Whether the stochastic and compensated update passes take ``weight``: a bf16 weight that
        :meth:`supports` with fp32 factors."""
        return weight.dtype == torch.bfloat16 and cls.supports(weight, compute_dtype)

    def add_lowrank_stochastic_(self, weight: Tensor, left: Tensor, right: Tensor, scale: float, row_bits: Tensor,
                                column_bits: Tensor) -> None:
        """``W ← SR(W + scale·left·right)`` for a bf16 ``W``: each element becomes one of its two bf16
        neighbours, the upper with probability (distance from the lower) / (gap), with the 16
        random bits ``row_bits[i] ^ column_bits[j]`` (int32 vectors of ``W``'s rows and columns,
        :func:`lora_optim.precision.rounding_bits`)."""
        rows, cols = weight.shape
        inner = left.shape[1]
        left, right = left.contiguous(), right.contiguous()
        row_bits = row_bits.to(torch.int32).contiguous()
        column_bits = column_bits.to(torch.int32).contiguous()
        if row_bits.shape != (rows,) or column_bits.shape != (cols,):
            raise ValueError(f"add_lowrank_stochastic_: bits of shapes {tuple(row_bits.shape)}, "
                             f"{tuple(column_bits.shape)} for a weight of shape {(rows, cols)}")
        work = rows * cols * inner
        self._launch("update_sr", weight, (cols, inner, left.data_ptr(), right.data_ptr(), float(scale),
                                           row_bits.data_ptr(), column_bits.data_ptr()),
                     work=work, chunk=_chunk_rows(rows, work))

    def add_lowrank_compensated_(self, weight: Tensor, compensation: Tensor, left: Tensor, right: Tensor,
                                 scale: float) -> None:
        """Kahan-compensated ``W += scale·left·right`` for a bf16 ``W`` with a bf16 buffer ``c`` of its
        shape: ``x = W + (c + scale·left·right)`` in fp32, ``W ← round(x)``, ``c ← round(x − W)``."""
        if compensation.dtype != torch.bfloat16 or compensation.shape != weight.shape or compensation.stride(1) != 1:
            raise ValueError("add_lowrank_compensated_: the buffer must be a bf16 matrix of the weight's shape "
                             "with unit column stride")
        rows, cols = weight.shape
        inner = left.shape[1]
        left, right = left.contiguous(), right.contiguous()
        work = rows * cols * inner
        self._launch("update_kahan", weight, (cols, inner, left.data_ptr(), right.data_ptr(), float(scale),
                                              compensation.data_ptr(), compensation.stride(0)),
                     work=work, chunk=_chunk_rows(rows, work))

    def fold_additive(self, grad: Tensor, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Block sums ``(Σ_{j≡k mod r} G_ij, Σ_{i≡k mod r} G_ij)`` in ``dtype``, one pass over ``G``."""
        rows, cols = grad.shape
        grad_A = torch.empty(rows, rank, dtype=dtype)
        chunk = _chunk_rows(rows, rows * cols, rank * cols * grad_A.element_size())
        partials = torch.empty(math.ceil(rows / chunk), rank, cols, dtype=dtype)  # zeroed per chunk
        self._launch("fold", grad, (cols, rank, grad_A.data_ptr()), work=rows * cols, chunk=chunk,
                     partials=partials)
        return grad_A, _sum_in_order(partials)

    def spread_additive_(self, weight: Tensor, columns: Tensor, rows_: Tensor, scale: float) -> None:
        """``W_ij ← round(W_ij + scale·(columns[i, j mod r] + rows_[i mod r, j]))`` in place."""
        rows, cols = weight.shape
        rank = columns.shape[1]
        columns, rows_ = columns.contiguous(), rows_.contiguous()
        self._launch("spread", weight, (cols, rank, columns.data_ptr(), rows_.data_ptr(), float(scale)),
                     work=rows * cols, chunk=_chunk_rows(rows, rows * cols))


_kernels: dict[str, NativeKernels | None] = {}


def native_kernels() -> NativeKernels | None:
    """The native kernels, or ``None`` if switched off (:func:`use_native`, ``LORA_OPTIM_NATIVE=0``)
    or not buildable here."""
    if torch.compiler.is_compiling() or not native_enabled():
        return None  # a compiled step runs the torch math (inductor cannot trace a ctypes call)
    if "kernels" not in _kernels:
        library = load_library()
        _kernels["kernels"] = NativeKernels(library) if library is not None else None
    return _kernels["kernels"]
