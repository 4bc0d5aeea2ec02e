"""Unmerging a run's change from the weights, and switching tasks on one base model.

Seed 000's point about LoRA: the change ``s·B·A`` (our ``s·A·B``) can be merged into ``W`` for
free inference, and subtracted again to switch tasks: ``W₀ + s·A₁B₁ → W₀ → W₀ + s·A₂B₂``. The
optimizer's weights are always merged; :func:`unmerge_` takes the change out,

.. math::

    W \\leftarrow W - \\big(s\\,(\\Delta(A, B) - \\Delta(A_0, B_0))\\big) \\odot M = W_{\\text{base}},

(:mod:`lora_optim.learnt_change`; ``M`` is the mask of a ``preserve_sparsity=True`` group, all
ones otherwise, so every kept zero stays zero) by moving the factors back to their initial values
with the write of a normal step
(:meth:`LoRAAdam.set_factors(p, A₀, B₀, update_weight=True) <lora_optim.LoRAAdam.set_factors>`):
exact for ``lora`` and ``additive`` up to the rounding of one write, and for a bf16 weight with
``compensated`` writes the Kahan buffer carries what rounding dropped over the run, so ``W₀``
comes back to the bit for almost every element. The optimizer is then as at the start (factors
``A₀``, ``B₀``; Adam moments zero) and trains on from ``W_base``.

Task switching (docs/interop.md): export task 1's adapter
(:func:`~lora_optim.interop.export_peft_adapter`), and :func:`~lora_optim.interop.load_peft_adapter`
task 2's: the load writes the difference between task 2's change and the current one
(:meth:`LoRAAdam.merge_factors <lora_optim.LoRAAdam.merge_factors>`), so ``W = W_base + s·A₂B₂``
without a trip through ``W₀``, whatever the init; :func:`unmerge_` goes back to the base.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_optim.optimizer import LoRAAdam

__all__ = ["unmerge_"]


@torch.no_grad()
def unmerge_(model: nn.Module, optimizer: LoRAAdam, *, strict: bool = True) -> list[str]:
    """Put every low-rank weight of ``model`` that ``optimizer`` has trained back to its base
    ``W_base`` (module docstring), in place; returns the names of the weights restored.

    Raises ``ValueError``, before changing anything, when a weight's initial factors are unknown
    (``random``, whose change sums its draws; a non-zero ``A₀·B₀`` not kept: construct with
    ``keep_initial_factors=True``), and, with ``strict=True``, when ``optimizer`` has trained a
    parameter of ``model`` densely (a bias, a head: its base value is not known to the
    optimizer; ``strict=False`` leaves those as they are). Restore such weights from the base
    model instead. Between ``backward`` and ``step()`` in the per-layer or activation-side modes
    (projected pieces made with the current factors are pending) it raises ``RuntimeError``,
    before changing anything.
    """
    if not isinstance(optimizer, LoRAAdam):
        raise TypeError(f"unmerge_ expects a lora_optim.LoRAAdam, got {type(optimizer).__name__}")
    ours = {id(p) for group in optimizer.param_groups for p in group["params"]}
    moves, unknown, dense = [], [], []
    for name, p in model.named_parameters():
        if id(p) not in ours or p not in optimizer.state:
            continue
        if not optimizer.is_low_rank(p):
            dense.append(name)
            continue
        initial = optimizer.learnt_change(p).initial
        if initial is None:
            unknown.append(name)
        else:
            moves.append((name, p, initial))
    if unknown:
        raise ValueError(
            f"unmerge_: the initial factors of {unknown} are unknown (projection 'random', or a non-zero initial "
            "product without keep_initial_factors=True); nothing was changed. Restore them from the base model."
        )
    pending = [name for name, p, _ in moves if optimizer.has_pending_pieces(p)]
    if pending:
        raise RuntimeError(f"unmerge_: {pending} have projected gradient pieces of a coming step (per-layer or "
                           "activation-side mode); nothing was changed. Unmerge before backward or after step()")
    if dense and strict:
        raise ValueError(
            f"unmerge_: {dense} are trained densely, so their base values are not known to the optimizer; nothing was "
            "changed. Pass strict=False to restore the low-rank weights only."
        )
    for _, p, (A0, B0) in moves:
        optimizer.set_factors(p, A0, B0, update_weight=True)
    return [name for name, _, _ in moves]
