"""``svd``: GaLore-style one-sided projection onto the top singular vectors of ``G``.

GaLore (Zhao et al. 2024) projects the gradient on one side onto an orthonormal basis of ``G``'s
top-``r`` singular vectors, runs Adam in that ``r``-dimensional space, and projects the step
back. Here that is the ``lora`` parametrisation with one factor frozen as the basis
(:meth:`Projection.trained_factors <lora_optim.projections.Projection.trained_factors>`), the side
chosen by shape as GaLore's ``proj_type="std"`` does (:func:`side_of`, the one place that rule
lives; :meth:`~SVDProjection.project` and :meth:`~SVDProjection.add_delta_` receive tensors only,
so they apply it to the factors' shapes):

* ``out < in`` (*left*): ``A = P = U_r`` (``out×r``, frozen) and ``B`` (``r×in``) trains,

  .. math:: g_B = s\\,P^\\top G, \\qquad W \\mathrel{+}= s\\,P\\,dB;

* ``out ≥ in`` (*right*): ``B = Q = V_rᵀ`` (``r×in``, frozen) and ``A`` (``out×r``) trains,

  .. math:: g_A = s\\,G Q^\\top, \\qquad W \\mathrel{+}= s\\,dA\\,Q.

The basis is recomputed from the step's own ``G`` at the first step and every ``refresh_every``
steps after it (GaLore's ``update_proj_gap``) by :func:`~lora_optim.truncated_svd.top_singular`
(``svd_niter``: the seeded randomized SVD of ``torch.svd_lowrank``, or ``None`` for the exact
``torch.linalg.svd`` GaLore runs); that step then projects with the new basis. At a refresh the
trained factor restarts at zero (it holds the change made in the current subspace, which is
what weight decay acts on) and the Adam moments follow ``moment_rule`` (:mod:`lora_optim.moment_rules`):
``"keep"`` (default, GaLore's behaviour), ``"reset"``, or ``"transport"``, which for an
orthonormal basis is ``m_B ← P_newᵀ P_old m_B`` (left) or ``m_A ← m_A Q_old Q_newᵀ`` (right).
``W`` is not changed by a refresh.

With ``moment_rule="keep"``, ``weight_decay=0`` and ``s`` equal to GaLore's ``scale``, a step is
GaLore's AdamW step up to where ``ε`` enters (``torch.optim.AdamW``'s ``m̂/(√v̂ + ε)`` on
``s·PᵀG`` against GaLore's ``m̂/(√v̂ + ε/√(1−β2ᵗ))`` on ``PᵀG``; the two agree as ``ε → 0``,
``tests/test_svd_projection.py`` checks it against ``galore-torch``). GaLore decays ``W``
itself; here weight decay acts on the trained factor, as for ``lora``.

Everything the projection keeps is tensors and ints (GaLore keeps a projector object in its
state, so its checkpoints need ``weights_only=False``): ``A``, ``B``, the number of refreshes
made (``refreshes``, which also seeds the randomized SVD) and the steps taken on the current
basis (``age``). The optimizer allocates
Adam moments for both factors, so the state is ``3·r·(out+in)`` numbers, of which the frozen
factor's two moments (``2·r·out`` left, ``2·r·in`` right) stay zero; GaLore keeps
``r·out + 2·r·in`` (left).

Modes: a refresh needs the step's full ``G``, which the per-layer and activation-side modes
never form, so a step that refreshes raises ``ValueError`` there (the first step always does).
Steps between refreshes would run in the modes, so a run can start in the plain mode; the next
refresh raises again. :meth:`~lora_optim.LoRAAdam.set_factors` installs a basis and a trained
factor (the frozen factor should have orthonormal columns or rows) and starts a new period of
``refresh_every`` steps with it.

A NaN/Inf in ``G`` at a refresh: the SVD reads such entries as 0, and the engine skips the step
(nothing is committed), so the refresh happens again at the next step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim.moment_rules import MOMENT_RULES, apply_moment_rule_
from lora_optim.options import Option, choice, integer
from lora_optim.projections.registry import register_projection
from lora_optim.projections.base import FactorChange, FactorState, Projection
from lora_optim.projections.lora import SVD_NITER_OPTION, add_product_
from lora_optim.seeding import derive_seed
from lora_optim.state_keys import AGE, FACTOR_A, FACTOR_B, REFRESHES, SEED
from lora_optim.truncated_svd import top_singular

__all__ = ["SVDProjection", "LEFT", "RIGHT", "side_of", "subspace_basis"]

#: Sides: the frozen basis is ``A = P`` (left) or ``B = Q`` (right).
LEFT, RIGHT = "left", "right"


def side_of(out_features: int, in_features: int) -> str:
    """GaLore's ``proj_type="std"`` rule: :data:`RIGHT` (``B = Q`` frozen, ``A`` trains) when
    ``out ≥ in``, else :data:`LEFT` (``A = P`` frozen, ``B`` trains): the smaller dimension of
    ``W`` is the one projected, so the trained factor is ``max(out, in)×r``."""
    return RIGHT if out_features >= in_features else LEFT

_REFRESH_STREAM = 0x5346  # "SF": separates the refresh draws from other draws of the parameter


def subspace_basis(grad: Tensor, rank: int, side: int, *, niter: int | None, seed: int) -> Tensor:
    """The orthonormal basis of a refresh: ``P = U_r`` (``out×r``) for :data:`LEFT`, ``Q = V_rᵀ``
    (``r×in``) for :data:`RIGHT`, from the top-``rank`` singular vectors of ``grad`` (NaN/Inf
    entries read as 0), by :func:`~lora_optim.truncated_svd.top_singular`."""
    matrix = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    U, _, V = top_singular(matrix, rank, niter=niter, seed=seed)
    return U.contiguous() if side == LEFT else V.mH.contiguous()


@register_projection
class SVDProjection(Projection):
    """One-sided projection on ``G``'s top singular vectors, refreshed every ``refresh_every``
    steps (see the module docstring).

    Options: ``refresh_every`` (int ≥ 1, default 200, GaLore's ``update_proj_gap``),
    ``moment_rule`` (``"keep"``, ``"reset"``, ``"transport"``; default ``"keep"``) and
    ``svd_niter`` (shared with ``lora``).
    """

    name = "svd"
    grad_nonfinite_propagates = True  # P·G and G·Qᵀ: every G_ij meets a product with the basis
    options = (
        Option("refresh_every", 200, integer(1), doc="steps between refreshes of the svd basis"),
        Option("moment_rule", "keep", choice(tuple(MOMENT_RULES)), doc="what a redraw does to the moments"),
        SVD_NITER_OPTION,
    )

    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Zero factors (the first step computes the basis from ``G``), no refresh yet."""
        out_features, in_features = weight.shape
        return {
            FACTOR_A: torch.zeros(out_features, rank, dtype=factor_dtype, device=weight.device),
            FACTOR_B: torch.zeros(rank, in_features, dtype=factor_dtype, device=weight.device),
            REFRESHES: 0,
            AGE: 0,
        }

    @staticmethod
    def _due(state: FactorState, group: Mapping[str, Any]) -> bool:
        return state[REFRESHES] == 0 or state[AGE] >= group["refresh_every"]

    def first_step_norm_sq(self, out_features: int, in_features: int, rank: int) -> float:
        """``r·max(out, in)``, exactly: the trained factor (``max(out, in)×r``, :func:`side_of`) moves
        by ``±η`` per entry and the frozen basis is orthonormal, so ``‖dA·Q‖_F = ‖dA‖_F`` (right)
        and ``‖P·dB‖_F = ‖dB‖_F`` (left)."""
        return float(rank * max(out_features, in_features))

    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The stored ``(A, B)``: the basis and the change trained on it since the last refresh
        (zeros before the first step)."""
        return state[FACTOR_A], state[FACTOR_B]

    def trained_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[bool, bool]:
        """``(False, True)`` on the left side (``B`` trains), ``(True, False)`` on the right."""
        A, B = state[FACTOR_A], state[FACTOR_B]
        return (False, True) if side_of(A.shape[0], B.shape[1]) == LEFT else (True, False)

    def step_factors(
        self, state: FactorState, group: Mapping[str, Any], grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The stored factors, or at a refresh the new basis from ``grad`` with a zero trained
        factor (pure: recomputed, not stored, until :meth:`begin_step`). Raises ``ValueError``
        at a refresh when ``grad`` is ``None`` (the per-layer and activation-side modes)."""
        if not self._due(state, group):
            return state[FACTOR_A], state[FACTOR_B]
        if grad is None:
            first = state[REFRESHES] == 0
            raise ValueError(
                f"projection='svd' computes its basis from the step's full gradient G "
                f"({'at the first step' if first else 'every refresh_every=' + str(group['refresh_every']) + ' steps'}), "
                "which the per-layer and activation-side modes never form (they project G piece by piece with "
                "factors fixed beforehand). Use the plain mode (loss.backward(); opt.step()) with this projection"
            )
        A, B = state[FACTOR_A], state[FACTOR_B]
        side = side_of(A.shape[0], B.shape[1])
        basis = subspace_basis(grad.to(A.dtype), A.shape[1], side, niter=group["svd_niter"],
                               seed=derive_seed(state[SEED], _REFRESH_STREAM, state[REFRESHES]))
        if side == LEFT:
            return basis, torch.zeros_like(B)
        return torch.zeros_like(A), basis

    def host_decides(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """True at a refresh (it stores a new basis and counts refreshes on the host)."""
        return self._due(state, group)

    def reads_grad_raw(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """True at a refresh (an SVD of ``G``)."""
        return self._due(state, group)

    def begin_step(
        self, state: FactorState, group: Mapping[str, Any], A: Tensor, B: Tensor, *, taken: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Count the step on the current basis, or commit the refresh :meth:`step_factors`
        computed: apply the moment rule from the outgoing factors, store the new ones.

        Between refreshes the count (``age``, a host int) counts the steps *attempted* on the
        basis, a step skipped for a NaN/Inf included: whether a step is taken is known on the
        device only, and the refresh must be scheduled on the host. A refresh itself is decided on
        the host (:meth:`host_decides`), so a refresh whose step is skipped is made again at the
        next step."""
        if not self._due(state, group):
            state[AGE] += 1
            return state[FACTOR_A], state[FACTOR_B]
        apply_moment_rule_(group["moment_rule"], state, (state[FACTOR_A], state[FACTOR_B]), (A, B))
        state[FACTOR_A].copy_(A)
        state[FACTOR_B].copy_(B)
        state[REFRESHES] += 1
        state[AGE] = 1
        return state[FACTOR_A], state[FACTOR_B]

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Store ``A`` and ``B`` (the frozen one is the basis) and start a new period of
        ``refresh_every`` steps with them (a refresh that was due is not made)."""
        state[FACTOR_A].copy_(A)
        state[FACTOR_B].copy_(B)
        state[REFRESHES] += 1
        state[AGE] = 0

    def project(self, grad: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(None, Aᵀ·G)`` on the left side (``A = P``), ``(G·Bᵀ, None)`` on the right (``B = Q``)."""
        if side_of(A.shape[0], B.shape[1]) == LEFT:
            return None, torch.mm(A.t(), grad)
        return torch.mm(grad, B.t()), None

    def project_activations(
        self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """:meth:`project` of ``G = δYᵀX`` without forming it: ``(δY·P)ᵀX`` or ``δYᵀ(X·Qᵀ)``."""
        if side_of(A.shape[0], B.shape[1]) == LEFT:
            return None, torch.mm(torch.mm(A.t(), output_grads.t()), inputs)
        return torch.mm(torch.mm(B, inputs.t()), output_grads).t(), None

    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += s·(A'B' − AB)``, which is ``s·P·dB`` (left) or ``s·dA·Q`` (right): one
        product of inner size ``r``, for the rows ``row_start : row_start + len(target)``."""
        add_product_(target, *self.step_product(change, row_start, target.shape[0]), scale)

    def step_product(
        self, change: FactorChange, row_start: int = 0, rows: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``(P, dB)`` (left) or ``(dA, Q)`` (right), of inner size ``r``, for the rows
        ``row_start : row_start + rows``."""
        stop = change.A.shape[0] if rows is None else row_start + rows
        if side_of(change.A.shape[0], change.B.shape[1]) == LEFT:
            return change.A[row_start:stop], change.dB
        return change.dA[row_start:stop], change.B

    def probe_delta(self, change: FactorChange, scale: float, probes: Tensor) -> Tensor:
        """``s·(A'(B'X) − A(BX))`` in fp64 with the stored factors."""
        A_new, B_new = change.A_new.to(probes.dtype), change.B_new.to(probes.dtype)
        A_old, B_old = change.A.to(probes.dtype), change.B.to(probes.dtype)
        return (A_new @ (B_new @ probes)).sub_(A_old @ (B_old @ probes)).mul_(scale)
