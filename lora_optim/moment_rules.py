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

        m_A \\leftarrow m_A\\,(B_{old} B_{new}^\\top), \\qquad
        m_B \\leftarrow (A_{new}^\\top A_{old})\\, m_B,

    because ``m_A ≈ s·Ḡ·B_oldᵀ`` and ``E[B_oldᵀ B_old] = I`` give ``m_A B_old B_newᵀ ≈ s·Ḡ·B_newᵀ``.
    The second moment is kept: a linear re-projection of ``v`` can make entries negative.

Which rule is the default of the ``random`` projection, and why, is in the docs
(``docs/choosing.md``); it was chosen by measurement on the packaged MiniLM task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lora_optim.projections.base import MOMENT_KEYS, FactorState

__all__ = ["MOMENT_RULES", "apply_moment_rule_"]


def _keep(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> None:
    pass


def _reset(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> None:
    for keys in MOMENT_KEYS.values():
        for key in keys:
            state[key].zero_()
    state["step"] = 0


def _transport(state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> None:
    (old_A, old_B), (new_A, new_B) = old, new
    exp_avg_A, exp_avg_B = state[MOMENT_KEYS["A"][0]], state[MOMENT_KEYS["B"][0]]
    exp_avg_A.copy_(exp_avg_A @ torch.mm(old_B, new_B.t()))
    exp_avg_B.copy_(torch.mm(new_A.t(), old_A) @ exp_avg_B)


MOMENT_RULES: dict[str, Callable[[FactorState, tuple[Tensor, Tensor], tuple[Tensor, Tensor]], None]] = {
    "keep": _keep,
    "reset": _reset,
    "transport": _transport,
}


def apply_moment_rule_(
    rule: str, state: FactorState, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]
) -> None:
    """Apply the moment rule ``rule`` to ``state`` for a redraw from ``old = (A, B)`` to ``new``."""
    try:
        MOMENT_RULES[rule](state, old, new)
    except KeyError:
        raise ValueError(f"moment_rule must be one of {tuple(MOMENT_RULES)}, got {rule!r}") from None
