"""``random``: LoRA whose factors are redrawn every ``resample_every`` steps.

At every redraw ``A`` (out×r) and ``B`` (r×in) get i.i.d. ``N(0, 1/r)`` entries, so

.. math::

    \\mathbb{E}[A A^\\top] = I_{out}, \\qquad \\mathbb{E}[B^\\top B] = I_{in}.

Between redraws the factors train exactly as in ``lora``. ``W`` is not changed by a redraw: only
the changes ``s·(A'B' − AB)`` are ever written, so ``W`` keeps everything learnt so far and a new
draw starts a fresh low-rank subspace. With plain SGD one step moves ``W`` by
``−η s²(G BᵀB + A AᵀG) + O(η²)``, whose expectation is ``−2η s² G``: in the mean, full-rank SGD.

Draw ``k`` of a parameter is a pure function of ``(param seed, k)``; nothing about the random
stream is stored. With ``resample_every=1`` the factors are not stored either: each step's
factors are that step's draw, regenerated from the seed (state is the moments alone). With a
longer period the factors train between draws, so they are stored.

Options: ``resample_every`` (int ≥ 1, default 1) and ``moment_rule`` (``"keep"``,
``"reset"`` or ``"transport"``, see :mod:`lora_optim.moment_rules`).
State: ``draws`` (number of draws made), ``age`` (steps taken on the current draw), and
``A``, ``B`` when ``resample_every > 1``; shapes, ``rank`` and ``seed`` come from the state the
optimizer keeps for every low-rank parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lora_optim.moment_rules import MOMENT_RULES, apply_moment_rule_
from lora_optim.projections import register_projection
from lora_optim.projections.base import FactorState
from lora_optim.projections.lora import LoRAProjection
from lora_optim.seeding import derive_seed, gaussian

__all__ = ["RandomProjection", "draw_factors"]


def draw_factors(
    out_features: int, in_features: int, rank: int, seed: int, draw: int, *,
    dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Draw ``draw`` of a parameter with int ``seed``: ``A`` (out×r), ``B`` (r×in), entries ``N(0, 1/r)``."""
    std = 1.0 / math.sqrt(rank)
    draw_seed = derive_seed(seed, draw)
    A = gaussian((out_features, rank), std, derive_seed(draw_seed, 0), dtype=dtype, device=device)
    B = gaussian((rank, in_features), std, derive_seed(draw_seed, 1), dtype=dtype, device=device)
    return A, B


class _LazyDraw(Sequence):
    """The pair ``(A, B)`` of one draw, generated on first access: the moment rules that ignore
    the outgoing factors (``keep``, ``reset``) then cost no draw."""

    def __init__(self, draw: Callable[[FactorState, int], tuple[Tensor, Tensor]], state: FactorState, index: int):
        self._make = lambda: draw(state, index)  # shapes, rank and seed: fixed across a redraw
        self._factors: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        if self._factors is None:
            self._factors = self._make()
        return self._factors[index]


@register_projection
class RandomProjection(LoRAProjection):
    """Random Gaussian factors, redrawn every ``resample_every`` steps (see module docstring)."""

    name = "random"
    options: Mapping[str, Any] = {"resample_every": 1, "moment_rule": "keep"}

    def validate_options(self, group: Mapping[str, Any]) -> None:
        """``resample_every`` a positive int; ``moment_rule`` a known rule."""
        every = group["resample_every"]
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"resample_every must be an int >= 1, got {every!r}")
        if group["moment_rule"] not in MOMENT_RULES:
            raise ValueError(f"moment_rule must be one of {tuple(MOMENT_RULES)}, got {group['moment_rule']!r}")

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Draw 0 is the current draw; factors are stored only if ``resample_every > 1``."""
        state: FactorState = {"draws": 1, "age": 0}
        if group["resample_every"] > 1:
            out_features, in_features = weight.shape
            state["A"], state["B"] = draw_factors(out_features, in_features, rank, seed, 0,
                                                  dtype=factor_dtype, device=weight.device)
        return state

    @staticmethod
    def _draw(state: FactorState, draw: int) -> tuple[Tensor, Tensor]:
        # Shapes, dtype and device come from the moments, which every low-rank state has.
        exp_avg_A, exp_avg_B = state["exp_avg_A"], state["exp_avg_B"]
        return draw_factors(exp_avg_A.shape[0], exp_avg_B.shape[1], state["rank"], state["seed"], draw,
                            dtype=exp_avg_A.dtype, device=exp_avg_A.device)

    @staticmethod
    def _current_draw(state: FactorState) -> tuple[Tensor, Tensor]:
        if "A" in state:
            return state["A"], state["B"]
        return RandomProjection._draw(state, state["draws"] - 1)

    @staticmethod
    def _due(state: FactorState, group: Mapping[str, Any]) -> bool:
        return state["age"] >= group["resample_every"]

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Stored factors, or (when not stored) the draw the next step will use."""
        if "A" not in state and self._due(state, group):
            return self._draw(state, state["draws"])
        return self._current_draw(state)

    def begin_step(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Redraw if ``resample_every`` steps were taken on the current draw, applying the moment rule.

        One draw per redraw: the outgoing draw is regenerated only if the moment rule reads it,
        and the new draw is returned as made (not regenerated again).
        """
        if not self._due(state, group):
            state["age"] += 1
            return self._current_draw(state)
        if "A" in state:
            old: Sequence[Tensor] = (state["A"], state["B"])  # read by the moment rule before the copy below
        else:
            old = _LazyDraw(self._draw, state, state["draws"] - 1)
        new = self._draw(state, state["draws"])
        state["draws"] += 1
        state["age"] = 1
        apply_moment_rule_(group["moment_rule"], state, old, new)
        if "A" in state:
            state["A"].copy_(new[0])
            state["B"].copy_(new[1])
            return state["A"], state["B"]
        return new

    def step_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The draw :meth:`begin_step` chose for the step in progress (stored, or regenerated from
        the seed), never the next one."""
        return self._current_draw(state)

    def commit_(self, state: FactorState, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor) -> None:
        """Stored factors take the step; regenerated ones are discarded (the next step redraws)."""
        if "A" in state:
            super().commit_(state, A, B, dA, dB)

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Only possible when factors are stored (``resample_every > 1``); they last until the next redraw."""
        if "A" not in state:
            raise ValueError(
                "set_factors needs stored factors; with projection='random' and resample_every=1 every step "
                "draws new factors, so there is nothing to set"
            )
        super().set_factors_(state, A, B, group)
