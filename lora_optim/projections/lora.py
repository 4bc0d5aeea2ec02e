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

Inits (option ``init``). ``W`` is never changed by an init: only the changes ``s·(A'B' − AB)``
are ever written, so training starts at ``W`` whatever ``A0·B0`` is (``W = W_res + s·A·B`` with
the residual ``W_res = W − s·A0·B0`` kept implicitly):

* ``"peft"`` (default): ``A = 0`` and ``B ~ U(−1/√in, 1/√in)``, i.e. PEFT's
  ``kaiming_uniform_(a=√5)`` over the ``in`` dimension, so ``A·B = 0`` at the start.
* ``"symmetric"``: both factors non-zero, ``A ~ U(−1/√r, 1/√r)`` and ``B`` as above.
* ``"pissa"`` (PiSSA, Meng, Wang and Zhang 2024): the principal singular triplets of ``W``,
  ``W ≈ U_r S_r V_rᵀ``, with the scale folded in as PEFT's ``init_lora_weights="pissa"`` does,

  .. math::

      A_0 = U_r\\,(S_r/s)^{1/2}, \\qquad B_0 = (S_r/s)^{1/2}\\,V_r^\\top, \\qquad
      s\\,A_0 B_0 = U_r S_r V_r^\\top,

  so ``s·A0·B0`` is the best rank-``r`` approximation of ``W`` (Eckart–Young) and training
  adapts the principal part while the residual stays frozen. The triplets come from
  :func:`~lora_optim.truncated_svd.top_singular` with ``niter=svd_niter``: an int runs the
  seeded randomized SVD of ``torch.svd_lowrank`` (PiSSA's fast SVD, PEFT's
  ``"pissa_niter_<n>"``), ``None`` the exact ``torch.linalg.svd`` (PEFT's ``"pissa"``).
* ``"minor"`` (MiLoRA, Wang et al. 2024): the same formula with the ``r`` *smallest* singular
  triplets (exact SVD always): training adapts the minor components.
* ``"gradient"`` (LoRS, Hu et al. 2024, its gradient-based init): ``A0 = 0`` and ``B0 = V_rᵀ``,
  the top-``r`` right singular vectors of the first gradient ``G`` the optimizer receives (the
  masked ``G ⊙ M`` with ``preserve_sparsity=True``), which minimises ``‖G − G·B0ᵀ·B0‖`` over
  ``B0`` with orthonormal rows. No extra forward or backward pass is made: the first
  ``step()`` computes the factors from its own ``G`` and then steps with them, so the first step
  already moves ``W``: ``g_B = s·A0ᵀG = 0`` leaves ``B`` at ``B0`` and ``g_A = s·G·B0ᵀ =
  s·U_r S_r``, so ``W₁ − W₀ = s·dA·B0`` lies in the span of ``G``'s top right singular vectors
  (Adam's first step makes ``dA ≈ −lr·sign(U_r S_r)``). Singular vectors do not depend on a
  positive scale of ``G``, so a ``GradScaler``'s scaled gradient gives the same init. The
  full gradient of a step never exists in the per-layer and activation-side modes, so there
  the first step raises ``ValueError``; a step skipped for a NaN/Inf gradient leaves the init
  to the next step. Until the first step, ``get_factors`` returns zeros.

The weight's base (:mod:`lora_optim.initial_factors`): with the ``"peft"`` init ``W − W0 = s·A·B``
(rank ``r``); with a non-zero ``A0·B0`` it is ``s·[A, −A0]·[B; B0]`` (rank ``2r``), known exactly
when the group keeps the initial factors (``keep_initial_factors=True``). Every init adds its
factors to the record the same way (the last lines of :meth:`LoRAProjection.init_state`), so a new
init needs nothing more for adapter export and unmerge.

Draws (random inits, the randomized SVD) come from the parameter's int seed, never from torch's
global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim import initial_factors
from lora_optim.kernels import native_kernels
from lora_optim.kernels.blocks import row_blocks
from lora_optim.kernels.product import add_thin_product_
from lora_optim.options import Option, choice, integer, optional
from lora_optim.projections.registry import register_projection
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.seeding import derive_seed, kaiming_uniform_bound, uniform
from lora_optim.state_keys import FACTOR_A, FACTOR_B, GRADIENT_INIT_PENDING, SEED
from lora_optim.truncated_svd import DEFAULT_NITER, bottom_singular, top_singular

__all__ = [
    "LoRAProjection",
    "LORA_INITS",
    "SVD_NITER_OPTION",
    "lowrank_project",
    "lowrank_project_activations",
    "lowrank_add_delta_",
    "lowrank_step_product",
    "add_product_",
    "singular_factors",
    "gradient_init_factors",
    "group_scale",
]

#: Values of the ``init`` option of ``lora``.
LORA_INITS = ("peft", "symmetric", "pissa", "minor", "gradient")
#: Inits whose ``A0·B0`` is zero by construction (no record of the initial factors is kept).
ZERO_PRODUCT_INITS = ("peft", "gradient")

#: The ``svd_niter`` option (shared with the ``svd`` projection): subspace iterations of the
#: randomized SVD, or ``None`` for the exact SVD.
SVD_NITER_OPTION = Option(
    "svd_niter", DEFAULT_NITER, optional(integer(0)),
    doc="subspace iterations of the randomized SVD (None: exact torch.linalg.svd)",
)

# Stream tags that separate the SVD draws from the factor draws of the same parameter.
_PISSA_STREAM = 0x5053  # "PS"
_GRADIENT_STREAM = 0x4749  # "GI"


def group_scale(group: Mapping[str, Any]) -> float:
    """``s = alpha / rank`` of a param group (``alpha=None`` means ``s = 1``), with the configured
    ``rank`` as :class:`~lora_optim.LoRAAdam` uses it."""
    alpha = group["alpha"] if group["alpha"] is not None else group["rank"]
    return float(alpha) / group["rank"]


def _finite(matrix: Tensor) -> Tensor:
    # An SVD of a matrix with NaN/Inf raises or returns garbage; the step that brought such a G
    # is skipped by the engine's check anyway, so its factors only need to be finite.
    return torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)


def singular_factors(
    weight: Tensor, rank: int, scale: float, *, which: str = "top", niter: int | None = DEFAULT_NITER,
    seed: int = 0, dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """PiSSA's factors ``A = U_r (S_r/s)^½`` (``out×r``), ``B = (S_r/s)^½ V_rᵀ`` (``r×in``) of the
    ``out×in`` matrix ``weight``, so that ``s·A·B = U_r S_r V_rᵀ``.

    ``which="top"``: the principal triplets (``init="pissa"``), by
    :func:`~lora_optim.truncated_svd.top_singular` with ``niter`` and the int ``seed``;
    ``which="bottom"``: the minor ones (``init="minor"``, exact SVD). The SVD runs in ``dtype``
    (default: ``weight``'s, widened to fp32 for bf16/fp16) and the factors are returned in it.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if dtype is None:
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    matrix = _finite(weight.detach().to(dtype))
    if which == "top":
        U, S, V = top_singular(matrix, rank, niter=niter, seed=seed)
    else:
        U, S, V = bottom_singular(matrix, rank)
    root = (S / scale).sqrt()
    # contiguous: LAPACK returns column-major U and V, and the fused Adam kernel needs row-major factors
    return (U * root).contiguous(), (V * root).mH.contiguous()


def gradient_init_factors(
    grad: Tensor, rank: int, *, niter: int | None = DEFAULT_NITER, seed: int = 0, dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """LoRS's gradient init: ``A0 = 0`` (``out×r``) and ``B0 = V_rᵀ`` (``r×in``), the top-``r``
    right singular vectors of ``G`` (orthonormal rows), the minimiser of ``‖G − G·B0ᵀ·B0‖_F``.

    ``grad`` is the ``out×in`` gradient (any float dtype; NaN/Inf entries are read as 0). The
    SVD runs in ``dtype`` (default: ``grad``'s, widened to fp32 for bf16/fp16) by
    :func:`~lora_optim.truncated_svd.top_singular` with ``niter`` and the int ``seed``.
    """
    if dtype is None:
        dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
    matrix = _finite(grad.detach().to(dtype))
    _, _, V = top_singular(matrix, rank, niter=niter, seed=seed)
    A = torch.zeros(grad.shape[0], rank, dtype=dtype, device=grad.device)
    return A, V.mH.contiguous()


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
    add_product_(target, *lowrank_step_product(change, row_start, target.shape[0]), scale)


def lowrank_step_product(change: FactorChange, row_start: int = 0, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """``([A', dA], [dB; B])``: ``A'B' − AB`` as a product of inner size ``2r``, for the rows
    ``row_start : row_start + rows`` of ``W`` (``rows=None``: through the last row)."""
    A_new, dA = change.A_new, change.dA
    stop = A_new.shape[0] if rows is None else row_start + rows
    if row_start != 0 or stop != A_new.shape[0]:
        A_new, dA = A_new[row_start:stop], dA[row_start:stop]
    return torch.cat((A_new, dA), dim=1), torch.cat((change.dB, change.B), dim=0)


def add_product_(target: Tensor, left: Tensor, right: Tensor, scale: float) -> None:
    """``target += scale·left·right`` in place, for a thin ``left`` (``n×k``) and ``right`` (``k×m``).

    ``target`` may have ``left``'s dtype or a lower precision (a bf16 ``W``); then each element is
    rounded to nearest once. On the CPU one pass reads and writes each element of ``target`` once
    with no temporary (:mod:`lora_optim.kernels`); elsewhere one ``addmm_`` (same dtype) or one
    GEMM into a temporary of ``target``'s size (lower precision).
    """
    kernels = native_kernels()
    if kernels is not None and kernels.supports(target, left.dtype):
        kernels.add_lowrank_(target, left, right, scale)
        torch.autograd.graph.increment_version(target)  # as an in-place torch op would
    else:
        add_thin_product_(target, left, right, scale)


def _check_init(name: str, value: Any) -> str:
    return choice(LORA_INITS)(name, value)


@register_projection
class LoRAProjection(Projection):
    """Persistent factors ``A`` (out×r) and ``B`` (r×in), trained like graph LoRA.

    State: ``A``, ``B`` (factor dtype); ``gradient_init_pending`` (int) with ``init="gradient"``
    until the first step. Options: ``init`` in ``("peft", "symmetric", "pissa", "minor",
    "gradient")`` and ``svd_niter`` (the SVD of ``"pissa"`` and ``"gradient"``; see the module
    docstring).
    """

    name = "lora"
    options = (
        Option("init", "peft", _check_init,
               doc="factor init: 'peft' (A = 0), 'symmetric', 'pissa', 'minor' or 'gradient'"),
        SVD_NITER_OPTION,
    )
    accepts_low_precision_grad = True
    supports_row_sharding = True  # G·Bᵀ is row-local; Aᵀ·G of a row shard is a partial sum
    grad_nonfinite_propagates = True  # every G_ij is multiplied by B_kj and A_ik: NaN stays NaN

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Factors from the ``init`` option; see the module docstring."""
        out_features, in_features = weight.shape
        device = weight.device
        init = group["init"]
        state: FactorState = {}
        if init in ("pissa", "minor"):
            A, B = singular_factors(weight, rank, group_scale(group), which="top" if init == "pissa" else "bottom",
                                    niter=group["svd_niter"], seed=derive_seed(seed, _PISSA_STREAM),
                                    dtype=factor_dtype)
        elif init == "gradient":  # filled from the first G by step_factors / begin_step (A0 = 0 then)
            A = torch.zeros(out_features, rank, dtype=factor_dtype, device=device)
            B = torch.zeros(rank, in_features, dtype=factor_dtype, device=device)
            state[GRADIENT_INIT_PENDING] = 1
        else:
            B = uniform((rank, in_features), kaiming_uniform_bound(in_features), derive_seed(seed, 0),
                        dtype=factor_dtype, device=device)
            if init == "symmetric":
                A = uniform((out_features, rank), kaiming_uniform_bound(rank), derive_seed(seed, 1),
                            dtype=factor_dtype, device=device)
            else:
                A = torch.zeros(out_features, rank, dtype=factor_dtype, device=device)
        state.update({FACTOR_A: A, FACTOR_B: B})
        # Every init records what the weight's base excludes (adapter export, unmerge).
        initial_factors.record_(state, A, B, zero=init in ZERO_PRODUCT_INITS,
                                keep=group.get("keep_initial_factors", False))
        return state

    def first_step_norm_sq(self, out_features: int, in_features: int, rank: int) -> float:
        """``out·r/3``, from the ``"peft"`` init (the reference of ``update_scale="matched"``,
        :mod:`lora_optim.update_scale`): ``A₀ = 0`` gives ``B`` a zero gradient, so only ``A``
        moves, ``ΔW₁ = s·dA·B₀`` with ``dA = ±η``, and ``E‖dA·B₀‖_F² = η²·out·E‖B₀‖_F²`` with
        ``E‖B₀‖_F² = r·in·(1/√in)²/3 = r/3`` (``U(−1/√in, 1/√in)`` entries). The other inits keep
        this value: ``lora`` is the reference, its multiplier is 1 whatever the init."""
        return out_features * rank / 3.0

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)`` (zeros before the first step of ``init="gradient"``)."""
        return state[FACTOR_A], state[FACTOR_B]

    def step_factors(
        self, state: FactorState, group: Mapping[str, Any], grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The stored factors; at the first step of ``init="gradient"``, the factors of
        :func:`gradient_init_factors` of ``grad`` (pure: recomputed, not stored, until
        :meth:`begin_step`). Raises ``ValueError`` there when ``grad`` is ``None`` (the
        per-layer and activation-side modes)."""
        if not state.get(GRADIENT_INIT_PENDING):
            return state[FACTOR_A], state[FACTOR_B]
        if grad is None:
            raise ValueError(
                "init='gradient' takes the factors from the first full gradient G, which the per-layer and "
                "activation-side modes never form (they project G piece by piece with factors fixed beforehand). "
                "Take the first step in the plain mode (loss.backward(); opt.step()) and enable the mode after it, "
                "or use another init"
            )
        A = state[FACTOR_A]
        return gradient_init_factors(grad, A.shape[1], niter=group["svd_niter"],
                                     seed=derive_seed(state[SEED], _GRADIENT_STREAM), dtype=A.dtype)

    def begin_step(
        self, state: FactorState, group: Mapping[str, Any], A: Tensor, B: Tensor, *, taken: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store the factors of a gradient init (first step of ``init="gradient"``, decided on the
        host: :meth:`host_decides`); return the stored factors."""
        if state.pop(GRADIENT_INIT_PENDING, 0):
            state[FACTOR_A].copy_(A)
            state[FACTOR_B].copy_(B)
            return state[FACTOR_A], state[FACTOR_B]
        return A, B

    def host_decides(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """True at the first step of ``init="gradient"`` only (it stores the factors of an SVD of ``G``)."""
        return bool(state.get(GRADIENT_INIT_PENDING))

    def reads_grad_raw(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """True at the first step of ``init="gradient"`` only (an SVD of ``G``)."""
        return bool(state.get(GRADIENT_INIT_PENDING))

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Replace the stored factors (a pending gradient init is dropped: the set factors are used)."""
        state.pop(GRADIENT_INIT_PENDING, None)
        super().set_factors_(state, A, B, group)

    def project(self, grad: Tensor, A: Tensor, B: Tensor, *, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """``(G·Bᵀ, Aᵀ·G)``; ``grad`` may be of lower precision than the factors. On a row shard
        (``A``, ``G``: this rank's rows) the second is this rank's part of the sum over rows."""
        return lowrank_project(grad, A, B)

    def project_activations(self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(δYᵀ(X·Bᵀ), (δY·A)ᵀX)``, never forming ``G = δYᵀX``."""
        return lowrank_project_activations(inputs, output_grads, A, B)

    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += s·(A'B' − AB)``, one product of inner size 2r (:func:`lowrank_add_delta_`)."""
        lowrank_add_delta_(target, change, scale, row_start)

    def step_product(
        self, change: FactorChange, row_start: int = 0, rows: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``([A', dA], [dB; B])`` (:func:`lowrank_step_product`)."""
        return lowrank_step_product(change, row_start, rows)

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
