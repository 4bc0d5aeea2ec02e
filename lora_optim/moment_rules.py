"""What happens to the Adam moments of the factors when a projection redraws them.

After a redraw the moments describe gradients of the *old* factors. Three rules:

``keep``
    ``m`` and ``v`` are carried over unchanged (GaLore does this at a subspace refresh).
``reset``
    ``m = v = 0`` and the step count restarts, so bias correction starts afresh. With a redraw
    every step this makes every update ``±lr`` per entry (``m̂/√v̂ = g/|g|``).
``transport``
    Flora-style: the first moment is carried into the new subspace,

    .. math::

        m_A \\leftarrow m_A\\,(B_{old} B_{old}^\\top)^{+} B_{old} B_{new}^\\top, \\qquad
        m_B \\leftarrow A_{new}^\\top A_{old} (A_{old}^\\top A_{old})^{+}\\, m_B,

    because ``m_A ≈ s·Ḡ·B_oldᵀ`` and the least-squares estimate of ``Ḡ`` from it is
    ``m_A (B_old B_oldᵀ)⁺ B_old / s`` (``Ḡ`` on ``B_old``'s row space): a gradient inside the old
    subspace is transported exactly. (Dropping ``(B_old B_oldᵀ)⁺ ≈ (r/in)·I`` scales ``m`` by
    about ``√(in/r)`` per redraw and diverges.)
    The second moment is kept: a linear re-projection of ``v`` can make entries negative.

Which rule is the default of the ``random`` projection, and why, is in the docs
(``docs/choosing.md``); it was chosen by measurement on the packaged MiniLM task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lora_optim.state_keys import MOMENT_KEYS, STEP

FactorState = dict[str, Any]  # per-parameter state: tensors and plain ints

__all__ = ["MOMENT_RULES", "apply_moment_rule_"]


def _keep(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], where: Tensor | None) -> None:
    pass


def _reset(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], where: Tensor | None) -> None:
    targets = [state[key] for keys in MOMENT_KEYS.values() for key in keys] + [state[STEP]]  # bias correction too
    for target in targets:
        if where is None:
            target.zero_()
        else:
            target.masked_fill_(where, 0)


def _transport(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor],
               where: Tensor | None) -> None:
    (old_A, old_B), (new_A, new_B) = old, new
    exp_avg_A, exp_avg_B = state[MOMENT_KEYS["A"][0]], state[MOMENT_KEYS["B"][0]]
    # m_A ≈ s·Ḡ·B_oldᵀ; the least-squares estimate of Ḡ from it is m_A·(B_old B_oldᵀ)⁻¹·B_old / s
    # (Ḡ projected on B_old's row space), so m_A ← m_A·(B_old B_oldᵀ)⁻¹·B_old·B_newᵀ. Without the
    # (B_old B_oldᵀ)⁻¹ ≈ (r/in)·I factor every transport multiplies m by ~√(in/r) and diverges.
    moved_A = exp_avg_A @ torch.linalg.pinv(old_B @ old_B.t(), hermitian=True) @ (old_B @ new_B.t())
    moved_B = (new_A.t() @ old_A) @ torch.linalg.pinv(old_A.t() @ old_A, hermitian=True) @ exp_avg_B
    for target, moved in ((exp_avg_A, moved_A), (exp_avg_B, moved_B)):
        target.copy_(moved if where is None else torch.where(where, moved, target))


MOMENT_RULES: dict[str, Callable[[FactorState, tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor | None],
                                 None]] = {
    "keep": _keep,
    "reset": _reset,
    "transport": _transport,
}


def apply_moment_rule_(
    rule: str, state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], *,
    where: Tensor | None = None,
) -> None:
    """Apply the moment rule ``rule`` to ``state`` for a redraw from ``old = (A, B)`` to ``new``;
    with ``where`` (a 0-dim bool tensor) only where it is true, decided on the device (the
    moments and the step count are otherwise left exactly as they were). ``transport`` takes two
    ``r×r`` pseudo-inverses (an eigendecomposition: a host sync on CUDA)."""
    try:
        MOMENT_RULES[rule](state, old, new, where)
    except KeyError:
        raise ValueError(f"moment_rule must be one of {tuple(MOMENT_RULES)}, got {rule!r}") from None
