"""The protocol every projection variant implements.

A projection decides how the full gradient ``G = ∂L/∂W`` (an ``out×in`` matrix) maps onto two
factors ``A`` (``out×r``) and ``B`` (``r×in``), and how a step of the factors becomes a change
of ``W``. Adam never sees any of this: the optimizer asks the projection for the factor
gradients, runs the Adam math of :mod:`lora_optim.adam` on them, and hands the factor steps back
to the projection to write into ``W``.

One step of :class:`~lora_optim.LoRAAdam` on a low-rank parameter is::

    A, B   = projection.begin_step(state, group)          # redraw if due, moment rule
    gA, gB = projection.project(G, A, B, scale)           # ∂L/∂A, ∂L/∂B
    dA, dB = adamw_delta(A, gA, ...), adamw_delta(B, gB, ...)
    projection.add_delta_(W, A, B, dA, dB, scale)         # W += s·(Δ(A+dA, B+dB) − Δ(A, B))
    projection.commit_(state, A, B, dA, dB)               # keep the new factors

Per-parameter state made by :meth:`Projection.init_state` holds tensors and plain ints only,
so optimizer checkpoints load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Projection", "FactorState", "MOMENT_KEYS"]

#: State keys of the Adam moments of each factor; the optimizer owns them, moment rules at a
#: resample (see :mod:`lora_optim.moment_rules`) transform them.
MOMENT_KEYS = {"A": ("exp_avg_A", "exp_avg_sq_A"), "B": ("exp_avg_B", "exp_avg_sq_B")}

#: Per-parameter state of a projection: tensors and plain ints or floats only.
FactorState = dict[str, Any]


class Projection(abc.ABC):
    """How a full gradient becomes low-rank factor gradients and back.

    Subclasses set :attr:`name` (the string users pass as ``projection=``) and may declare
    per-group :attr:`options` with their defaults; the optimizer fills missing options into
    every param group that uses the variant and calls :meth:`validate_options` on it.
    Instances are stateless: everything per parameter lives in the state dict they create.
    """

    #: The name users select the variant by, e.g. ``"lora"``.
    name: ClassVar[str]
    #: Per-group options of this variant and their defaults.
    options: ClassVar[Mapping[str, Any]] = {}

    def validate_options(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` naming the option and value if ``group`` is invalid."""

    @abc.abstractmethod
    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Per-parameter state for the ``out×in`` matrix ``weight``; must not change ``weight``.

        ``rank`` is already clipped to ``min(rank, out, in)``; ``seed`` is this parameter's
        int seed; factors are made in ``factor_dtype`` (fp32 for bf16/fp16 weights).
        """

    @abc.abstractmethod
    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The factors ``(A, B)`` as they stand, without side effects (used by ``get_factors``)."""

    def begin_step(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The factors to project with at this step. Resampling variants redraw them here
        when due (and apply their moment rule to ``state``); the default returns
        :meth:`current_factors`."""
        return self.current_factors(state, group)

    def step_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The factors :meth:`begin_step` returned for the step in progress, read back from
        ``state`` without side effects (and identical tensors for stored factors, since
        :meth:`commit_` may update them in place). Used when the gradient of one step arrives
        in several pieces (micro-batches, per-layer and activation-side modes): ``begin_step``
        runs once, at the first piece. The default returns :meth:`current_factors`."""
        return self.current_factors(state, group)

    @abc.abstractmethod
    def project(self, grad: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Factor gradients ``(∂L/∂A, ∂L/∂B)`` from the full gradient ``grad`` (``out×in``)."""

    def project_activations(
        self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor, scale: float
    ) -> tuple[Tensor, Tensor]:
        """Factor gradients from a linear layer's activations instead of ``G``.

        For ``Y = X·Wᵀ`` over ``n`` rows (tokens), ``inputs`` is ``X`` (``n×in``) and
        ``output_grads`` is ``δY = ∂L/∂Y`` (``n×out``), so ``G = δYᵀ·X``. Variants override this
        to avoid forming ``G`` (the activation-side mode, :mod:`lora_optim.activation`); this
        default forms ``G`` and calls :meth:`project`, which is correct for any variant that is
        linear in ``G`` (every projection is: the factor gradients are ``∂L/∂A``, ``∂L/∂B``).
        """
        return self.project(torch.mm(output_grads.t(), inputs), A, B, scale)

    @abc.abstractmethod
    def add_delta_(self, target: Tensor, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
        """``target += scale·(Δ(A+dA, B+dB) − Δ(A, B))`` in place, where ``Δ`` is the variant's
        parametrisation of the weight change (``A·B`` for LoRA). ``target`` is ``W`` itself or
        a float buffer of its shape (see :mod:`lora_optim.precision`)."""

    def commit_(self, state: FactorState, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor) -> None:
        """Keep the stepped factors. The default adds the steps into the stored factors."""
        A.add_(dA)
        B.add_(dB)

    def probe_delta(self, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float, probes: Tensor) -> Tensor:
        """The exact change of ``W·X`` this step, in fp64, for the drift check (:mod:`lora_optim.drift`):
        ``s·(Δ(A', B') − Δ(A, B))·X`` with ``A' = A + dA`` rounded as :meth:`commit_` stores it.

        ``probes`` is ``X`` (``in×k``, fp64). This default is correct for any variant but forms a
        full fp64 ``out×in`` buffer through :meth:`add_delta_`; variants override it with a
        formula of cost ``O(r·(out+in)·k)``.
        """
        A64, B64 = A.to(probes.dtype), B.to(probes.dtype)
        dA64, dB64 = (A + dA).to(probes.dtype) - A64, (B + dB).to(probes.dtype) - B64
        change = torch.zeros(A.shape[0], B.shape[1], dtype=probes.dtype, device=probes.device)
        self.add_delta_(change, A64, B64, dA64, dB64, scale)
        return change @ probes

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Replace the stored factors by copies of ``A`` and ``B`` (shapes already checked)."""
        state["A"].copy_(A)
        state["B"].copy_(B)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
