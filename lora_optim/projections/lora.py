"""``lora``: persistent factors, the optimizer-side twin of graph LoRA.

With ``W = W0 + s·A·B`` and ``G = ∂L/∂W``, the chain rule gives

.. math::

    \\frac{\\partial L}{\\partial A} = s\\,G B^\\top, \\qquad
    \\frac{\\partial L}{\\partial B} = s\\,A^\\top G,

and after a step of the factors the weight moves by

.. math::

    W \\mathrel{+}= s\\,(A'B' - AB) = s\\,[A',\\ dA]\\begin{bmatrix} dB \\\\ B \\end{bmatrix},
    \\qquad dA = A' - A,\\ dB = B' - B,

one GEMM of inner size ``2r`` that forms the change directly (no cancellation between two
products of size ``W``). Trained with Adam on ``A`` and ``B`` this is the same training as PEFT's
LoRA with AdamW on ``lora_B`` (our ``A``) and ``lora_A`` (our ``B``).

Inits (option ``init``):

* ``"peft"`` (default): ``A = 0`` and ``B ~ U(−1/√in, 1/√in)``, i.e. PEFT's
  ``kaiming_uniform_(a=√5)`` over the ``in`` dimension, so ``A·B = 0`` at the start.
* ``"symmetric"``: both factors non-zero, ``A ~ U(−1/√r, 1/√r)`` and ``B`` as above; ``W`` is
  not changed because only the change ``A'B' − AB`` is ever written (``W = W0 − A0B0 + AB``).

Draws come from the parameter's int seed, never from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim.projections import register_projection
from lora_optim.projections.base import FactorState, Projection
from lora_optim.seeding import derive_seed, kaiming_uniform_bound, uniform

__all__ = ["LoRAProjection", "lowrank_project", "lowrank_add_delta_"]

LORA_INITS = ("peft", "symmetric")


def lowrank_project(grad: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(s·G·Bᵀ, s·Aᵀ·G)``: the gradients of ``L(W0 + s·A·B)`` with respect to ``A`` and ``B``."""
    grad_A = torch.mm(grad, B.t())
    grad_B = torch.mm(A.t(), grad)
    if scale != 1.0:
        grad_A.mul_(scale)
        grad_B.mul_(scale)
    return grad_A, grad_B


def lowrank_add_delta_(target: Tensor, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
    """``target += s·((A+dA)(B+dB) − AB) = s·[A+dA, dA]·[dB; B]`` with one GEMM of inner size 2r."""
    left = torch.cat((A + dA, dA), dim=1)
    right = torch.cat((dB, B), dim=0)
    target.addmm_(left, right, alpha=scale)


@register_projection
class LoRAProjection(Projection):
    """Persistent factors ``A`` (out×r) and ``B`` (r×in), trained like graph LoRA.

    State: ``A``, ``B`` (factor dtype). Options: ``init`` in ``("peft", "symmetric")``.
    """

    name = "lora"
    options: Mapping[str, Any] = {"init": "peft"}

    def validate_options(self, group: Mapping[str, Any]) -> None:
        """``init`` must be one of ``"peft"``, ``"symmetric"``."""
        if group["init"] not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}, got {group['init']!r}")

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Factors from the ``init`` option; see the module docstring."""
        out_features, in_features = weight.shape
        device = weight.device
        B = uniform((rank, in_features), kaiming_uniform_bound(in_features), derive_seed(seed, 0),
                    dtype=factor_dtype, device=device)
        if group["init"] == "symmetric":
            A = uniform((out_features, rank), kaiming_uniform_bound(rank), derive_seed(seed, 1),
                        dtype=factor_dtype, device=device)
        else:
            A = torch.zeros(out_features, rank, dtype=factor_dtype, device=device)
        return {"A": A, "B": B}

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``."""
        return state["A"], state["B"]

    def project(self, grad: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """``(s·G·Bᵀ, s·Aᵀ·G)``."""
        return lowrank_project(grad, A, B, scale)

    def add_delta_(self, target: Tensor, A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, scale: float) -> None:
        """``target += s·(A'B' − AB)``, one GEMM."""
        lowrank_add_delta_(target, A, B, dA, dB, scale)
