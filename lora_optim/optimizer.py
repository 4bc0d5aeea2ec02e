"""``LoRAAdam``: optimizer-side LoRA.

The optimizer receives the full gradient ``G = ∂L/∂W`` of each weight matrix, projects it onto
low-rank factors with a :class:`~lora_optim.projections.Projection`, runs Adam
(:mod:`lora_optim.adam`) on the factors only, and writes the factor step back into ``W`` in
place (:mod:`lora_optim.precision`). The model graph is never touched.

This class only does bookkeeping: validation, param groups, lazy per-parameter state and a short
loop. The math lives in the modules above.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lora_optim import accumulation
from lora_optim.activation import ActivationSide
from lora_optim.adam import adamw_delta, adamw_step_
from lora_optim.checkpoint import check_loadable
from lora_optim.drift import DRIFT_KEYS, DriftReport, init_drift_state, measure_drift, record_drift_step_
from lora_optim.matrix import as_matrix, matrix_shape, writable_matrix
from lora_optim.nonfinite import NonFiniteGradientError, finite_flags, validate_policy, warn_skipped
from lora_optim.per_layer import PerLayerStep
from lora_optim.precision import default_precision, factor_dtype, get_writer
from lora_optim.projections import Projection, get_projection, projection_option_defaults
from lora_optim.projections.base import MOMENT_KEYS
from lora_optim.seeding import derive_seed
from lora_optim.weight_change import WeightChange

__all__ = ["LoRAAdam"]

_COMMON_DEFAULTS = (
    "lr", "rank", "alpha", "projection", "betas", "eps", "weight_decay", "seed", "precision", "nonfinite",
    "drift_probes",
)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class LoRAAdam(torch.optim.Optimizer):
    r"""Adam on low-rank factors of every weight matrix, applied to the weights in place.

    For a weight ``W`` (``out×in``; tensors with more dims are viewed as ``(out, rest)``) with
    gradient ``G``, each step computes the factor gradients (for ``projection="lora"``)

    .. math::

        g_A = s\,G B^\top, \qquad g_B = s\,A^\top G, \qquad s = \alpha / r,

    takes a bias-corrected AdamW step on ``A`` (``out×r``) and ``B`` (``r×in``) with decoupled
    weight decay on the factors, and adds ``s·(A'B' − AB)`` to ``W``. With the default PEFT
    init this is the same training as graph LoRA (PEFT) with AdamW on its adapters, while ``W``
    stays an ordinary parameter of an unmodified model. Optimizer state per matrix is the
    factors and two Adam moments per factor: ``3·r·(out+in)`` numbers instead of AdamW's
    ``2·out·in``.

    Parameters with fewer than 2 dims, and every parameter of a group with ``rank=None``, get
    plain AdamW with the group's settings (bit for bit ``torch.optim.AdamW(foreach=False)``).

    Args:
        params: parameters or param groups (dicts), as for any ``torch.optim.Optimizer``. Any
            option below may be set per group.
        lr: learning rate.
        rank: factor rank ``r`` (an int ≥ 1), or ``None`` for plain AdamW. A matrix smaller than
            the rank uses ``min(r, out, in)``, recorded in its state as ``"rank"``.
        alpha: scale numerator, ``s = alpha / rank`` (PEFT's meaning; the configured ``rank`` is
            used even where a small matrix clips it). ``None`` means ``alpha = rank``, ``s = 1``.
        projection: name of a registered projection: ``"lora"`` (persistent factors),
            ``"random"`` (Gaussian factors redrawn every ``resample_every`` steps) or
            ``"additive"`` (``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}``); see
            :func:`lora_optim.available_projections`.
        betas: Adam's ``(β1, β2)``, each in ``[0, 1)``.
        eps: added to ``√v̂``; > 0.
        weight_decay: decoupled weight decay on the factors (dense parameters: on the weight),
            as ``torch.optim.AdamW``; ≥ 0.
        seed: int seed of every random draw (factor inits, redraws). Combined with each
            parameter's position in the optimizer; torch's global RNG is never used.
        precision: how steps are written into ``W``: ``"nearest"``, ``"compensated"`` (Kahan
            buffer in ``W``'s dtype) or ``"stochastic"`` (see :mod:`lora_optim.precision`);
            ``None`` picks ``"compensated"`` for bf16/fp16 weights, ``"nearest"`` otherwise.
        nonfinite: what a NaN/Inf gradient does (:mod:`lora_optim.nonfinite`): ``"skip"`` that
            parameter's step, warn and count it (``nonfinite_skips()``), or ``"raise"`` before
            anything changes.
        drift_probes: number of random probe vectors of the drift check (:mod:`lora_optim.drift`,
            :meth:`drift`); ``0`` (default) turns it off at no cost.
        **projection_options: options of the projections, e.g. ``init="symmetric"`` (``lora``),
            ``resample_every=1`` and ``moment_rule="keep"`` (``random``).

    Example::

        opt = LoRAAdam(model.parameters(), rank=8, lr=1e-3)
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        rank: int | None = 8,
        alpha: float | None = None,
        projection: str = "lora",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        precision: str | None = None,
        nonfinite: str = "skip",
        drift_probes: int = 0,
        **projection_options: Any,
    ) -> None:
        option_defaults = projection_option_defaults()
        unknown = sorted(set(projection_options) - set(option_defaults))
        if unknown:
            raise TypeError(
                f"LoRAAdam got unexpected keyword argument(s) {unknown}; projection options are "
                f"{sorted(option_defaults)}"
            )
        defaults = dict(
            option_defaults,
            lr=lr, rank=rank, alpha=alpha, projection=projection, betas=betas, eps=eps,
            weight_decay=weight_decay, seed=seed, precision=precision, nonfinite=nonfinite,
            drift_probes=drift_probes, **projection_options,
        )
        super().__init__(params, defaults)
        # Per-layer / activation-side handles (hooks, not state): told about step and zero_grad.
        self._grad_modes: list[Any] = []

    # ------------------------------------------------------------------ groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated; on error the optimizer is left as it was)."""
        if isinstance(param_group, Mapping) and "params" in param_group:
            params = param_group["params"]
            if isinstance(params, (list, tuple)) and len(params) == 0:
                raise ValueError("a param group has no params ('params' is empty)")
            self._check_not_in_other_groups(params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        if not group["params"]:
            raise ValueError("a param group has no params ('params' is empty)")
        for p in group["params"]:
            if not (p.is_floating_point()):
                raise TypeError(
                    f"Invalid params: LoRAAdam trains real floating-point parameters; got one of shape "
                    f"{tuple(p.shape)} and dtype {p.dtype}"
                )
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
            lr = lr.item()
        if not _is_real(lr) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate (lr): {group['lr']!r}; must be a number >= 0")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r}; must be a pair (beta1, beta2)")
        for index, beta in enumerate(betas):
            if not _is_real(beta) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index} (betas={betas!r}): {beta!r}; must be in [0, 1)")
        group["betas"] = tuple(float(b) for b in betas)
        if not _is_real(group["eps"]) or not group["eps"] > 0.0:
            raise ValueError(f"Invalid epsilon (eps): {group['eps']!r}; must be > 0")
        if not _is_real(group["weight_decay"]) or not group["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r}; must be >= 0")
        rank = group["rank"]
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"Invalid rank: {rank!r}; must be an int >= 1 or None")
        alpha = group["alpha"]
        if alpha is not None and (not _is_real(alpha) or not alpha > 0 or not math.isfinite(alpha)):
            raise ValueError(f"Invalid alpha: {alpha!r}; must be a finite number > 0 or None")
        seed = group["seed"]
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r}; must be an int >= 0")
        if group["precision"] is not None:
            get_writer(group["precision"])
        validate_policy(group["nonfinite"])
        probes = group["drift_probes"]
        if not _is_int(probes) or probes < 0:
            raise ValueError(f"Invalid drift_probes: {probes!r}; must be an int >= 0 (0 turns the drift check off)")
        projection = get_projection(group["projection"])
        for name, default in projection.options.items():
            group.setdefault(name, default)
        projection.validate_options(group)

    def _check_not_in_other_groups(self, params: Iterable[Any]) -> None:
        # torch's own check says only "some parameters appear in more than one parameter group".
        for p in params if isinstance(params, (list, tuple)) else ():
            for index, group in enumerate(self.param_groups):
                if any(q is p for q in group["params"]):
                    raise ValueError(
                        f"Invalid params: a parameter of shape {tuple(p.shape)} appears in more than one parameter "
                        f"group (already in group {index})"
                    )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_grad_modes", [])
        # Back-fill options added after a checkpoint was written.
        for group in self.param_groups:
            for name in _COMMON_DEFAULTS:
                group.setdefault(name, self.defaults.get(name))
            for name, default in get_projection(group["projection"]).options.items():
                group.setdefault(name, default)

    # ------------------------------------------------------------------ state

    @staticmethod
    def _is_low_rank(p: Tensor, group: Mapping[str, Any]) -> bool:
        return group["rank"] is not None and p.ndim >= 2

    @staticmethod
    def _scale(group: Mapping[str, Any]) -> float:
        alpha = group["alpha"] if group["alpha"] is not None else group["rank"]
        return float(alpha) / group["rank"]

    def _position(self, p: Tensor) -> int:
        position = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return position
                position += 1
        raise ValueError("the tensor is not a parameter of this optimizer")

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the tensor is not a parameter of this optimizer")

    def _precision(self, p: Tensor, group: Mapping[str, Any]) -> str:
        return group["precision"] if group["precision"] is not None else default_precision(p.dtype)

    def _state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        if not self._is_low_rank(p, group):
            state["step"] = 0
            state["nonfinite_skips"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state
        out_features, in_features = matrix_shape(p.shape)
        rank = min(group["rank"], out_features, in_features)
        dtype = factor_dtype(p.dtype)
        seed = derive_seed(group["seed"], self._position(p))
        shapes = {"A": (out_features, rank), "B": (rank, in_features)}
        state.update(step=0, rank=rank, seed=seed, nonfinite_skips=0)
        for factor, keys in MOMENT_KEYS.items():
            for key in keys:
                state[key] = torch.zeros(shapes[factor], dtype=dtype, device=p.device)
        weight = as_matrix(p.detach())
        state.update(get_projection(group["projection"]).init_state(weight, rank, seed, dtype, group))
        state.update(get_writer(self._precision(p, group)).init_state(weight, seed))
        if group.get("drift_probes", 0):
            state.update(init_drift_state(weight, group["drift_probes"], seed))
        return state

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step over every parameter with a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with
        gradients enabled. ``p.grad`` is read, never modified.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every gradient is checked before anything changes (sparse: error; NaN/Inf: error or skip).
        finite = self._screen_gradients()
        # Projected gradients summed by the per-layer / activation-side modes (see
        # lora_optim.accumulation); those parameters are done.
        stepped = accumulation.finish_all_(self)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in stepped:
                    self._step_param(p, group, p.grad, finite=finite[id(p)])
        for mode in self._grad_modes:
            mode.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim.Optimizer.zero_grad``, and the projected
        gradients summed since the last step by the per-layer / activation-side modes
        (:mod:`lora_optim.accumulation`): what a plain backward would have left in ``p.grad``."""
        super().zero_grad(set_to_none)
        accumulation.discard_all_(self, set_to_none)
        for mode in self._grad_modes:
            mode.after_zero_grad(set_to_none)

    def enable_per_layer(self, accumulation_steps: int = 1) -> PerLayerStep:
        """Step every parameter inside ``backward`` as soon as its gradient is complete, then free
        the gradient, so at most one layer's full gradient is alive (:mod:`lora_optim.per_layer`).

        ``accumulation_steps`` micro-batches are summed (projected, for low-rank parameters)
        before a parameter steps; ``step()`` completes a shorter accumulation. Returns a handle
        whose ``remove()`` turns the mode off. Results equal the plain mode's.
        """
        return PerLayerStep(self, accumulation_steps)

    def attach(self, model: torch.nn.Module) -> ActivationSide:
        """Form the factor gradients of ``model``'s ``nn.Linear`` weights from the layers' inputs
        and output gradients, so the dense weight gradient ``G`` is never computed
        (:mod:`lora_optim.activation`). The weights get ``requires_grad=False`` until the
        returned handle's ``detach()``; other low-rank parameters keep the ``G`` path (warning).
        ``step()`` takes the factor step; results equal the plain mode's.
        """
        return ActivationSide(self, model)

    def _screen_gradients(self) -> dict[int, bool]:
        """``{id(p): grad is finite}`` for every parameter with a gradient, read with one reduction
        per gradient (:func:`lora_optim.nonfinite.finite_flags`). Raises before any change:
        ``TypeError`` for a sparse gradient, :class:`NonFiniteGradientError` for a non-finite one
        in a group with ``nonfinite="raise"``."""
        entries = []
        for index, (group_index, group, p) in enumerate(
            (i, group, p) for i, group in enumerate(self.param_groups) for p in group["params"]
        ):
            if p.grad is None:
                continue
            if p.grad.layout != torch.strided:
                raise TypeError(
                    f"Invalid gradient: LoRAAdam does not support sparse gradients; parameter {index} (group "
                    f"{group_index}, shape {tuple(p.shape)}) has a grad with layout {p.grad.layout}"
                )
            entries.append((f"parameter {index} (group {group_index}, shape {tuple(p.shape)})", group, p))
        flags = finite_flags([p.grad for _, _, p in entries])
        refused = [where for (where, group, _), ok in zip(entries, flags) if not ok and group["nonfinite"] == "raise"]
        if refused:
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or Inf) in {', '.join(refused)} with nonfinite='raise'; nothing was changed"
            )
        return {id(p): ok for (_, _, p), ok in zip(entries, flags)}

    def _skip_nonfinite(
        self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any],
        cause: str = "its gradient has NaN or Inf entries; the weight and its optimizer state were left unchanged",
    ) -> None:
        """Do not step ``p`` this time: raise (``nonfinite="raise"``) or count and warn."""
        where = f"parameter {self._position(p)} (shape {tuple(p.shape)})"
        if group.get("nonfinite", "skip") == "raise":
            raise NonFiniteGradientError(f"{where}: {cause} (nonfinite='raise')")
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        # Same text every time for a parameter, so the default filter shows it once per parameter;
        # nonfinite_skips() counts them all.
        warn_skipped(f"LoRAAdam skipped a step of {where}: {cause} (count: opt.nonfinite_skips(p))")

    def _step_param(self, p: Tensor, group: dict[str, Any], grad: Tensor, finite: bool | None = None) -> None:
        if grad.layout != torch.strided:
            raise TypeError(
                f"Invalid gradient: LoRAAdam does not support sparse gradients; a parameter of shape "
                f"{tuple(p.shape)} has a grad with layout {grad.layout}"
            )
        state = self._state(p, group)
        if not (finite if finite is not None else finite_flags([grad])[0]):
            self._skip_nonfinite(p, group, state)
            return
        hyper = self._hyper(group)
        if not self._is_low_rank(p, group):
            state["step"] += 1
            adamw_step_(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
            return
        projection = get_projection(group["projection"])
        A, B = projection.begin_step(state, group)
        matrix_grad = as_matrix(grad)
        # Projections that read a bf16 G themselves avoid this weight-sized fp32 copy.
        if matrix_grad.dtype != A.dtype and not getattr(projection, "accepts_low_precision_grad", False):
            matrix_grad = matrix_grad.to(A.dtype)
        scale = self._scale(group)
        grad_A, grad_B = projection.project(matrix_grad, A, B, scale)
        self._factor_step(p, group, state, projection, A, B, grad_A, grad_B, scale, hyper)

    @staticmethod
    def _hyper(group: Mapping[str, Any]) -> dict[str, float]:
        """The Adam hyperparameters of ``group`` as they are now (``lr`` read at every step)."""
        beta1, beta2 = group["betas"]
        return dict(lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _factor_step(
        self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any], projection: Projection,
        A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, scale: float, hyper: dict[str, float],
    ) -> None:
        state["step"] += 1
        (exp_avg_A, exp_avg_sq_A), (exp_avg_B, exp_avg_sq_B) = (
            tuple(state[key] for key in MOMENT_KEYS[factor]) for factor in ("A", "B")
        )
        dA = adamw_delta(A, grad_A, exp_avg_A, exp_avg_sq_A, state["step"], **hyper)
        dB = adamw_delta(B, grad_B, exp_avg_B, exp_avg_sq_B, state["step"], **hyper)
        # The steps the stored factors will really take (A' = fl(A + dA), so dA ← A' − A, exact
        # when |dA| ≤ |A|): W then follows s·(A_t B_t − A_0 B_0) of the stored factors to the
        # rounding of one step, instead of drifting by the factors' rounding (~2⁻²⁴·|A||B|) per step.
        dA, dB = (A + dA).sub_(A), (B + dB).sub_(B)
        if not math.isfinite((dA.sum() + dB.sum()).item()):
            # Last line of defence (the gradient was finite, or was never checked: per-layer and
            # activation-side pieces): a diverged state (overflowed moments) must not reach W.
            self._skip_nonfinite(p, group, state, "its factor step is not finite (the optimizer state has "
                                 "overflowed); the weight and the factors were left unchanged, the moments were not")
            return
        if DRIFT_KEYS[-1] in state:
            record_drift_step_(state, projection, A, B, dA, dB, scale)
        writer = get_writer(self._precision(p, group))
        with writable_matrix(p) as weight:
            writer.write_(weight, state, WeightChange(projection, A, B, dA, dB, scale), A.dtype)
        projection.commit_(state, A, B, dA, dB)

    # ------------------------------------------------------------------ factors

    def get_factors(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of the factors ``(A, B)`` of parameter ``p``: ``A`` is ``out×r``, ``B`` is ``r×in``
        (``in`` is the product of the trailing dims for conv kernels).

        Since the start (or the last :meth:`set_factors`, or the last redraw of ``random``),
        ``W`` has moved by ``s·(A·B − A₀·B₀)`` (``lora``/``random``). The state is created if
        ``p`` has not been stepped yet. For ``random`` with ``resample_every=1`` these are the
        factors the next step will project with. Raises ``ValueError`` for densely trained
        parameters.
        """
        group = self._group_of(p)
        if not self._is_low_rank(p, group):
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} is trained by plain AdamW (rank=None or ndim < 2); it has no factors"
            )
        state = self._state(p, group)
        A, B = get_projection(group["projection"]).current_factors(state, group)
        return A.clone(), B.clone()

    @torch.no_grad()
    def set_factors(self, p: Tensor, A: Tensor, B: Tensor) -> None:
        """Replace the factors of ``p`` by copies of ``A`` (``out×r``) and ``B`` (``r×in``); ``W`` is
        not changed (later steps add ``s·(A'B' − AB)`` measured from the new factors).

        The factors' Adam moments and step count are reset to zero: they described the old
        factors. ``r`` must equal the parameter's effective rank ``min(rank, out, in)``. Use it
        to start from factors made elsewhere (e.g. PEFT's, or an SVD of ``W``).
        """
        group = self._group_of(p)
        if not self._is_low_rank(p, group):
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} is trained by plain AdamW (rank=None or ndim < 2); it has no factors"
            )
        state = self._state(p, group)
        rank = state["rank"]
        out_features, in_features = matrix_shape(p.shape)
        for name, tensor, expected in (("A", A, (out_features, rank)), ("B", B, (rank, in_features))):
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"set_factors: {name} must have shape {expected} for this parameter, got {shape}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"set_factors: {name} has non-finite entries")
        moment = state[MOMENT_KEYS["A"][0]]
        get_projection(group["projection"]).set_factors_(
            state, A.to(device=moment.device, dtype=moment.dtype), B.to(device=moment.device, dtype=moment.dtype), group
        )
        for keys in MOMENT_KEYS.values():
            for key in keys:
                state[key].zero_()
        state["step"] = 0

    # ------------------------------------------------------------------ reliability

    def drift(self, p: Tensor) -> DriftReport:
        """How far ``W`` has drifted from ``W₀ + (the exact sum of the steps' changes)``, seen through
        the group's ``drift_probes`` random probe vectors (:mod:`lora_optim.drift`).

        Returns a :class:`~lora_optim.drift.DriftReport` with ``relative_to_weight``
        (``‖W X − E‖/‖E‖``, ``E = W₀X + C``), ``relative_to_change`` (``‖(W − W₀)X − C‖/‖C‖``: the
        share of the intended change lost or added) and ``change_norm`` (``‖C‖``). ``C`` is
        ``s·(A_t B_t − A_0 B_0)·X`` for ``lora``, the sum over draws for ``random``, the additive
        formula for ``additive``. Raises ``ValueError`` if ``p`` is trained densely or its group
        has ``drift_probes=0``.
        """
        group = self._group_of(p)
        if not self._is_low_rank(p, group):
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} is trained by plain AdamW (rank=None or ndim < 2); it has no drift probe"
            )
        if not group.get("drift_probes", 0):
            raise ValueError(
                f"drift probes are off for the group of the parameter of shape {tuple(p.shape)} "
                f"(drift_probes={group.get('drift_probes', 0)!r}); construct with drift_probes=k, k >= 1"
            )
        with torch.no_grad():
            return measure_drift(as_matrix(p.detach()), self._state(p, group))

    def drift_report(self) -> dict[int, DriftReport]:
        """:meth:`drift` of every low-rank parameter whose group has ``drift_probes > 0``, keyed by
        the parameter's index in the optimizer (groups in order)."""
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        return {
            index: self.drift(p)
            for index, (p, group) in enumerate(params)
            if self._is_low_rank(p, group) and group.get("drift_probes", 0)
        }

    def nonfinite_skips(self, p: Tensor | None = None) -> int:
        """Steps skipped because of a NaN/Inf gradient: for parameter ``p``, or in total. The counts
        are ints in the optimizer state (``"nonfinite_skips"``), so they checkpoint."""
        if p is not None:
            self._group_of(p)  # ValueError if p is not ours
            return int(self.state[p].get("nonfinite_skips", 0)) if p in self.state else 0
        return sum(int(state.get("nonfinite_skips", 0)) for state in self.state.values())

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict`.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
        parameter's dtype; that would round fp32 factors and moments of a bf16 weight to bf16.
        Here every state tensor keeps the dtype it was saved with (and is copied, so the loaded
        optimizer never shares storage with ``state_dict``); ints (step counts, seeds, draw
        counters) load exactly.

        Before anything changes, the state dict is checked against this optimizer
        (:func:`lora_optim.checkpoint.check_loadable`): a checkpoint made with another rank,
        projection, precision, ``drift_probes`` or parameter shapes raises ``ValueError`` naming
        the parameter (index, group, shape) and the mismatch, and leaves the optimizer as it was.
        Other options (``lr``, ``betas``, ...) come from the checkpoint, as in ``torch.optim``.
        """
        check_loadable(self.param_groups, state_dict, self._is_low_rank)
        saved_state = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            for key, value in saved_state[pid].items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)
