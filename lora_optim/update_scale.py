"""``update_scale``: one learning rate for every projection (issue 19).

At the same ``lr`` and ``alpha`` the projections move ``W`` by very different amounts per step.
With Adam every trained factor entry moves by about ``η`` per step (exactly ``η`` at the first
step: ``m̂/√v̂ = g/|g|``), so the size of a step of ``W`` is set by how the factors are spread over
``W``, not by the gradient. The first step from each projection's default init has (per
:meth:`Projection.first_step_norm_sq <lora_optim.projections.Projection.first_step_norm_sq>`,
``r`` the effective rank, ``G`` in general position)

.. math::

    \\mathbb{E}\\,\\lVert \\Delta W_1 \\rVert_F^2 = (s\\,\\eta)^2\\, n_P(\\mathrm{out}, \\mathrm{in}, r),
    \\qquad
    n_{\\mathrm{lora}} = \\frac{\\mathrm{out}\\cdot r}{3}, \\quad
    n_{\\mathrm{random}} = n_{\\mathrm{additive}} = 2\\,\\mathrm{out}\\cdot\\mathrm{in}, \\quad
    n_{\\mathrm{svd}} = r\\cdot\\max(\\mathrm{out}, \\mathrm{in}).

``lora`` is slow at the start (``A₀ = 0``: only ``A`` moves, through a ``B₀`` of entries
``U(±1/√in)``); ``random`` and ``additive`` move both factors, each spread over a whole side of
``W``: every entry of ``W`` moves by about ``√2·s·η``. For a 384×384 matrix at ``r = 8`` that is
``√(6·in/r) = 17`` times ``lora``'s first step.

``update_scale="matched"`` multiplies the scale of each low-rank matrix by

.. math::

    c_P = \\sqrt{\\frac{n_{\\mathrm{lora}}(\\mathrm{out}, \\mathrm{in}, r)}{n_P(\\mathrm{out}, \\mathrm{in}, r)}},
    \\qquad s \\to c_P\\, s,

so that the expected first step ``‖ΔW₁‖_F`` equals ``lora``'s at the same ``lr`` and ``alpha``, for
every projection and shape (µP-style: the multiplier is derived from the parametrisation, not
tuned). ``c_lora = 1`` (``lora`` is unchanged, bit for bit), ``c_random = c_additive = √(r/(6·in))``,
``c_svd = √(out/(3·max(out, in)))``. The multiplier is part of ``s`` everywhere: the factor
gradients (``c·s·G·Bᵀ``), the write into ``W``, :meth:`~lora_optim.LoRAAdam.factor_scale`, exported
adapters, the drift check and the divergence guard. So a ``matched`` group is exactly a
``plain`` one with ``alpha`` multiplied by ``c_P`` per matrix. For the projections whose change is
linear in the trained factors from zero (``additive``, ``svd``, and ``random`` redrawn every step up
to its ``s·dA·dB`` term) and Adam's invariance to the gradient's scale, that is the same as
``lr → c_P·lr`` for those matrices (``ε`` is then relatively ``1/c_P`` larger), dense parameters
keeping ``lr``.

What it does not capture: ``lora``'s steps grow as ``A`` grows (``s·A·dB`` appears from the
second step, with ``‖A‖`` about ``η·t`` after ``t`` steps in one direction), and ``random``'s
redrawn subspaces make successive steps nearly orthogonal, while ``additive``'s fixed subspace
adds them up. Matching the first step is the derivation the issue asks for; whether one ``lr``
then transfers is measured on a real task (``benchmarks/projection_study.py``, ``docs/choosing.md``).
The default stays ``"plain"`` (the seed's definitions, ``c = 1`` for every projection).
"""

from __future__ import annotations

import math

from lora_optim.projections.base import Projection
from lora_optim.projections.registry import get_projection

__all__ = ["UPDATE_SCALES", "REFERENCE_PROJECTION", "declares_first_step", "update_multiplier"]

#: The values of the ``update_scale`` option: ``"plain"`` (``c = 1``) and ``"matched"``.
UPDATE_SCALES = ("plain", "matched")

#: The projection whose first step the others are matched to.
REFERENCE_PROJECTION = "lora"


def declares_first_step(projection: Projection) -> bool:
    """Whether ``projection`` derives its first step (overrides ``first_step_norm_sq``)."""
    return type(projection).first_step_norm_sq is not Projection.first_step_norm_sq


def update_multiplier(projection: Projection, out_features: int, in_features: int, rank: int) -> float:
    """``c_P = √(n_lora / n_P)`` of an ``out×in`` matrix at effective rank ``rank`` (module
    docstring): the factor by which ``update_scale="matched"`` multiplies ``s``. ``1.0`` for
    ``lora``. ``ValueError`` for a projection that does not derive its first step."""
    own = projection.first_step_norm_sq(out_features, in_features, rank)
    if own is None:
        raise ValueError(f"update_scale='matched': projection {projection.name!r} does not derive its first step "
                         "(Projection.first_step_norm_sq returns None); use update_scale='plain'")
    if projection.name == REFERENCE_PROJECTION:
        return 1.0
    reference = get_projection(REFERENCE_PROJECTION).first_step_norm_sq(out_features, in_features, rank)
    return math.sqrt(reference / own)
