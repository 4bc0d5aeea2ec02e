"""Data parallelism (DDP) and FSDP2: the layout of the factors, and the little they communicate.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) hands the optimizer weights and gradients as
DTensors sharded by rows (``Shard(0)`` on a 1-D mesh; uneven shards allowed). The factors are
laid out the same way: ``A`` (``out×r``), its Adam moments and every other tensor with one row
per row of ``W`` (:data:`~lora_optim.state_keys.ROW_SHARDED_KEYS`) are DTensors sharded by rows
like ``W``; ``B`` (``r×in``) and its moments are replicated. A step is then local but for one
sum: with this rank's rows ``G_k``, ``A_k`` of ``G`` and ``A``,

.. math::

    g_A\\big|_k = s\\,G_k B^\\top, \\qquad g_B = s\\sum_k A_k^\\top G_k, \\qquad
    W_k \\mathrel{+}= s\\,(A'_k\\,dB + dA_k\\,B),

so the only communication of the optimizer is one all-reduce of the ``r×in`` partial ``g_B`` of
every matrix (all matrices of a step in one call), and one of a few bytes of NaN/Inf flags, so
every rank skips the same parameters. No all-gather of ``W`` or ``G`` happens, except once per
weight when its state is created (``init_state`` sees the whole weight, so every init, PiSSA's
SVD included, is the one-process init; its result is then sharded). ``random`` draws the whole
``A`` from its int seed on every rank and keeps its rows (the same numbers as one process);
``additive`` folds rows by their global index. Checkpoints go through
``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``)
and reload onto another number of ranks, because the sharded state is made of DTensors.

**DDP** needs nothing in the plain mode: DDP averages ``G`` and every rank takes the same step
(``random`` draws the same matrices on every rank from its int seeds). In the activation-side
mode the factor gradients are formed locally from each rank's activations, so the mode
all-reduces them before the step (:meth:`LoRAAdam.reduce_projected_grads_
<lora_optim.LoRAAdam.reduce_projected_grads_>`): ``r·(out+in)`` values per matrix instead of
DDP's ``out·in``.

The activation-side mode meets FSDP2 the same way: each rank forms the whole ``g_A`` (``out×r``)
and ``g_B`` from its own batch, with the whole factors (an all-gather of ``A``, ``out×r``, per
layer use), and the step averages them over the ranks (one all-reduce of ``r·(out+in)`` values
per matrix) and keeps this rank's rows of ``g_A``. FSDP2 still all-gathers ``W`` for the forward,
but no gradient of ``W`` is formed or reduce-scattered.

This module holds the layout and the collectives; :class:`~lora_optim.LoRAAdam` calls it when it
sees a DTensor parameter, and the activation-side mode when it runs in a process group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_optim.state_keys import GLOBAL_ROWS, ROW_OFFSET

__all__ = [
    "RowShard",
    "row_shard",
    "is_dtensor",
    "local",
    "LocalState",
    "WholeState",
    "shard_rows_",
    "all_reduce_sum_",
    "data_parallel_group",
    "world_size",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: in-place changes land in it), or ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class RowShard:
    """Where this rank's rows of a weight sharded by rows sit in the whole weight."""

    #: The 1-D device mesh of the weight.
    mesh: Any
    #: Global index of this rank's first row.
    row_offset: int
    #: Rows of the whole weight (the matrix view's ``out``).
    global_rows: int
    #: Rows on this rank (may be 0 with more ranks than rows).
    local_rows: int

    @property
    def group(self) -> Any:
        """The process group of the mesh."""
        return self.mesh.get_group()


def row_shard(p: Tensor) -> RowShard | None:
    """The :class:`RowShard` of a DTensor sharded by rows on a 1-D mesh (FSDP2's layout), ``None``
    for an ordinary tensor. ``ValueError`` for another DTensor layout (replicated, sharded on
    another dim, 2-D meshes): the factors have no layout for it yet."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if p.device_mesh.ndim == 1 and placements == (Shard(0),):
        mesh = p.device_mesh
        size, rank = mesh.size(), mesh.get_local_rank()
        rows = p.shape[0]
        chunk = math.ceil(rows / size) if rows else 0  # torch.chunk's split, as DTensor's Shard(0)
        offset = min(rank * chunk, rows)
        local_rows = p.to_local().shape[0]
        if local_rows != min(chunk, rows - offset):
            raise ValueError(f"a DTensor of shape {tuple(p.shape)} has {local_rows} rows on rank {rank}; expected "
                             f"torch.chunk's split ({min(chunk, rows - offset)})")
        return RowShard(mesh, offset, rows, local_rows)
    if placements == (Replicate(),) * len(placements):
        raise ValueError(f"a replicated DTensor parameter of shape {tuple(p.shape)}: train the local tensor instead")
    raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} with placements {placements} on a "
                     f"{p.device_mesh.ndim}-D mesh: low-rank factors are laid out for FSDP2's Shard(0) on a 1-D "
                     "mesh only")


class LocalState(MutableMapping):
    """A view of one parameter's state on this rank: DTensors read as their local part (views:
    in-place changes land in the DTensor), every other value as it is; writes go to the state.

    With a ``shard``, reading :data:`~lora_optim.state_keys.ROW_OFFSET` and
    :data:`~lora_optim.state_keys.GLOBAL_ROWS` gives the rank's :class:`RowShard` (not stored).
    """

    def __init__(self, state: dict[str, Any], shard: RowShard | None = None) -> None:
        self._state = state
        self._extra = {} if shard is None else {ROW_OFFSET: shard.row_offset, GLOBAL_ROWS: shard.global_rows}

    def __getitem__(self, key: str) -> Any:
        if key in self._extra:
            return self._extra[key]
        return local(self._state[key])

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._extra:
            raise KeyError(f"{key!r} is the shard's, not the state's")
        if is_dtensor(self._state.get(key)) and isinstance(value, Tensor):
            raise TypeError(f"state[{key!r}] is sharded: change it in place (copy_), do not replace it")
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class WholeState(Mapping):
    """A read-only view of one parameter's state with every DTensor read whole (``full_tensor()``:
    an all-gather, so every rank must read the same keys in the same order). The activation-side
    mode on a sharded weight projects each rank's own batch with the whole factors."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return value.full_tensor() if is_dtensor(value) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def shard_rows_(state: dict[str, Any], keys: Sequence[str], shard: RowShard) -> None:
    """Replace every tensor of ``state`` under ``keys`` (whole, one row per row of ``W``) by a
    DTensor sharded by rows like ``W``, holding a copy of this rank's rows."""
    from torch.distributed.tensor import DTensor, Shard

    for key in keys:
        value = state.get(key)
        if not isinstance(value, Tensor) or is_dtensor(value):
            continue
        if value.shape[0] != shard.global_rows:
            raise ValueError(f"state[{key!r}] has {value.shape[0]} rows; the weight has {shard.global_rows}")
        rows = value[shard.row_offset : shard.row_offset + shard.local_rows].clone()
        state[key] = DTensor.from_local(rows, shard.mesh, [Shard(0)], run_check=False, shape=value.shape,
                                        stride=value.stride())


def all_reduce_sum_(tensors: Sequence[Tensor], group: Any) -> None:
    """Sum each tensor over the ranks of ``group``, in place, in one collective (the tensors are
    packed into one buffer per dtype)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        torch.distributed.all_reduce(flat, group=group)
        torch._foreach_copy_(same, [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in same]), same)])


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group if ``None``), or 1 outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def data_parallel_group(group: Any = None) -> Any | None:
    """The process group over which locally formed factor gradients must be averaged: ``group``,
    or the default group when one with more than one rank is initialized; ``None`` otherwise."""
    if group is not None:
        return group
    if world_size() > 1:
        return torch.distributed.group.WORLD
    return None
