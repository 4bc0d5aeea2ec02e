"""Sparsity-preserving updates (LoRS): every zero of ``W`` stays exactly zero.

With ``preserve_sparsity=True`` (a per-group option) a low-rank parameter trains the
parametrisation of LoRS (Hu et al. 2024),

.. math::

    W = W_0 + s\\,(A B)\\odot M, \\qquad M = [W_0 \\ne 0],

whose factor gradients are the ``lora`` ones of the masked gradient ``G ⊙ M``,

.. math::

    \\frac{\\partial L}{\\partial A} = s\\,(G\\odot M)\\,B^\\top, \\qquad
    \\frac{\\partial L}{\\partial B} = s\\,A^\\top (G\\odot M),

and whose steps write ``s·(Δ(A', B') − Δ(A, B)) ⊙ M`` (any projection's ``Δ``). The step engine
(:mod:`lora_optim.engine`) masks ``G`` before it is projected (and before ``step_factors`` sees
it, so ``init="gradient"`` and ``projection="svd"`` take their singular vectors from ``G ⊙ M``)
and hands every write mode a :class:`~lora_optim.weight_change.MaskedWeightDelta`, which adds
``0`` wherever ``M`` is false. ``W + 0 = W`` exactly in every dtype, and the write modes' own
state stays zero there too (``compensated``'s buffer starts at zero and gets ``0 + 0``;
``stochastic`` rounds ``0`` to ``0``), so in every precision mode a zero of ``W₀`` is still
exactly zero after any number of steps.

**The mask is stored, packed 8 columns per byte**: ``out·⌈in/8⌉`` bytes per matrix
(:data:`~lora_optim.state_keys.SPARSITY_MASK`), 1/32 of an fp32 ``W`` and 1/16 of a bf16 one.
For the 36 encoder matrices of MiniLM-L6 that is 1.27 MiB (the ``lora`` factors and moments at
``r = 8``: 3.81 MiB; the fp32 weights: 40.5 MiB); for a 4096×4096 matrix 2 MiB (its ``r = 8``
state: 0.75 MiB). LoRS recomputes ``M = [W ≠ 0]`` from ``W`` instead, which keeps nothing but
is only exact while no update lands a non-zero weight exactly on zero: a bf16 weight of
``−2⁻¹⁰`` and an update of ``+2⁻¹⁰`` do, and a recomputed mask then freezes that weight for
good (and the parametrisation above no longer holds). A stored ``M₀`` makes the statement exact
whatever the updates, costs one bit per weight, survives checkpoints (it is optimizer state),
and lets the per-layer and activation-side modes mask their pieces from the state alone. The
mask is taken from ``W`` when the parameter's optimizer state is created (its first
``step()``, ``accumulate_*`` or ``get_factors``); pruning ``W`` further after that is not seen.

Only the low-rank matrices are masked: densely trained parameters (vectors, ``rank=None``
groups) take plain AdamW steps, which move their zeros.

Per step and matrix the mask costs two ops to unpack (a bitwise ``and`` and a compare), one to
mask ``G`` (a copy: ``p.grad`` is never changed), and in the write one masked product per block
of rows (:mod:`lora_optim.kernels.blocks`), instead of adding the change into ``W`` directly.

Modes: the per-layer mode masks each gradient piece (masking is linear, so the sums equal the
plain mode's). The activation-side mode would form ``(δYᵀX) ⊙ M``, which has no low-rank
shortcut: with ``preserve_sparsity=True`` it forms ``G = δYᵀX`` of each piece, masks it and
projects it, exactly, so it saves nothing over the per-layer mode there (the layers' weights
still need no ``requires_grad``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim.projections.base import FactorChange, Projection
from lora_optim.state_keys import SPARSITY_MASK

__all__ = [
    "PRESERVE_SPARSITY",
    "init_sparsity_state",
    "pack_mask",
    "unpack_mask",
    "sparsity_mask",
    "mask_grad",
    "mask_bytes",
    "masked_probe_delta",
]

#: The group option that turns the mask on.
PRESERVE_SPARSITY = "preserve_sparsity"

_BITS: dict[torch.device, Tensor] = {}


def _bits(device: torch.device) -> Tensor:
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=device)
    return bits


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean ``out×in`` matrix packed 8 columns per byte: uint8 ``out×⌈in/8⌉``, column
    ``j`` in bit ``j mod 8`` of byte ``j // 8`` (the padding bits are 0)."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"pack_mask expects a 2-D bool tensor, got shape {tuple(mask.shape)} and dtype {mask.dtype}")
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _bits(mask.device)).sum(dim=2, dtype=torch.uint8)


def unpack_mask(packed: Tensor, in_features: int) -> Tensor:
    """The boolean ``rows×in`` mask of :func:`pack_mask` output ``packed`` (any block of its rows)."""
    rows = packed.shape[0]
    bits = torch.bitwise_and(packed.unsqueeze(-1), _bits(packed.device)).ne_(0)
    return bits.view(rows, -1)[:, :in_features]


def init_sparsity_state(weight: Tensor) -> dict[str, Any]:
    """``{sparsity_mask: pack_mask(W ≠ 0)}`` for the ``out×in`` matrix ``weight``."""
    return {SPARSITY_MASK: pack_mask(weight.detach() != 0)}


def mask_bytes(out_features: int, in_features: int) -> int:
    """Bytes of the stored mask of an ``out×in`` matrix: ``out·⌈in/8⌉``."""
    return out_features * -(-in_features // 8)


def sparsity_mask(state: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor | None:
    """The packed mask of a parameter whose group has ``preserve_sparsity=True``, else ``None``.

    Raises ``ValueError`` if the group asks for it but the state was created without it (the
    option was switched on after the parameter's first step: the zeros to keep are those of
    ``W`` when the state is created, and that moment has passed).
    """
    if not options.get(PRESERVE_SPARSITY, False):
        return None
    mask = state.get(SPARSITY_MASK)
    if mask is None:
        raise ValueError(
            "preserve_sparsity=True, but this parameter's optimizer state has no sparsity mask: the option was "
            "switched on after its state was created (the mask M = [W != 0] is taken then). Set it when the "
            "optimizer is constructed"
        )
    return mask


def mask_grad(grad: Tensor, packed: Tensor) -> Tensor:
    """``G ⊙ M`` as a new tensor of ``G``'s dtype (``G`` is ``out×in``). A NaN or Inf anywhere in
    ``G`` stays a NaN (``Inf·0 = NaN``), so the step's finite check still sees it."""
    return grad.mul(unpack_mask(packed, grad.shape[1]))


def masked_probe_delta(projection: Projection, change: FactorChange, scale: float, probes: Tensor,
                       packed: Tensor) -> Tensor:
    """The exact change of ``W·X`` of a masked step, ``((s·ΔW) ⊙ M)·X`` in ``probes``' dtype
    (fp64), for the drift check (:mod:`lora_optim.drift`). Forms ``s·ΔW`` in full (the mask has
    no low-rank shortcut); the check is opt-in (``drift_probes``)."""
    A, B, A_new, B_new = (t.to(probes.dtype) for t in (change.A, change.B, change.A_new, change.B_new))
    wide = FactorChange(A, B, A_new, B_new, A_new - A, B_new - B, change.row_offset)
    buffer = torch.zeros(change.A.shape[0], change.B.shape[1], dtype=probes.dtype, device=probes.device)
    projection.add_delta_(buffer, wide, scale)
    return buffer.mul_(unpack_mask(packed, buffer.shape[1])) @ probes
