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
products of size ``W``), with ``A'`` and ``dA`` as the engine hands them over
(:class:`~lora_optim.projections.FactorChange`). Trained with Adam on ``A`` and ``B`` this is the same training as PEFT's
LoRA with AdamW on ``lora_B`` (our ``A``) and ``lora_A`` (our ``B``).

Inits (option ``init``):

* ``"peft"`` (default): ``A = 0`` and ``B ~ U(−1/√in, 1/√in)``, i.e. PEFT's
  ``kaiming_uniform_(a=√5)`` over the ``in`` dimension, so ``A·B = 0`` at the start.
* ``"symmetric"``: both factors non-zero, ``A ~ U(−1/√r, 1/√r)`` and ``B`` as above; ``W`` is
  not changed because only the change ``A'B' − AB`` is ever written (``W = W0 − A0B0 + AB``).

The weight's base (:mod:`lora_optim.initial_factors`): with the ``"peft"`` init ``W − W0 = s·A·B``
(rank ``r``); with a non-zero ``A0·B0`` it is ``s·[A, −A0]·[B; B0]`` (rank ``2r``), known exactly
when the group keeps the initial factors (``keep_initial_factors=True``). Every init adds its
factors to the record the same way (the last lines of :meth:`LoRAProjection.init_state`), so a new
init needs nothing more for adapter export and unmerge.

Draws come from the parameter's int seed, never from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim import initial_factors
from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import row_blocks
from lora_optim.options import Option, choice
from lora_optim.projections import register_projection
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.seeding import derive_seed, kaiming_uniform_bound, uniform
from lora_optim.state_keys import FACTOR_A, FACTOR_B

__all__ = ["LoRAProjection", "LORA_INITS", "lowrank_project", "lowrank_project_activations", "lowrank_add_delta_"]

#: Values of the ``init`` option of ``lora``.
LORA_INITS = ("peft", "symmetric")
#: Inits whose ``A0·B0`` is zero by construction (no record of the initial factors is kept).
ZERO_PRODUCT_INITS = ("peft",)


def lowrank_project(grad: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(G·Bᵀ, Aᵀ·G)``: the gradients of ``L(W0 + A·B)`` with respect to ``A`` and ``B`` (``s = 1``).

    ``grad`` may have a lower precision than the factors (a bf16 ``G`` with fp32 factors). On the
    CPU both products come from one pass over ``G`` that reads it in its own dtype
    (:mod:`lora_optim.kernels`); elsewhere from two GEMMs, after converting a low-precision ``G``
    block by block (:mod:`lora_optim.kernels.blocks`). The paths agree to float rounding.
    """
    kernels = native_kernels()
    if kernels is not None and kernels.supports(grad, A.dtype):
        return kernels.project_lowrank(grad, A, B)
    if grad.dtype == A.dtype:
        return torch.mm(grad, B.t()), torch.mm(A.t(), grad)
    blocks = list(row_blocks(grad.shape[0], grad.shape[1], A.dtype, grad.device))
    if len(blocks) == 1:
        wide = grad.to(A.dtype)
        return torch.mm(wide, B.t()), torch.mm(A.t(), wide)
    grad_A = torch.empty(grad.shape[0], A.shape[1], dtype=A.dtype, device=A.device)
    grad_B = torch.zeros(B.shape, dtype=B.dtype, device=B.device)
    for start, stop in blocks:
        block = grad[start:stop].to(A.dtype)
        torch.mm(block, B.t(), out=grad_A[start:stop])
        grad_B.addmm_(A[start:stop].t(), block)
    return grad_A, grad_B


def lowrank_project_activations(inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(δYᵀ(X·Bᵀ), (δY·A)ᵀX)``: :func:`lowrank_project` of ``G = δYᵀX`` without forming ``G``.

    ``inputs`` is ``X`` (``n×in``), ``output_grads`` is ``δY`` (``n×out``). Four GEMMs with an
    inner or outer size ``r``: ``2·n·r·(in+out)`` multiply-adds instead of ``n·in·out`` for ``G``.
    Every product is formed with ``r`` rows (``r×n``, ``r×out``, ``r×in``; ``∂L/∂A`` is returned
    as the transpose of its ``r×out`` product): CPU BLAS runs those several times faster than the
    same products with ``r`` columns.
    """
    grad_A = torch.mm(torch.mm(B, inputs.t()), output_grads).t()
    grad_B = torch.mm(torch.mm(A.t(), output_grads.t()), inputs)
    return grad_A, grad_B


def lowrank_add_delta_(target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
    """``target += s·(A'B' − AB) = s·[A', dA]·[dB; B]``: one product of inner size ``2r``.

    ``target`` holds rows ``row_start : row_start + len(target)`` of ``W``. It may have the
    factors' dtype or a lower precision (a bf16 ``W``); then each element is rounded to nearest
    once, ``W ← round(W + s·ΔW)``. On the CPU one pass reads and writes each element of
    ``target`` once with no temporary (:mod:`lora_optim.kernels`); elsewhere one GEMM into
    ``target`` (same dtype), or into one temporary of ``target``'s size (lower precision: the
    caller bounds it by passing blocks of rows).
    """
    A_new, dA = change.A_new, change.dA
    if row_start != 0 or target.shape[0] != A_new.shape[0]:
        A_new, dA = A_new[row_start : row_start + target.shape[0]], dA[row_start : row_start + target.shape[0]]
    left = torch.cat((A_new, dA), dim=1)
    right = torch.cat((change.dB, change.B), dim=0)
    kernels = native_kernels()
    if kernels is not None and kernels.supports(target, left.dtype):
        kernels.add_lowrank_(target, left, right, scale)
        torch.autograd.graph.increment_version(target)  # as an in-place torch op would
    elif target.dtype == left.dtype:
        target.addmm_(left, right, alpha=scale)
    else:
        target.add_(torch.mm(left, right), alpha=scale)


def _check_init(name: str, value: Any) -> str:
    return choice(LORA_INITS)(name, value)


@register_projection
class LoRAProjection(Projection):
    """Persistent factors ``A`` (out×r) and ``B`` (r×in), trained like graph LoRA.

    State: ``A``, ``B`` (factor dtype). Options: ``init`` in ``("peft", "symmetric")``.
    """

    name = "lora"
    options = (Option("init", "peft", _check_init, doc="factor init: 'peft' (A = 0) or 'symmetric'"),)
    accepts_low_precision_grad = True

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
        state = {FACTOR_A: A, FACTOR_B: B}
        initial_factors.record_(state, A, B, zero=group["init"] in ZERO_PRODUCT_INITS,
                                keep=group.get("keep_initial_factors", False))
        return state

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``."""
        return state[FACTOR_A], state[FACTOR_B]

    def project(self, grad: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(G·Bᵀ, Aᵀ·G)``; ``grad`` may be of lower precision than the factors."""
        return lowrank_project(grad, A, B)

    def project_activations(self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(δYᵀ(X·Bᵀ), (δY·A)ᵀX)``, never forming ``G = δYᵀX``."""
        return lowrank_project_activations(inputs, output_grads, A, B)

    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += s·(A'B' − AB)``, one product of inner size 2r (:func:`lowrank_add_delta_`)."""
        lowrank_add_delta_(target, change, scale, row_start)

    def record_base_(self, state: FactorState, group: Mapping[str, Any]) -> None:
        """Record the stored factors as the base's (zero if ``A`` or ``B`` is all zeros; one host
        read, at :meth:`~lora_optim.LoRAAdam.set_factors` only)."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        initial_factors.record_(state, A, B, zero=not (bool(A.any()) and bool(B.any())),
                                keep=group.get("keep_initial_factors", False))

    def initial_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """The kept ``(A0, B0)``; for a zero base product ``(0, B)``, a PEFT-style restart that keeps
        the current ``B``; ``None`` if unknown."""
        if initial_factors.status(state) == initial_factors.ZERO:
            return torch.zeros_like(state[FACTOR_A]), state[FACTOR_B].clone()
        kept = initial_factors.kept_factors(state)
        return None if kept is None else (kept[0].clone(), kept[1].clone())

    def change_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``(A, B)`` (rank ``r``) for a zero base product, ``([A, −A0], [B; B0])`` (rank ``2r``) for
        kept initial factors, ``None`` if unknown."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        if initial_factors.status(state) == initial_factors.ZERO:
            return A.clone(), B.clone()
        kept = initial_factors.kept_factors(state)
        if kept is None:
            return None
        return torch.cat((A, -kept[0]), dim=1), torch.cat((B, kept[1]), dim=0)

    def probe_delta(self, change: FactorChange, scale: float, probes: Tensor) -> Tensor:
        """``s·(A'(B'X) − A(BX))`` in fp64 with the stored factors: summed over steps it telescopes
        to ``s·(A_t B_t − A_0 B_0)·X`` (over draws, for ``random``)."""
        A_new, B_new = change.A_new.to(probes.dtype), change.B_new.to(probes.dtype)
        A_old, B_old = change.A.to(probes.dtype), change.B.to(probes.dtype)
        return (A_new @ (B_new @ probes)).sub_(A_old @ (B_old @ probes)).mul_(scale)
