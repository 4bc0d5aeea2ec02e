"""The protocol every projection variant implements.

A projection decides how the full gradient ``G = ∂L/∂W`` (an ``out×in`` matrix) maps onto two
factors ``A`` (``out×r``) and ``B`` (``r×in``), and how a step of the factors becomes a change
of ``W``. Adam never sees any of this. The step engine (:mod:`lora_optim.engine`) calls, for a
low-rank parameter with per-parameter ``state`` and scale ``s``::

    A, B   = projection.step_factors(state, group, G)     # pure: the factors of this step
    gA, gB = projection.project(G, A, B)                   # ∂L/∂A, ∂L/∂B at s = 1 (then × s)
    ...    # the NaN/Inf check of the step, on the device: `taken`, a 0-dim bool per parameter
    A, B   = projection.begin_step(state, group, A, B, taken=taken)   # commit, where taken
    ...    # fused AdamW on the trained factors (trained_factors), found_inf = not taken
    projection.add_delta_(W, FactorChange(A, B, A', B', dA, dB), s)   # W += s·(Δ(A', B') − Δ(A, B))

The step is decided on the device, so a skipped parameter reaches :meth:`begin_step` too, with
``taken`` false, and must then change nothing (``torch.where``, ``masked_fill_``, adding
``taken`` to a counter). A variant whose commit changes host-side values (ints, Python
objects) says so with :meth:`host_decides`; the engine then reads the step's flags on the host
(one sync) and calls :meth:`begin_step` without ``taken``, only for a step that is taken. That is
the default for a variant that overrides :meth:`begin_step`.

The per-layer and activation-side modes call :meth:`project` (or :meth:`project_activations`)
on each piece of the gradient with the factors of :meth:`step_factors` (called without ``G``:
the full gradient of the step never exists there), and the engine steps with the sums. Every member the engine or the modes use is declared on :class:`Projection`;
nothing is looked up by ``getattr``.

Per-parameter state made by :meth:`Projection.init_state` holds tensors and plain ints only,
so optimizer checkpoints load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lora_optim.options import Option
from lora_optim.state_keys import FACTOR_A, FACTOR_B

__all__ = ["Projection", "FactorState", "FactorChange"]

#: Per-parameter state of a projection: tensors and plain ints or floats only.
FactorState = dict[str, Any]


class FactorChange(NamedTuple):
    """One step of the factors of one parameter, as the engine hands it to the write.

    ``A``, ``B`` are the factors before the step and ``A_new``, ``B_new`` after it (as stored);
    ``dA = A_new − A`` and ``dB = B_new − B`` are the steps the stored factors really took, so
    the changes written into ``W`` telescope to ``s·(Δ(A_t, B_t) − Δ(A_0, B_0))`` of the
    stored factors. ``row_offset`` is the index in the whole weight of the first row of ``A``
    (non-zero when the weight is sharded by rows, e.g. by FSDP2: ``A`` then holds this rank's
    rows, ``B`` all of it).
    """

    A: Tensor
    B: Tensor
    A_new: Tensor
    B_new: Tensor
    dA: Tensor
    dB: Tensor
    row_offset: int = 0


class Projection(abc.ABC):
    """How a full gradient becomes low-rank factor gradients and back.

    Subclasses set :attr:`name` (the string users pass as ``projection=``) and may declare
    per-group :attr:`options`. Instances are stateless: everything per parameter lives in the
    state dict they create.
    """

    #: The name users select the variant by, e.g. ``"lora"``.
    name: ClassVar[str]
    #: Per-group options of this variant (:class:`~lora_optim.options.Option` entries: name,
    #: default, check). The optimizer fills and validates them in every group using the variant.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Whether :meth:`project` takes a ``G`` of lower precision than the factors (a bf16 ``G``
    #: with fp32 factors). If not, the engine converts ``G`` to the factor dtype first (a
    #: weight-sized copy).
    accepts_low_precision_grad: ClassVar[bool] = False
    #: Whether the variant runs on weights sharded by rows (FSDP2's ``fully_shard``): then every
    #: method sees this rank's rows of ``G``, ``W`` and of the row-sharded state (``A``, its
    #: moments), all of ``B``; :meth:`project` is called with ``row_offset`` (the global index of
    #: the first local row) and returns this rank's rows of ``∂L/∂A`` and its *partial* ``∂L/∂B``
    #: (the engine sums it over the ranks); the state carries ``state[ROW_OFFSET]`` and
    #: ``state[GLOBAL_ROWS]`` (:mod:`lora_optim.state_keys`) for draws made for the whole weight.
    #: A variant without it is refused on sharded weights.
    supports_row_sharding: ClassVar[bool] = False
    #: State keys of tensors with one row per row of ``W`` (besides ``A`` and its moments), which
    #: are sharded with ``W``.
    row_sharded_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether every NaN or Inf of ``G`` reaches the factor gradients of :meth:`project` (and of
    #: :meth:`project_activations` from a NaN/Inf in ``X`` or ``δY``). True when each entry of
    #: ``G`` enters them through products with factor entries or plain sums, with no masking:
    #: IEEE arithmetic keeps the NaN (``0·NaN`` and ``0·Inf`` are NaN). The engine then checks
    #: the factor gradients only (no extra read of ``G``); otherwise it checks ``G`` itself.
    grad_nonfinite_propagates: ClassVar[bool] = False
    #: State keys held as 0-dim int64 tensors on the weight's device (counters a step advances on
    #: the device); an int from an older checkpoint is made one when it loads.
    counter_keys: ClassVar[tuple[str, ...]] = ()

    def validate_options(self, group: Mapping[str, Any]) -> None:
        """Checks that involve several options of ``group`` (each option's own check has run).
        Raise ``ValueError`` naming the options and values. The default accepts everything."""

    @abc.abstractmethod
    def init_state(
        self, weight: Tensor, rank: int, seed: int, factor_dtype: torch.dtype, group: Mapping[str, Any]
    ) -> FactorState:
        """Per-parameter state for the ``out×in`` matrix ``weight``; must not change ``weight``.

        ``rank`` is already clipped to ``min(rank, out, in)``; ``seed`` is this parameter's
        int seed; factors are made in ``factor_dtype`` (fp32 for bf16/fp16 weights) on
        ``weight``'s device. Draw random numbers from ``seed`` (e.g. with
        :func:`lora_optim.seeding.gaussian`), never from torch's global RNG.
        """

    @abc.abstractmethod
    def current_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The factors ``(A, B)`` as they stand, without side effects (``get_factors``, export)."""

    def step_factors(
        self, state: FactorState, group: Mapping[str, Any], grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The factors the next step projects with, without side effects: it may be called for
        every piece of a gradient (micro-batches, layer uses) and again at the step, and must
        return equal values each time until :meth:`begin_step` runs. Redrawing variants return
        the new draw when one is due.

        ``grad`` is the step's full gradient (``out×in``, prepared as for :meth:`project`) in the
        plain mode, and ``None`` where the gradient arrives in pieces (the per-layer and
        activation-side modes). A variant whose factors at this step are computed from ``G``
        (a gradient-based init, a subspace refresh) uses it, and raises ``ValueError`` saying so
        when it is ``None``. The default returns :meth:`current_factors`.
        """
        return self.current_factors(state, group)

    def trained_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[bool, bool]:
        """Which of ``(A, B)`` train at the coming step. A factor that does not train takes no Adam
        step (its moments are not updated and weight decay does not touch it), so its step in
        the :class:`FactorChange` is zero, and its gradient from :meth:`project` is ignored (it
        may be ``None``). The default trains both. Must not change between :meth:`step_factors`
        and the step."""
        return True, True

    def begin_step(
        self, state: FactorState, group: Mapping[str, Any], A: Tensor, B: Tensor, *, taken: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Commit the step that :meth:`step_factors` announced (``A``, ``B`` are what it returned)
        and return the tensors the engine's Adam call updates in place: the stored factors, or
        ``A`` and ``B`` themselves when nothing is stored. Redrawing variants advance their
        counters and apply their moment rule here.

        ``taken`` is a 0-dim bool tensor on the factors' device: whether the step is taken. The
        commit must then leave everything as it was where ``taken`` is false, without reading it
        on the host (masked updates). ``None``: the step is taken (a variant that decides on the
        host, :meth:`host_decides`, is only called for steps that are taken). The default
        returns ``(A, B)``."""
        return A, B

    def host_decides(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """Whether this step's :meth:`begin_step` changes host-side state (ints, Python objects),
        so that the engine must know on the host whether the step is taken (one host read of the
        step's flags, before anything changes) and call :meth:`begin_step` only then. Read from
        the host state alone (no device read). The default: true when the variant overrides
        :meth:`begin_step`, false otherwise."""
        return type(self).begin_step is not Projection.begin_step

    def reads_grad_raw(self, state: FactorState, group: Mapping[str, Any]) -> bool:
        """Whether this step reads ``G`` other than through :meth:`project` (an SVD of it in
        :meth:`step_factors`): the engine then checks ``G`` itself for NaN/Inf. Default false."""
        return False

    @abc.abstractmethod
    def project(self, grad: Tensor, A: Tensor, B: Tensor, *, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Factor gradients ``(∂L/∂A, ∂L/∂B)`` at scale ``s = 1`` from the full gradient ``grad``
        (``out×in``); the engine multiplies both by ``s``. ``grad`` has the factors' dtype unless
        :attr:`accepts_low_precision_grad` is set. Return new tensors of the factors' dtype, or
        ``None`` for a factor that does not train (:meth:`trained_factors`). ``row_offset`` is
        only passed on row-sharded weights (:attr:`supports_row_sharding`)."""

    def project_activations(
        self, inputs: Tensor, output_grads: Tensor, A: Tensor, B: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`project` of ``G = output_gradsᵀ·inputs`` without forming ``G`` where possible.

        For a linear layer ``Y = X·Wᵀ`` over ``n`` rows (tokens), ``inputs`` is ``X`` (``n×in``)
        and ``output_grads`` is ``δY = ∂L/∂Y`` (``n×out``), both in the factors' dtype. The
        default forms ``G`` and calls :meth:`project`, which is correct for every variant
        (every projection is linear in ``G``); variants override it to avoid the ``out×in``
        product (the activation-side mode, :mod:`lora_optim.activation`).
        """
        return self.project(torch.mm(output_grads.t(), inputs), A, B)

    @abc.abstractmethod
    def add_delta_(self, target: Tensor, change: FactorChange, scale: float, row_start: int = 0) -> None:
        """``target += scale·(Δ(A_new, B_new) − Δ(A, B))`` in place, for the rows
        ``row_start : row_start + len(target)`` of ``W`` that ``target`` holds; ``Δ`` is the
        variant's parametrisation of the weight change (``A·B`` for LoRA).

        ``target`` is ``W`` itself (any float dtype), a block of its rows, or a buffer of the
        factor dtype (the write modes of :mod:`lora_optim.precision` pass one). A target of
        lower precision than the factors is rounded once per element, as ``target.add_(delta)``
        would round."""

    def step_product(
        self, change: FactorChange, row_start: int = 0, rows: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """This step's change of ``W`` as a thin product: ``(L, R)`` with
        ``Δ(A_new, B_new) − Δ(A, B) = L·R`` on the rows ``row_start : row_start + rows`` of ``W``
        (``rows=None``: through the last row), ``L`` of those rows, ``R`` of all columns, both in the
        factors' dtype; or ``None`` if the variant's change is not one (the default).

        Optional. The write modes that round (``stochastic``, ``compensated``;
        :mod:`lora_optim.precision`) use it to update ``W`` in one pass with no weight-sized
        temporary; without it they form ``s·ΔW`` a block of rows at a time through
        :meth:`add_delta_`. It must agree with :meth:`add_delta_`, which then adds ``s·L·R``.
        """
        return None

    def probe_delta(self, change: FactorChange, scale: float, probes: Tensor) -> Tensor:
        """The exact change of ``W·X`` this step, in fp64, for the drift check (:mod:`lora_optim.drift`):
        ``s·(Δ(A_new, B_new) − Δ(A, B))·X``.

        ``probes`` is ``X`` (``in×k``, fp64). This default is correct for any variant but forms a
        full fp64 ``out×in`` buffer through :meth:`add_delta_`; variants override it with a
        formula of cost ``O(r·(out+in)·k)``.
        """
        A, B, A_new, B_new = (t.to(probes.dtype) for t in (change.A, change.B, change.A_new, change.B_new))
        wide = FactorChange(A, B, A_new, B_new, A_new - A, B_new - B, change.row_offset)
        buffer = torch.zeros(change.A.shape[0], change.B.shape[1], dtype=probes.dtype, device=probes.device)
        self.add_delta_(buffer, wide, scale)
        return buffer @ probes

    def step_size_coefficients(self, out_features: int, in_features: int, rank: int) -> tuple[float, float, float, float]:
        r"""``(a₀, a₁, b₀, b₁)`` of the divergence guard's estimate of one step's change
        (:mod:`lora_optim.divergence`), from the squared Frobenius norms of the factor steps and
        of the factors after the step:

        .. math::

            \lVert \Delta(A', B') - \Delta(A, B) \rVert_F^2 \approx
            \lVert dA \rVert^2 (a_0 + a_1 \lVert B' \rVert^2) + \lVert dB \rVert^2 (b_0 + b_1 \lVert A' \rVert^2).

        The default, ``(0, 1/r, 0, 1/r)``, is the product form ``A·B``: ``A'B' − AB = dA·B + A'·dB``
        and ``‖dA·B‖_F² = ‖dA‖_F²‖B‖_F²/r`` when the rows of ``B`` are orthogonal with equal norms
        (Gaussian draws, LoRA's init and an orthonormal basis are at or near it); the cross term
        ``2⟨dA·B, A'·dB⟩`` is left out. Called once per parameter when its guard state is made.
        """
        return 0.0, 1.0 / rank, 0.0, 1.0 / rank

    def first_step_norm_sq(self, out_features: int, in_features: int, rank: int) -> float | None:
        r"""The expected ``‖ΔW₁‖_F² / (s·η)²`` of the first step from this projection's default
        init (``η`` the learning rate, ``rank`` the effective rank), for a gradient ``G`` in general
        position: what ``update_scale="matched"`` equalises across projections
        (:mod:`lora_optim.update_scale`).

        Adam's first step moves every entry of a trained factor whose gradient is non-zero by
        exactly ``η`` (``m̂/√v̂ = g/|g|``, up to ``ε``). For the product form ``ΔW = s·A·B`` the
        first change is ``s·(dA·B₀ + A₀·dB)`` (plus ``s·dA·dB``, of relative size ``η²r``), and
        for independent signs ``E‖dA·B₀‖_F² = η²·out·‖B₀‖_F²`` and ``E‖A₀·dB‖_F² = η²·in·‖A₀‖_F²``.

        ``None`` (the default): not derived; ``update_scale="matched"`` then refuses the projection
        with a ``ValueError``. A pure function of the shapes; called when a step's scale is formed.
        """
        return None

    def set_factors_(self, state: FactorState, A: Tensor, B: Tensor, group: Mapping[str, Any]) -> None:
        """Replace the stored factors by copies of ``A`` and ``B`` (shapes and dtype already made
        to match). Variants that store no factors raise ``ValueError`` saying why."""
        state[FACTOR_A].copy_(A)
        state[FACTOR_B].copy_(B)

    # --- the weight's base (lora_optim.initial_factors): export as an adapter, unmerge ---

    def record_base_(self, state: FactorState, group: Mapping[str, Any]) -> None:
        """Record the current factors as those the weight's base excludes, ``W = W_base +
        s·(Δ(A, B) − Δ(A₀, B₀))`` (:mod:`lora_optim.initial_factors`). The optimizer calls it when
        the state is made and after :meth:`set_factors_` without moving ``W``. Variants with
        persistent factors call :func:`lora_optim.initial_factors.record_`; the default records
        nothing (the change is then unknown)."""

    def initial_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """Factors ``(A₀, B₀)`` with ``Δ(A₀, B₀)`` equal to the base's, to move back to (unmerge),
        or ``None`` if unknown or if ``W − W_base`` is not ``s·(Δ(A, B) − Δ(A₀, B₀))`` for this
        variant (``random``: a sum over draws). The default returns ``None``."""
        return None

    def change_factors(self, state: FactorState, group: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``(L, R)`` with ``W − W_base = s·L·R`` exactly (``L`` is ``out×k``, ``R`` is ``k×in``): the
        weight change as plain LoRA factors, for adapter export. ``None`` if unknown or not of that
        form; the default returns ``None``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
