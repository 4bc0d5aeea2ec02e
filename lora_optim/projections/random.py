"""``random``: LoRA whose factors are redrawn every ``resample_every`` steps.

At every redraw ``A`` (out×r) and ``B`` (r×in) get i.i.d. ``N(0, 1/r)`` entries, so

.. math::

    \\mathbb{E}[A A^\\top] = I_{out}, \\qquad \\mathbb{E}[B^\\top B] = I_{in}.

Between redraws the factors train exactly as in ``lora``. ``W`` is not changed by a redraw: only
the changes ``s·(A'B' − AB)`` are ever written, so ``W`` keeps everything learnt so far and a new
draw starts a fresh low-rank subspace. With plain SGD one step moves ``W`` by
``−η s²(G BᵀB + A AᵀG) + O(η²)``, whose expectation is ``−2η s² G``: in the mean, full-rank SGD.

Draw ``k`` of a parameter is a pure function of ``(param seed, k)`` (:func:`draw_factors`: a
counter-based hash in torch ops, :func:`lora_optim.seeding.hash_normal`); nothing about the
random stream is stored. With ``resample_every=1`` the factors are not stored either: each
step's factors are that step's draw, regenerated from the seed (state is the moments alone).
With a longer period the factors train between draws, so they are stored.

The counters (``draws``, ``age``) are 0-dim int64 tensors on the weight's device, so the draw
a step uses is chosen on the device (no host read, and a compiled step does not specialise on
them). The draw is fixed by :meth:`RandomProjection.step_factors` without side effects, and
committed (draw counter, moment rule) by :meth:`RandomProjection.begin_step` where the step is
taken, masked on the device: a step skipped for a NaN/Inf gradient leaves the draws as they
were, in every mode. With stored factors (``resample_every > 1``) every step makes the next
draw and selects it with ``torch.where`` (``r·(out+in)`` numbers, no host read).
:meth:`~lora_optim.LoRAAdam.set_factors` starts a new period of ``resample_every`` steps with
the factors it sets.

Options: ``resample_every`` (int ≥ 1, default 1) and ``moment_rule`` (``"keep"``,
``"reset"`` or ``"transport"``, see :mod:`lora_optim.moment_rules`).
State: ``draws`` (number of draws made), ``age`` (steps taken on the current draw), both 0-dim
int64 tensors, and
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
from lora_optim.options import Option, choice, integer
from lora_optim.projections.registry import register_projection
from lora_optim.projections.base import FactorState
from lora_optim.projections.lora import LoRAProjection
from lora_optim.seeding import hash_normal, step_key
from lora_optim.state_keys import AGE, DRAWS, EXP_AVG_A, EXP_AVG_B, FACTOR_A, FACTOR_B, GLOBAL_ROWS, RANK, ROW_OFFSET, SEED

__all__ = ["RandomProjection", "draw_factors"]


def draw_factors(
    out_features: int, in_features: int, rank: int, seed: int, draw: int | Tensor, *,
    dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Draw ``draw`` (an int, or a 0-dim int64 tensor on ``device``: no host read) of a parameter
    with int ``seed``: ``A`` (out×r), ``B`` (r×in), entries ``N(0, 1/r)``.

    The ``out·r + r·in`` numbers are :func:`~lora_optim.seeding.hash_normal` of the draw's key
    :func:`~lora_optim.seeding.step_key` ``(seed, draw)``: ``A`` row-major first, then ``B``. Each
    number depends on the seed, the draw and its position only, so every device and every code
    path (eager, compiled, one draw or many) makes the same draw.
    """
    std = 1.0 / math.sqrt(rank)
    if isinstance(draw, Tensor):
        draw = draw.to(device=device, dtype=torch.int64)
    values = hash_normal(out_features * rank + rank * in_features, step_key(seed, draw), dtype=torch.float64,
                         device=device).mul_(std).to(dtype)
    A = values[: out_features * rank].view(out_features, rank)
    B = values[out_features * rank :].view(rank, in_features)
    return A, B


class _LazyDraw(Sequence):
    """The pair ``(A, B)`` of one draw, generated on first access: the moment rules that ignore
    the outgoing factors (``keep``, ``reset``) then cost no draw."""

    def __init__(self, draw: Callable[[FactorState, Tensor], tuple[Tensor, Tensor]], state: FactorState,
                 index: Tensor):
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
    counter_keys = (DRAWS, AGE)
    options = (
        Option("resample_every", 1, integer(1), doc="steps per draw of the random factors"),
        Option("moment_rule", "keep", choice(tuple(MOMENT_RULES)), doc="what a redraw does to the moments"),
    )

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Draw 0 is the current draw; factors are stored only if ``resample_every > 1``. The
        counters are 0-dim int64 tensors on the weight's device."""
        counter = {"dtype": torch.int64, "device": weight.device}
        state: FactorState = {DRAWS: torch.ones((), **counter), AGE: torch.zeros((), **counter)}
        if group["resample_every"] > 1:
            out_features, in_features = weight.shape
            state[FACTOR_A], state[FACTOR_B] = (t.clone() for t in draw_factors(
                out_features, in_features, rank, seed, 0, dtype=factor_dtype, device=weight.device))
        return state

    def first_step_norm_sq(self, out_features: int, in_features: int, rank: int) -> float:
        """``2·out·in``: both factors train from a Gaussian draw with ``E‖A₀‖_F² = out`` and
        ``E‖B₀‖_F² = in`` (entries ``N(0, 1/r)``), so ``E‖dA·B₀‖_F² = η²·out·in`` and
        ``E‖A₀·dB‖_F² = η²·in·out`` (:meth:`Projection.first_step_norm_sq`); the term ``s·dA·dB``
        (relative size ``η²·r``) and the correlation of the two signs (relative ``≈ (2/π)(r−1)/in``)
        are left out."""
        return 2.0 * out_features * in_features

    @staticmethod
    def _draw(state: FactorState, draw: Tensor | int) -> tuple[Tensor, Tensor]:
        # Shapes, dtype and device come from the moments, which every low-rank state has. On a
        # row shard the whole A is drawn (the same numbers as one process) and this rank's rows kept.
        exp_avg_A, exp_avg_B = state[EXP_AVG_A], state[EXP_AVG_B]
        rows = exp_avg_A.shape[0]
        offset, total = state.get(ROW_OFFSET, 0), state.get(GLOBAL_ROWS, rows)
        A, B = draw_factors(total, exp_avg_B.shape[1], state[RANK], state[SEED], draw,
                            dtype=exp_avg_A.dtype, device=exp_avg_A.device)
        return (A if rows == total else A[offset : offset + rows]), B

    @staticmethod
    def _due(state: FactorState, group: Mapping[str, Any]) -> Tensor:
        """0-dim bool on the device: the steps taken on the current draw reached ``resample_every``."""
        return state[AGE] >= group["resample_every"]

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Stored factors, or (when not stored) the draw the next step will use."""
        if FACTOR_A not in state:
            return self.step_factors(state, group)
        return state[FACTOR_A], state[FACTOR_B]

    def step_factors(
        self, state: FactorState, group: Mapping[str, Any], grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The draw the next step uses: the next draw if ``resample_every`` steps were taken on
        the current one, else the current one (stored, or regenerated from the seed). Pure, and
        decided on the device: the draw index is ``draws − 1 + [age ≥ resample_every]``; with
        stored factors the next draw is made and selected with ``torch.where``."""
        due = self._due(state, group)
        if FACTOR_A not in state:
            return self._draw(state, state[DRAWS] - 1 + due.to(torch.int64))
        new_A, new_B = self._draw(state, state[DRAWS])
        return torch.where(due, new_A, state[FACTOR_A]), torch.where(due, new_B, state[FACTOR_B])

    def host_decides(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """False: the redraw is committed on the device (see :meth:`begin_step`)."""
        return False

    def reads_grad_raw(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """False: the factors never come from ``G``."""
        return False

    def begin_step(
        self, state: FactorState, group: Mapping[str, Any], A: Tensor, B: Tensor, *, taken: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Count the step on the current draw, or commit the redraw :meth:`step_factors`
        announced: advance the draw counter, apply the moment rule (from the outgoing draw,
        regenerated only if the rule reads it) and store the new factors when they are stored.
        All on the device, masked by ``taken``: a skipped step changes nothing."""
        due = self._due(state, group)
        redraw = due if taken is None else due & taken
        advance = torch.ones_like(state[AGE]) if taken is None else taken.to(torch.int64)
        stored = FACTOR_A in state
        if group["moment_rule"] != "keep":
            old: Sequence[Tensor] = (state[FACTOR_A], state[FACTOR_B]) if stored else _LazyDraw(
                self._draw, state, state[DRAWS] - 1)
            apply_moment_rule_(group["moment_rule"], state, old, (A, B), where=redraw)  # reads old before the copy
        state[DRAWS].add_(redraw.to(torch.int64))
        state[AGE].copy_(torch.where(redraw, torch.ones_like(state[AGE]), state[AGE] + advance))
        if not stored:
            return A, B
        if taken is None:
            state[FACTOR_A].copy_(A)
            state[FACTOR_B].copy_(B)
        else:
            state[FACTOR_A].copy_(torch.where(taken, A, state[FACTOR_A]))
            state[FACTOR_B].copy_(torch.where(taken, B, state[FACTOR_B]))
        return state[FACTOR_A], state[FACTOR_B]

    def record_base_(self, state: FactorState, group: Mapping[str, Any]) -> None:
        """Nothing: ``W − W_base`` is the sum of the changes over every draw, not a function of the
        current factors, so no record of them tells it."""

    def initial_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``None``: the change of a run of draws cannot be undone from the factors (use the base weights)."""
        return None

    def change_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``None``: ``W − W_base`` sums every draw's change; export it by an SVD against the base weights."""
        return None

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Only possible when factors are stored (``resample_every > 1``); they are used for the
        next ``resample_every`` steps (a redraw that was due is not made)."""
        if FACTOR_A not in state:
            raise ValueError(
                "set_factors needs stored factors; with projection='random' and resample_every=1 every step "
                "draws new factors, so there is nothing to set"
            )
        super().set_factors_(state, A, B, group)
        state[AGE].zero_()
