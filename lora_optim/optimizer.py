"""``LoRAAdam``: optimizer-side LoRA.

The optimizer receives the full gradient ``G = ∂L/∂W`` of each weight matrix, projects it onto
low-rank factors with a :class:`~lora_optim.projections.Projection`, runs Adam on the factors
only, and writes the factor step back into ``W`` in place (:mod:`lora_optim.precision`). The
model graph is never touched.

This class does bookkeeping only: it validates options (:mod:`lora_optim.option_table`), keeps
param groups and lazy per-parameter state (:mod:`lora_optim.state_keys`), gathers each step's
parameters into lists and hands them to the step engine (:mod:`lora_optim.engine`), which does
the math. Gradient modes plug in from outside through :meth:`LoRAAdam.register_grad_mode` and the
two ``accumulate_*`` methods; this module imports none of them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lora_optim import accumulation, engine, initial_factors
from lora_optim.checkpoint import check_loadable
from lora_optim.divergence import (
    DEFAULT_DIVERGENCE_THRESHOLD,
    PendingStepSizes,
    StepSizeReport,
    check_step_sizes,
    init_step_size_state,
    is_check_step,
    start_step_size_read,
    step_size_report,
)
from lora_optim.distributed import LocalState, WholeState, all_reduce_sum_, is_dtensor, local, row_shard, shard_rows_
from lora_optim.drift import DriftReport, init_drift_state, measure_drift, record_drift_step_
from lora_optim.grad_mode import GradMode
from lora_optim.kernels.paths import cpu_paths
from lora_optim.learnt_change import LearntChange, learnt_change_of
from lora_optim.matrix import as_matrix, matrix_shape, writable_matrix
from lora_optim.nonfinite import warn_skipped
from lora_optim.option_table import (
    COMMON_OPTIONS,
    STRUCTURAL_OPTIONS,
    all_option_defaults,
    check_option_names,
    validate_group,
)
from lora_optim.precision import default_precision, factor_dtype, get_writer
from lora_optim.projections import FactorChange, Projection, get_projection
from lora_optim.projections import projection_options as registered_projection_options
from lora_optim.seeding import derive_seed
from lora_optim.sparsity import init_sparsity_state, sparsity_mask
from lora_optim.state_keys import (
    ACCUMULATED_GRAD_A,
    ACCUMULATED_GRAD_B,
    ACCUMULATION,
    DRIFT_CHANGE,
    EXP_AVG,
    EXP_AVG_SQ,
    MOMENT_KEYS,
    NONFINITE_SKIPS,
    RANK,
    ROW_SHARDED_KEYS,
    SEED,
    STEP,
    STEP_SIZE_REFERENCE,
)
from lora_optim.update_scale import update_multiplier
from lora_optim.weight_change import weight_delta

__all__ = ["LoRAAdam"]


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

    Parameters with fewer than 2 dims, with a zero-size dim, and every parameter of a group with
    ``rank=None``, get plain AdamW with the group's settings (bit for bit
    ``torch.optim.AdamW(fused=True)``: the same kernel).

    A step runs as lists (:mod:`lora_optim.engine`): a few ops per matrix, one fused Adam call
    per parameter, and the NaN/Inf decisions on the device (no host sync with the default
    ``nonfinite="skip"``), so ``torch.compile(opt.step)`` compiles it whole and a CUDA graph can
    capture it; pass ``lr`` as a tensor to change it (a scheduler) without recompiling.
    ``torch.amp.GradScaler`` drives it through its optimizer contract
    (``_step_supports_amp_scaling``): the scale is divided out inside the fused Adam calls, and
    a step the scaler finds an Inf in changes nothing.

    Args:
        params: parameters or param groups (dicts), as for any ``torch.optim.Optimizer``. Any
            option below may be set per group; a key that is not an option raises.
        lr: learning rate (a float, or a one-element tensor).
        rank: factor rank ``r`` (an int ≥ 1), or ``None`` for plain AdamW. A matrix smaller than
            the rank uses ``min(r, out, in)``, recorded in its state as ``"rank"``.
        alpha: scale numerator, ``s = alpha / rank`` (PEFT's meaning; the configured ``rank`` is
            used even where a small matrix clips it). ``None`` means ``alpha = rank``, ``s = 1``.
        projection: name of a registered projection: ``"lora"`` (persistent factors),
            ``"random"`` (Gaussian factors redrawn every ``resample_every`` steps),
            ``"additive"`` (``ΔW_ij = A_{i, j mod r} + B_{i mod r, j}``) or ``"svd"``
            (GaLore-style, :mod:`lora_optim.projections.svd`); see
            :func:`lora_optim.available_projections`.
        betas: Adam's ``(β1, β2)``, each in ``[0, 1)``.
        eps: added to ``√v̂``; a finite number > 0.
        weight_decay: decoupled weight decay on the factors (dense parameters: on the weight),
            as ``torch.optim.AdamW``; a finite number ≥ 0.
        seed: int seed of every random draw (factor inits, redraws). Combined with each
            parameter's position in the optimizer; torch's global RNG is never used.
        precision: how steps are written into ``W``: ``"nearest"``, ``"stochastic"`` (unbiased
            stochastic rounding, nothing kept) or ``"compensated"`` (a Kahan buffer in ``W``'s
            dtype: +100% of the weight's memory); see :mod:`lora_optim.precision`. ``None`` picks
            ``"stochastic"`` for bf16/fp16 weights, ``"nearest"`` otherwise.
        nonfinite: what a NaN/Inf gradient does (:mod:`lora_optim.nonfinite`): ``"skip"`` that
            parameter's step, decided on the device, and count it (``nonfinite_skips()``) and warn
            (at once on the CPU; on an accelerator when the counts are next read), or ``"raise"``
            before anything changes (the one mode that reads the host in every step).
        drift_probes: number of random probe vectors of the drift check (:mod:`lora_optim.drift`,
            :meth:`drift`); ``0`` (default) turns it off at no cost.
        divergence_threshold: the divergence guard (:mod:`lora_optim.divergence`): a
            :class:`~lora_optim.divergence.DivergenceWarning` when a step moves a low-rank weight
            by more than this share of its norm, ``s·‖ΔW‖/‖W₀‖`` (measured on the device, a
            skipped step records nothing; checked after steps 1, 2, 4, …, 512, then every 512,
            with no host sync in any step: on the CPU from memory, on CUDA by a copy to the host
            that does not block, warned at a later step once it has landed; a compiled loop
            calls :meth:`check_step_sizes`, the one blocking read); ``None`` turns it off (no
            state, no work). Default ``0.01``, a bound from the size of a step.
        update_scale: ``"plain"`` (default: ``s`` as above) or ``"matched"``: ``s`` of each low-rank
            matrix times ``c_P = √(n_lora/n_P)``, so that the expected ``‖ΔW‖_F`` of the first
            step is ``lora``'s for every projection at the same ``lr`` (:mod:`lora_optim.update_scale`:
            ``c = 1`` for ``lora``, ``√(r/(6·in))`` for ``random`` and ``additive``,
            ``√(out/(3·max(out, in)))`` for ``svd``). :meth:`factor_scale` includes it.
        preserve_sparsity: keep every zero of each low-rank weight exactly zero (LoRS): train
            ``W = W₀ + s·ΔW ⊙ [W₀ ≠ 0]``, with the mask stored packed, 1 bit per weight
            (:mod:`lora_optim.sparsity`). Densely trained parameters (vectors, ``rank=None``
            groups) are not masked: plain AdamW moves their zeros.
        max_grad_norm: clip the gradients to this total norm before the Adam step, as
            ``torch.nn.utils.clip_grad_norm_`` on graph LoRA's parameters: one norm over the factor
            gradients ``g_A``, ``g_B`` of the low-rank matrices and the gradients of the dense
            parameters of every group that sets it (a dense ``p.grad`` is scaled in place);
            ``None`` (default) does not clip. ``Trainer``'s and ``clip_grad_norm_``'s clip of the
            full ``G`` is not the same (see ``docs/interop.md``).
        loraplus_lr_ratio: LoRA+ (``peft.optimizers.create_loraplus_optimizer``): ``A`` (PEFT's
            ``lora_B``) learns at ``lr × ratio``, ``B`` and dense parameters at ``lr``.
        use_rslora: rsLoRA scaling, ``s = alpha / √rank`` (PEFT's ``use_rslora=True``).
        keep_initial_factors: keep copies of the initial factors when their product is non-zero
            (``init="symmetric"``, :meth:`set_factors`), so that :meth:`weight_change_factors`
            and :meth:`initial_factors` are known exactly (adapter export, unmerge;
            :mod:`lora_optim.initial_factors`); costs ``r·(out+in)`` numbers per matrix.
        **projection_options: options of the projections, e.g. ``init="symmetric"``,
            ``"pissa"``, ``"minor"`` or ``"gradient"`` and ``svd_niter`` (``lora``),
            ``resample_every=1`` and ``moment_rule="keep"`` (``random``), ``refresh_every``
            (``svd``). An option must belong to the projection of at least one group.

    Values are normalised when validated (NumPy scalars become ``int``/``float``), so the
    optimizer state always loads with ``torch.load(..., weights_only=True)``.

    Example::

        opt = LoRAAdam(model.parameters(), rank=8, lr=1e-3)
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    """

    # GradScaler passes its scale and found_inf to step() instead of unscaling p.grad itself,
    # which is the only way the per-layer and activation-side sums can be unscaled.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
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
        divergence_threshold: float | None = DEFAULT_DIVERGENCE_THRESHOLD,
        update_scale: str = "plain",
        preserve_sparsity: bool = False,
        max_grad_norm: float | None = None,
        loraplus_lr_ratio: float = 1.0,
        use_rslora: bool = False,
        keep_initial_factors: bool = False,
        **projection_options: Any,
    ) -> None:
        check_option_names(projection_options, where="LoRAAdam")
        common = dict(lr=lr, rank=rank, alpha=alpha, projection=projection, betas=betas, eps=eps,
                      weight_decay=weight_decay, seed=seed, precision=precision, nonfinite=nonfinite,
                      drift_probes=drift_probes, divergence_threshold=divergence_threshold, update_scale=update_scale,
                      preserve_sparsity=preserve_sparsity, max_grad_norm=max_grad_norm,
                      loraplus_lr_ratio=loraplus_lr_ratio, use_rslora=use_rslora,
                      keep_initial_factors=keep_initial_factors)
        common = {name: COMMON_OPTIONS[name].validate(value) for name, value in common.items()}
        declared = registered_projection_options()
        projection_options = {name: declared[name][0].validate(value) for name, value in projection_options.items()}
        self._grad_modes: OrderedDict[int, GradMode] = OrderedDict()  # weak-referenceable, for the handles
        self._index: dict[int, tuple[int, int, int]] = {}
        self._steps_called = 0  # host count of eager step() calls: when the divergence guard reads its values
        self._divergence_warned: set[str] = set()
        self._step_sizes_pending: PendingStepSizes | None = None  # a guard read on its way to the host
        # Skip counts already reported by a warning, by id of the count tensor (a cache of what the
        # host has read: not state).
        self._skips_seen: dict[int, int] = {}
        # Whether init_state() made the state of every parameter (step() then makes none).
        self._state_made = False
        super().__init__(params, {**all_option_defaults(), **common, **projection_options})
        used = {option.name for group in self.param_groups for option in get_projection(group["projection"]).options}
        unused = sorted(set(projection_options) - used)
        if unused:
            owners = {name: list(declared[name][1]) for name in unused}
            raise ValueError(
                f"Invalid option(s) {unused}: options of projection(s) {owners}, and no param group uses them "
                f"(projections in use: {sorted({group['projection'] for group in self.param_groups})})"
            )

    # ------------------------------------------------------------------ groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, validated against the option table (:mod:`lora_optim.option_table`).

        Raises ``TypeError``/``ValueError`` naming the option or parameter for a bad group, an
        unknown key, or an option of a projection the group does not use; the optimizer (and
        the dict passed in) are then left as they were.
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a param group must have a 'params' entry")
        explicit = set(param_group) - {"params"}
        known = set(COMMON_OPTIONS) | set(registered_projection_options())
        unknown = sorted(explicit - known)
        if unknown:
            raise ValueError(f"Invalid param group: unknown key(s) {unknown}; the options are {sorted(known)}")
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs; use a list instead")
        else:
            params = list(params)
        if not params:
            raise ValueError("a param group has no params ('params' is empty)")
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"Invalid params: LoRAAdam can only optimize Tensors, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(
                    f"Invalid params: LoRAAdam trains real floating-point parameters; got one of shape "
                    f"{tuple(p.shape)} and dtype {p.dtype}"
                )
            for index, group in enumerate(self.param_groups):
                if any(q is p for q in group["params"]):
                    raise ValueError(
                        f"Invalid params: a parameter of shape {tuple(p.shape)} appears in more than one parameter "
                        f"group (already in group {index})"
                    )
        param_group["params"] = params
        self.__dict__["_state_made"] = False  # the new parameters have none yet
        super().add_param_group(param_group)
        try:
            validate_group(self.param_groups[-1], explicit)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._index.clear()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_grad_modes", OrderedDict())
        self.__dict__.setdefault("_index", {})
        self.__dict__.setdefault("_steps_called", 0)
        self.__dict__.setdefault("_divergence_warned", set())
        self.__dict__.setdefault("_step_sizes_pending", None)
        self.__dict__.setdefault("_skips_seen", {})
        self.__dict__.setdefault("_state_made", False)
        # Back-fill options added after a checkpoint was written.
        for group in self.param_groups:
            for name, option in COMMON_OPTIONS.items():
                group.setdefault(name, self.defaults.get(name, option.default))
            for option in get_projection(group["projection"]).options:
                group.setdefault(option.name, self.defaults.get(option.name, option.default))

    # ------------------------------------------------------------------ parameters

    def _locate(self, p: Tensor) -> tuple[int, int, int]:
        """``(group index, index in the group, index in the optimizer)`` of ``p``."""
        found = self._index.get(id(p))
        if found is not None:
            group_index, position, _ = found
            params = self.param_groups[group_index]["params"] if group_index < len(self.param_groups) else ()
            if position < len(params) and params[position] is p:
                return found
        self._index.clear()
        index = 0
        for group_index, group in enumerate(self.param_groups):
            for position, q in enumerate(group["params"]):
                self._index[id(q)] = (group_index, position, index)
                index += 1
        found = self._index.get(id(p))
        if found is None or self.param_groups[found[0]]["params"][found[1]] is not p:
            raise ValueError(f"the tensor of shape {tuple(p.shape)} is not a parameter of this optimizer")
        return found

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return self.param_groups[self._locate(p)[0]]

    def _name(self, p: Tensor) -> str:
        group_index, _, index = self._locate(p)
        return f"parameter {index} (group {group_index}, shape {tuple(p.shape)})"

    @staticmethod
    def _trains_low_rank(p: Tensor, group: Mapping[str, Any]) -> bool:
        return group["rank"] is not None and p.ndim >= 2 and p.numel() > 0

    def is_low_rank(self, p: Tensor) -> bool:
        """Whether parameter ``p`` is trained through factors (a matrix with no zero-size dim in a
        group with a rank), rather than by plain AdamW. ``ValueError`` if ``p`` is not ours."""
        return self._trains_low_rank(p, self._group_of(p))

    def _state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        """The state of ``p``, created at first use (as normal tensors, even inside
        ``torch.inference_mode()``, so later steps can update them).

        For a weight sharded by rows (FSDP2) the state is made for the whole weight (one
        all-gather of it, on every rank: creating the state is collective there) and its
        row-shaped tensors are then sharded like the weight (:mod:`lora_optim.distributed`).
        """
        state = self.state[p]
        if state:
            return state
        with torch.inference_mode(False), torch.no_grad():
            fresh: dict[str, Any] = {STEP: torch.zeros((), dtype=torch.float32, device=p.device),
                                     NONFINITE_SKIPS: torch.zeros((), dtype=torch.int64, device=p.device)}
            if not self._trains_low_rank(p, group):
                fresh[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                shard = row_shard(p)
                projection = get_projection(group["projection"])
                if shard is not None:
                    self._check_shardable(p, group, projection)
                out_features, in_features = matrix_shape(p.shape)
                rank = min(group["rank"], out_features, in_features)
                dtype = factor_dtype(p.dtype)
                seed = derive_seed(group["seed"], self._locate(p)[2])
                shapes = {"A": (out_features, rank), "B": (rank, in_features)}
                fresh.update({RANK: rank, SEED: seed})
                for factor, keys in MOMENT_KEYS.items():
                    for key in keys:
                        fresh[key] = torch.zeros(shapes[factor], dtype=dtype, device=p.device)
                whole = p.full_tensor() if shard is not None else p
                weight = as_matrix(whole.detach())
                fresh.update(projection.init_state(weight, rank, seed, dtype, group))
                fresh.update(get_writer(self._precision(p, group)).init_state(weight, seed))
                if group["preserve_sparsity"]:  # the mask M = [W0 != 0] (lora_optim.sparsity)
                    fresh.update(init_sparsity_state(weight))
                if group["drift_probes"]:
                    fresh.update(init_drift_state(weight, group["drift_probes"], seed))
                if shard is not None:
                    shard_rows_(fresh, ROW_SHARDED_KEYS + projection.row_sharded_keys, shard)
                if group["divergence_threshold"] is not None:  # of this rank's rows on a shard
                    fresh.update(init_step_size_state(as_matrix(local(p).detach()), projection, rank, dtype))
        state.update(fresh)
        return state

    def _check_shardable(self, p: Tensor, group: Mapping[str, Any], projection: Projection) -> None:
        """``ValueError`` for what has no row-sharded form (yet), before any state exists."""
        if not projection.supports_row_sharding:
            raise ValueError(f"{self._name(p)} is sharded by rows (FSDP2), and projection {group['projection']!r} "
                             "does not support row-sharded weights (Projection.supports_row_sharding)")
        if group["drift_probes"]:
            raise ValueError(f"{self._name(p)} is sharded by rows (FSDP2): the drift check (drift_probes) is not "
                             "available on sharded weights; use drift_probes=0")
        if group.get("moment_rule") == "transport":
            raise ValueError(f"{self._name(p)} is sharded by rows (FSDP2): moment_rule='transport' needs sums over "
                             "the rows of A at every redraw; use 'keep' or 'reset'")
        if group.get("init") == "gradient":
            raise ValueError(f"{self._name(p)} is sharded by rows (FSDP2): init='gradient' needs the SVD of the whole "
                             "first gradient, which no rank holds; use another init")

    @staticmethod
    def _precision(p: Tensor, group: Mapping[str, Any]) -> str:
        return group["precision"] if group["precision"] is not None else default_precision(p.dtype)

    @staticmethod
    def _scale(group: Mapping[str, Any], p: Tensor) -> float:
        """``s`` of the low-rank parameter ``p`` in ``group``: ``alpha / rank`` (``/ √rank`` with
        ``use_rslora``), times ``c_P`` of its matrix shape with ``update_scale="matched"``
        (:mod:`lora_optim.update_scale`; global shape, effective rank ``min(rank, out, in)``)."""
        alpha = group["alpha"] if group["alpha"] is not None else group["rank"]
        if group.get("use_rslora", False):
            scale = float(alpha) / math.sqrt(group["rank"])
        else:
            scale = float(alpha) / group["rank"]
        if group.get("update_scale", "plain") == "matched":
            out_features, in_features = matrix_shape(tuple(p.shape))
            rank = min(group["rank"], out_features, in_features)
            scale *= update_multiplier(get_projection(group["projection"]), out_features, in_features, rank)
        return scale

    @staticmethod
    def _hyper(group: Mapping[str, Any]) -> engine.AdamHyper:
        beta1, beta2 = group["betas"]
        return engine.AdamHyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                weight_decay=group["weight_decay"])

    # ------------------------------------------------------------------ gradient modes

    def register_grad_mode(self, mode: GradMode) -> RemovableHandle:
        """Register a gradient mode (:class:`~lora_optim.grad_mode.GradMode`): ``step()`` calls its
        ``before_step()`` and ``zero_grad()`` its ``after_zero_grad(set_to_none)``. Returns a
        handle whose ``remove()`` unregisters it."""
        if not isinstance(mode, GradMode):
            raise TypeError(f"a grad mode needs before_step() and after_zero_grad(set_to_none); got {mode!r}")
        handle = RemovableHandle(self._grad_modes)
        self._grad_modes[handle.id] = mode
        return handle

    @property
    def grad_modes(self) -> tuple[GradMode, ...]:
        """The registered gradient modes, in registration order."""
        return tuple(self._grad_modes.values())

    def _low_rank_target(self, p: Tensor, what: str) -> tuple[dict[str, Any], dict[str, Any], Projection]:
        group = self._group_of(p)
        if not self._trains_low_rank(p, group):
            raise ValueError(f"{what}: {self._name(p)} is trained by plain AdamW (rank=None, ndim < 2 or a zero-size "
                             "dim); its gradient belongs in p.grad")
        return group, self._state(p, group), get_projection(group["projection"])

    @torch.no_grad()
    def accumulate_grad_(self, p: Tensor, grad: Tensor) -> None:
        """Project one piece of ``p``'s gradient now and add it to ``p``'s projected-gradient sums,
        as autograd would add it to ``p.grad``; ``grad`` may be freed right after.

        The next ``step()`` steps ``p`` with the sums (exact: projections are linear and the
        factors do not change before the step; :mod:`lora_optim.accumulation`). ``grad`` is not
        changed. This is the per-layer mode's entry point (:mod:`lora_optim.per_layer`); any hook
        may call it. ``ValueError`` if ``p`` is trained densely; ``TypeError`` for a sparse
        ``grad``.
        """
        group, state, projection = self._low_rank_target(p, "accumulate_grad_")
        if tuple(grad.shape) != tuple(p.shape):
            raise ValueError(f"accumulate_grad_: {self._name(p)} got a gradient of shape {tuple(grad.shape)}")
        accumulation.add_piece_(state, *engine.project_piece(projection, state, group, grad))

    @torch.no_grad()
    def accumulate_activation_grad_(self, p: Tensor, inputs: Tensor, output_grads: Tensor) -> None:
        """Add the factor gradients of one use of a linear layer with weight ``p`` to ``p``'s
        projected-gradient sums, from its input ``X`` (``...×in``) and output gradient ``δY``
        (``...×out``), without forming ``G = δYᵀX`` (:mod:`lora_optim.activation`)."""
        group, state, projection = self._low_rank_target(p, "accumulate_activation_grad_")
        out_features, in_features = matrix_shape(p.shape)
        if inputs.shape[-1] != in_features or output_grads.shape[-1] != out_features:
            raise ValueError(
                f"accumulate_activation_grad_: {self._name(p)} expects inputs (..., {in_features}) and output "
                f"gradients (..., {out_features}); got {tuple(inputs.shape)} and {tuple(output_grads.shape)}"
            )
        # On a weight sharded by rows (FSDP2) this rank's batch touches every row: whole factors.
        view = WholeState(state) if row_shard(p) is not None else state
        accumulation.add_piece_(state, *engine.project_activation_piece(projection, view, group, inputs, output_grads))

    @torch.no_grad()
    def reduce_projected_grads_(self, params: Iterable[Tensor], group: Any = None) -> None:
        """Average the projected-gradient sums of ``params`` over the ranks of ``group`` (the
        default process group if ``None``), in place, in one all-reduce: what DDP does to ``p.grad``,
        for the factor gradients the activation-side mode forms locally (``r·(out+in)`` values per
        matrix instead of ``out·in``).

        Collective: every rank calls it with the same ``params`` in the same order. A parameter
        with sums on some ranks only gets the average with zeros from the others (as DDP averages
        with the zero gradients of ranks that did not use a parameter); one with sums on no rank is
        left without. Called by the activation-side mode at the start of ``step()``.
        """
        world = torch.distributed.get_world_size(group)
        entries = []
        for p in params:
            _, state, _ = self._low_rank_target(p, "reduce_projected_grads_")
            sums = accumulation.open_sums(state)
            had_sums = sums is not None
            if sums is None:  # whole-weight shapes, also for a sharded weight (its sums are whole)
                moment_A, moment_B = state[MOMENT_KEYS["A"][0]], state[MOMENT_KEYS["B"][0]]
                sums = (torch.zeros(moment_A.shape, dtype=moment_A.dtype, device=local(moment_A).device),
                        torch.zeros(moment_B.shape, dtype=moment_B.dtype, device=local(moment_B).device))
            present = torch.full((), float(had_sums), dtype=sums[0].dtype, device=sums[0].device)
            entries.append((state, sums, present))
        tensors = [t for _, sums, present in entries for t in (*sums, present.reshape(1))]
        if not tensors:
            return
        all_reduce_sum_(tensors, group)
        counts = torch.stack([present for _, _, present in entries]).to("cpu", copy=True).tolist()
        for (state, sums, _), count in zip(entries, counts):
            if count == 0:
                continue
            sums[0].div_(world)
            sums[1].div_(world)
            if accumulation.open_sums(state) is None:
                state[ACCUMULATED_GRAD_A], state[ACCUMULATED_GRAD_B] = sums
                state[ACCUMULATION] = accumulation.OPEN

    # ------------------------------------------------------------------ stepping

    def _gather(self) -> tuple[list[engine.DenseBatch], list[engine.LowRankBatch], list[dict[str, Any]]]:
        """This step's batches, and the states whose projected sums it uses. Raises ``TypeError``
        for a sparse gradient before creating any state."""
        self._refuse_sparse_grads()
        dense: dict[tuple, engine.DenseBatch] = {}
        lowrank: dict[tuple, engine.LowRankBatch] = {}
        consumed: list[dict[str, Any]] = []
        index = -1
        for group_index, group in enumerate(self.param_groups):
            hyper = self._hyper(group)
            for p in group["params"]:
                index += 1
                existing = self.state.get(p)
                sums = accumulation.open_sums(existing) if existing else None
                if p.grad is None and sums is None:
                    continue
                if is_dtensor(p) and group["max_grad_norm"] is not None:
                    raise ValueError(f"{self._name(p)} is a DTensor (FSDP2): max_grad_norm is not available on sharded "
                                     "parameters yet (the norm would need a sum over the shards); nothing was changed")
                state = self._state(p, group)
                name = f"parameter {index} (group {group_index}, shape {tuple(p.shape)})"
                if not self._trains_low_rank(p, group):
                    param, grad = local(p), local(p.grad)
                    batch = dense.setdefault((group_index, param.device, param.dtype), engine.DenseBatch(
                        hyper, max_grad_norm=group["max_grad_norm"]))
                    batch.params.append(param)
                    batch.grads.append(grad)
                    batch.states.append(LocalState(state) if is_dtensor(p) else state)
                    batch.names.append(name)
                    batch.policies.append(group["nonfinite"])
                    batch.groups.append(p.device_mesh.get_group() if is_dtensor(p) else None)
                    continue
                projection = get_projection(group["projection"])
                if sums is not None:
                    if p.grad is not None:  # a plain backward mixed into an accumulation: one more piece
                        accumulation.add_piece_(state, *engine.project_piece(projection, state, group, p.grad))
                    consumed.append(state)
                shard = row_shard(p)
                view = state if shard is None else LocalState(state, shard)
                if shard is not None and sums is not None:  # whole sums of the activation-side mode
                    rows = slice(shard.row_offset, shard.row_offset + shard.local_rows)
                    sums = (sums[0][rows], sums[1])
                factors = view[MOMENT_KEYS["A"][0]]
                scale = self._scale(group, p)  # per matrix with update_scale="matched": one batch per scale
                key = (group_index, factors.device, factors.dtype, scale)
                batch = lowrank.get(key)
                if batch is None:
                    batch = lowrank[key] = engine.LowRankBatch(
                        projection, group, scale, hyper, max_grad_norm=group["max_grad_norm"],
                        lr_ratio_A=group["loraplus_lr_ratio"])
                batch.items.append(engine.LowRankItem(
                    param=local(p), state=view, name=name, policy=group["nonfinite"],
                    writer=get_writer(self._precision(p, group)),
                    grad=local(p.grad) if sums is None else None, sums=sums,
                    row_offset=0 if shard is None else shard.row_offset,
                    group=None if shard is None else shard.group,
                    partial_B=shard is not None and sums is None,
                ))
        return list(dense.values()), list(lowrank.values()), consumed

    def _refuse_sparse_grads(self) -> None:
        """``TypeError`` for a sparse gradient, before any state is made."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(f"Invalid gradient: LoRAAdam does not support sparse gradients; {self._name(p)} "
                                    f"has a gradient with layout {p.grad.layout}")

    @torch.no_grad()
    def init_state(self) -> None:
        """Make now the state every parameter would get at its first step (the factors, moments,
        counters; a pending gradient init stays pending). ``step()`` makes it lazily, as
        ``torch.optim`` does; make it here first to compile a whole training step (forward,
        backward and ``step()``) with ``fullgraph=True``, whose first call cannot make state
        without a graph break. Parameters that never get a gradient then hold state too."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p, group)
        self._state_made = True

    def _init_group(self, group: dict[str, Any]) -> None:
        """Make the state of every parameter of ``group`` that has a gradient (``p.grad`` or
        projected sums) and none yet. Run before the step's math, as ``torch.optim``'s optimizers
        do, so that a ``torch.compile``d step runs it outside its graph (Dynamo calls
        ``_init_group`` of an optimizer eagerly) and traces a step over existing state."""
        for p in group["params"]:
            existing = self.state.get(p)
            if existing:
                continue
            if p.grad is not None:
                self._state(p, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step of every parameter with a gradient (``p.grad``, or the projected sums of
        the per-layer and activation-side modes); see :mod:`lora_optim.engine`.

        The NaN/Inf decisions stay on the device: no host sync, unless a group has
        ``nonfinite="raise"`` or a projection decides this step on the host (an ``svd`` refresh,
        the first step of ``init="gradient"``). So the step compiles whole (``torch.compile``,
        ``fullgraph=True``) and can be captured in a CUDA graph. Returns the closure's loss, if a
        closure is given (it runs with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for mode in tuple(self._grad_modes.values()):
            mode.before_step()
        # Set by torch.amp.GradScaler.step() for optimizers with _step_supports_amp_scaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._refuse_sparse_grads()
        if not self._state_made:  # init_state() made all of it: nothing to do (and nothing to trace)
            for group in self.param_groups:
                self._init_group(group)
        dense, lowrank, consumed = self._gather()
        if consumed and (hasattr(self, "found_inf") or hasattr(self, "grad_scale")):
            self._check_scaler_sees_something(grad_scale, found_inf, dense)
        report = engine.step_(dense, lowrank, grad_scale=grad_scale,
                              found_inf=found_inf if isinstance(found_inf, Tensor) else None)
        for state in consumed:  # a compiled step keeps the sum tensors: the same ones at every call
            accumulation.consume_(state, keep=torch.compiler.is_compiling())
        self._warn_skips(report)
        self._guard_after_step()
        return loss

    def _warn_skips(self, report: engine.StepReport) -> None:
        """Warn about the parameters this step skipped for a NaN/Inf of their own, where that costs
        no sync: when the step read its flags on the host, or when every skip record lives on the
        CPU (a memory read). Elsewhere (an accelerator, a compiled step) the device counts are read
        later (:meth:`_report_skips`)."""
        if torch.compiler.is_compiling():
            return
        if not report.host_read:
            if not report.records or not all(cpu_paths(r.counted.device) for r in report.records):
                return
            for record in report.records:
                record.host = (bool(record.grad_ok), bool(record.state_ok), int(record.counted))
        for name, state, cause in report.skipped():
            counter = id(state[NONFINITE_SKIPS])
            self._skips_seen[counter] = self._skips_seen.get(counter, 0) + 1
            # Same text every time for a parameter, so the default filter shows it once per
            # parameter; nonfinite_skips() counts them all.
            warn_skipped(f"LoRAAdam skipped a step of {name}: {cause} (count: opt.nonfinite_skips(p))")

    def _guard_after_step(self) -> None:
        """The divergence guard's host side after an eager step (:mod:`lora_optim.divergence`): warn
        from a read of an earlier check step that has reached the host (no wait), and after steps
        1, 2, 4, …, 512 and every 512th start a new read: a memory read where the values live on
        the CPU, else a copy to the host that does not block (pinned memory and an event on CUDA).
        No host sync in any step; nothing inside a compiled step or a CUDA graph capture (the
        loop calls :meth:`check_step_sizes` itself)."""
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return
        self._steps_called += 1
        pending = self._step_sizes_pending
        if pending is not None and pending.finish(self._divergence_warned):
            self._step_sizes_pending = None
        if is_check_step(self._steps_called):
            entries = self._guard_entries()
            if entries:
                started = start_step_size_read(entries)
                self._step_sizes_pending = started if not started.finish(self._divergence_warned) else None

    def _report_skips(self) -> None:
        """Read every skip count (one host read per device) and warn for each parameter skipped
        since the counts were last read: how the skips of steps that read nothing on the host
        (accelerators, compiled steps) are reported."""
        entries = [(index, p, state) for index, (p, state) in enumerate(
            (p, self.state[p]) for group in self.param_groups for p in group["params"] if p in self.state)
            if isinstance(state.get(NONFINITE_SKIPS), Tensor)]
        if not entries:
            return
        per_device: dict[torch.device, list[int]] = {}
        for position, (_, _, state) in enumerate(entries):
            per_device.setdefault(local(state[NONFINITE_SKIPS]).device, []).append(position)
        counts: dict[int, int] = {}
        for positions in per_device.values():
            values = torch.stack([local(entries[i][2][NONFINITE_SKIPS]) for i in positions]).to("cpu", copy=True)
            counts.update(zip(positions, values.tolist()))
        for position, (_, p, state) in enumerate(entries):
            count = counts[position]
            seen = self._skips_seen.get(id(state[NONFINITE_SKIPS]), 0)
            if count > seen:
                warn_skipped(f"LoRAAdam skipped {count - seen} step(s) of {self._name(p)}: its gradient or optimizer "
                             "state had NaN or Inf entries; the weight and its optimizer state were left unchanged "
                             "(count: opt.nonfinite_skips(p))")
            self._skips_seen[id(state[NONFINITE_SKIPS])] = count

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict (``torch.optim.Optimizer.state_dict``), after reporting the
        skips no warning has named yet (one host read of the skip counts) and the divergence
        guard's check still on its way to the host (:meth:`check_step_sizes`, if one is)."""
        self._report_skips()
        if self._step_sizes_pending is not None:
            self.check_step_sizes()
        return super().state_dict()

    @staticmethod
    def _check_scaler_sees_something(grad_scale: Tensor | None, found_inf: Any, dense: list) -> None:
        """Refuse, before anything changes, the two GradScaler uses the projected sums cannot follow."""
        if grad_scale is None:
            raise RuntimeError(
                "GradScaler.unscale_(optimizer) was called, but the per-layer / activation-side projected gradient "
                "sums are not gradients it can unscale, so this step would use scaled sums; nothing was changed. "
                "Do not call scaler.unscale_() with these modes (clip the projected gradients instead, or use bf16 "
                "autocast, which needs no GradScaler)."
            )
        if not isinstance(found_inf, Tensor):
            raise RuntimeError(
                "GradScaler found no gradient to check: every gradient of this step went to the per-layer / "
                "activation-side projected sums, which it cannot see, and GradScaler.update() would fail with 'No "
                "inf checks were recorded'. Nothing was changed. Train at least one parameter densely (a bias, a norm, "
                "a head), or use bf16 autocast, which needs no GradScaler."
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim.Optimizer.zero_grad``, and the projected gradient
        sums of the per-layer and activation-side modes (:mod:`lora_optim.accumulation`): with
        ``set_to_none=False`` a parameter that had a gradient keeps a zero one, and steps."""
        super().zero_grad(set_to_none)
        for state in self.state.values():
            if ACCUMULATION in state:
                (accumulation.clear_ if set_to_none else accumulation.zero_)(state)
        for mode in tuple(self._grad_modes.values()):
            mode.after_zero_grad(set_to_none)

    def enable_per_layer(self):
        """Project each low-rank gradient inside ``backward`` and free it at once
        (:class:`lora_optim.per_layer.PerLayerStep`); returns its handle."""
        from lora_optim.per_layer import PerLayerStep  # the entry point only: the class needs no mode

        return PerLayerStep(self)

    def attach(self, model: torch.nn.Module, process_group: Any = None):
        """Form the factor gradients of ``model``'s ``nn.Linear`` weights from the layers' inputs and
        output gradients (:class:`lora_optim.activation.ActivationSide`); returns its handle.
        ``process_group``: the data-parallel group (default: the default group, if any)."""
        from lora_optim.activation import ActivationSide  # the entry point only: the class needs no mode

        return ActivationSide(self, model, process_group)

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
        group, state, projection = self._low_rank_target(p, "get_factors")
        A, B = projection.current_factors(state, group)
        return A.clone(), B.clone()

    def _new_factors_target(self, p: Tensor, A: Tensor, B: Tensor, what: str
                            ) -> tuple[dict[str, Any], dict[str, Any], Projection]:
        """``(group, state, projection)`` of ``p`` after the checks every factor replacement needs
        (not sharded, no pending pieces, shapes, float dtypes, finite values, a sparsity mask where
        the group asks for one), before anything changes."""
        if is_dtensor(p):
            raise ValueError(f"{what}: {self._name(p)} is sharded (FSDP2); set the factors in one process (load the "
                             "DCP checkpoint there) and reshard, or before wrapping the model")
        group, state, projection = self._low_rank_target(p, what)
        if accumulation.open_sums(state) is not None:
            raise RuntimeError(f"{what}: {self._name(p)} has projected gradient pieces of the coming step, made "
                               f"with the current factors; call {what} before backward or after step()")
        out_features, in_features = matrix_shape(p.shape)
        rank = state[RANK]
        for name, tensor, expected in (("A", A, (out_features, rank)), ("B", B, (rank, in_features))):
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{what}: {name} must have shape {expected} for {self._name(p)}, got {shape}")
            if not tensor.is_floating_point():
                raise TypeError(f"{what}: {name} must be a floating-point tensor for {self._name(p)}, got {tensor.dtype}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{what}: {name} has non-finite entries ({self._name(p)})")
        sparsity_mask(state, group)  # raises now if preserve_sparsity was switched on after the state was made
        return group, state, projection

    def _reset_moments_(self, state: dict[str, Any]) -> None:
        # New factors: the moments and the step count described the old ones.
        for keys in MOMENT_KEYS.values():
            for key in keys:
                state[key].zero_()
        state[STEP].zero_()

    def _write_factor_change_(self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any], projection: Projection,
                              change: FactorChange) -> None:
        """Write ``s·(Δ(A', B') − Δ(A, B))`` of ``change`` into ``W`` as a step does: masked in a
        ``preserve_sparsity`` group, recorded in the drift probes, through the group's write mode."""
        scale = self._scale(group, p)
        mask = sparsity_mask(state, group)
        if DRIFT_CHANGE in state:
            record_drift_step_(state, projection, change, scale, mask)
        with writable_matrix(p) as weight:
            get_writer(self._precision(p, group)).write_(weight, state, weight_delta(projection, change, scale, mask))

    @torch.no_grad()
    def set_factors(self, p: Tensor, A: Tensor, B: Tensor, *, update_weight: bool = False) -> None:
        """Replace the factors of ``p`` by copies of ``A`` (``out×r``) and ``B`` (``r×in``).

        With ``update_weight=False`` (default) ``W`` is not changed: later steps add
        ``s·(A'B' − AB)`` measured from the new factors, and ``W`` as it is becomes the base the
        new factors are measured from (:mod:`lora_optim.initial_factors`). Use it to start from
        factors made elsewhere (e.g. PEFT's init, or an SVD of ``W``).

        With ``update_weight=True`` the factors move and ``W`` moves with them:
        ``W += s·(Δ(A, B) − Δ(A_cur, B_cur)) ⊙ M`` (``M``: the mask of a ``preserve_sparsity``
        group, else all ones), written by the group's write mode (so a bf16 weight with
        ``compensated`` writes keeps its Kahan buffer) and recorded in the drift probes, as a
        step is; the base stays what it was. This unmerges (``A``, ``B`` = :meth:`initial_factors`);
        to put ``W`` at ``W_base + s·A·B`` whatever the current change (load an adapter, switch
        tasks) use :meth:`merge_factors`.

        The factors' Adam moments and step count are reset to zero: they described the old
        factors. ``r`` must equal the parameter's effective rank ``min(rank, out, in)``; ``A`` and
        ``B`` must be finite. Raises ``RuntimeError`` while projected gradient pieces of the coming
        step are summed (they were formed with the old factors): call it before ``backward`` or
        after ``step()``. Every check runs before anything changes.
        """
        group, state, projection = self._new_factors_target(p, A, B, "set_factors")
        if not isinstance(update_weight, bool):
            raise TypeError(f"set_factors: update_weight must be True or False, got {update_weight!r}")
        moment = state[MOMENT_KEYS["A"][0]]
        with torch.inference_mode(False):
            if update_weight:
                old_A, old_B = (t.clone() for t in projection.current_factors(state, group))
            projection.set_factors_(state, A.to(device=moment.device, dtype=moment.dtype),
                                    B.to(device=moment.device, dtype=moment.dtype), group)
            self._reset_moments_(state)
            if not update_weight:
                projection.record_base_(state, group)
                return
            new_A, new_B = projection.current_factors(state, group)
            if not (torch.equal(old_A, new_A) and torch.equal(old_B, new_B)):
                initial_factors.moved_(state)  # W moves without a step
            change = FactorChange(old_A, old_B, new_A, new_B, new_A - old_A, new_B - old_B)
        # Outside inference_mode(False), which turns grad mode back on: the write is in place on W.
        self._write_factor_change_(p, group, state, projection, change)

    @torch.no_grad()
    def merge_factors(self, p: Tensor, A: Tensor, B: Tensor) -> None:
        """Put ``W`` at ``W_base + (s·A·B) ⊙ M`` exactly, whatever it learnt so far, and continue
        from the factors ``(A, B)``: the merge of a LoRA adapter (``A``, ``B`` = PEFT's ``lora_B``,
        ``lora_A``) on a fresh or a trained optimizer (task switching). ``M`` is the mask of a
        ``preserve_sparsity`` group (else all ones).

        With the current change ``s·L·R`` (:meth:`learnt_change`; ``k`` columns, ``k ≥ r``) one write
        adds ``(s·(A·B − L·R)) ⊙ M``: the ``lora`` write of the factor step from ``(L, R)`` to
        ``(A, B)`` padded with zeros to ``k``, through the group's write mode and the drift probes.
        Afterwards the base excludes a zero product (:data:`~lora_optim.initial_factors.ZERO`), so
        :meth:`weight_change_factors` is ``(A, B)`` and :meth:`initial_factors` is ``(0, B)``
        whatever the init was; the moments and step count restart at zero.

        Only for ``projection="lora"`` groups. Raises ``ValueError`` naming the parameter, the
        projection and the init when the current change is unknown (a non-zero initial product
        without ``keep_initial_factors=True`` after ``W`` has moved), and otherwise as
        :meth:`set_factors`; every check runs before anything changes.
        """
        group, state, projection = self._new_factors_target(p, A, B, "merge_factors")
        if group["projection"] != "lora":
            raise ValueError(f"merge_factors: {self._name(p)} is trained with projection {group['projection']!r}; "
                             "an adapter's factors (W = W_base + s·A·B) continue as projection='lora'")
        current = learnt_change_of(projection, state, group, self._scale(group, p))
        if current.factors is None:
            raise ValueError(f"merge_factors: the change of {self._name(p)} since its base is unknown, so W cannot be "
                             f"set to W_base + s·A·B: {current.unknown}")
        L, R = current.factors
        moment = state[MOMENT_KEYS["A"][0]]
        with torch.inference_mode(False):
            new_A = torch.zeros_like(L)
            new_B = torch.zeros_like(R)
            rank = A.shape[1]
            new_A[:, :rank] = A.to(device=moment.device, dtype=moment.dtype)
            new_B[:rank] = B.to(device=moment.device, dtype=moment.dtype)
            change = FactorChange(L, R, new_A, new_B, new_A - L, new_B - R)
            projection.set_factors_(state, new_A[:, :rank], new_B[:rank], group)
            self._reset_moments_(state)
            stored_A, stored_B = projection.current_factors(state, group)
            initial_factors.record_(state, stored_A, stored_B, zero=True, keep=False)
        self._write_factor_change_(p, group, state, projection, change)

    def factor_scale(self, p: Tensor) -> float:
        """The scale ``s`` of the low-rank parameter ``p``: ``alpha / rank``, or ``alpha / √rank``
        with ``use_rslora`` (``rank`` as configured, even where a small matrix clips it), times
        ``c_P`` of ``p``'s shape in a group with ``update_scale="matched"``
        (:mod:`lora_optim.update_scale`). ``ValueError`` for a densely trained parameter."""
        group = self._group_of(p)
        if not self._trains_low_rank(p, group):
            raise ValueError(f"factor_scale: {self._name(p)} is trained by plain AdamW; it has no factors")
        return self._scale(group, p)

    def learnt_change(self, p: Tensor) -> LearntChange:
        """``W − W_base`` of the low-rank parameter ``p``: ``(s·L·R) ⊙ M`` with its factors, mask and
        initial factors, or unknown (:class:`~lora_optim.learnt_change.LearntChange`). What every
        consumer of the change asks for: adapter export, unmerge, adapter load, task switching.
        Creates the state if ``p`` has not been stepped. ``ValueError`` for densely trained
        parameters."""
        group, state, projection = self._low_rank_target(p, "learnt_change")
        return learnt_change_of(projection, state, group, self._scale(group, p))

    def initial_factors(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Copies of factors ``(A₀, B₀)`` whose change equals the base's (:mod:`lora_optim.initial_factors`):
        ``set_factors(p, A₀, B₀, update_weight=True)`` puts ``W`` back to its base (unmerge; masked
        in a ``preserve_sparsity`` group, as every write).

        ``None`` when they are unknown: an init with a non-zero ``A₀·B₀`` (or a :meth:`set_factors`
        with two non-zero factors) in a group without ``keep_initial_factors=True``, once ``W`` has
        moved, or a projection whose change is not a function of the factors (``random``,
        ``svd``). Creates the state if ``p`` has not been stepped. ``ValueError`` for densely
        trained parameters.
        """
        return self.learnt_change(p).initial

    def weight_change_factors(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(L, R)`` with ``W = W_base + s·L·R`` exactly (``s`` = :meth:`factor_scale`), or ``None``
        when the change is unknown or not of that form: see :meth:`initial_factors`, and a
        ``preserve_sparsity`` group whose mask has zeros, whose change ``(s·L·R) ⊙ M`` is not a
        product (:meth:`learnt_change` has it).

        ``lora`` with PEFT's init: ``(A, B)``, rank ``r``; with kept non-zero initial factors:
        ``([A, −A₀], [B; B₀])``, rank ``2r``; ``additive``: ``([A, E_r], [E_c; B])``, rank
        ``2r``. The base is the weight when the factors were made or last set with
        ``update_weight=False``.
        """
        change = self.learnt_change(p)
        return change.factors if change.low_rank else None

    def has_pending_pieces(self, p: Tensor) -> bool:
        """Whether projected gradient pieces of the coming step are summed for ``p`` (the per-layer
        or activation-side modes, between ``backward`` and ``step()``): they were made with the
        current factors, so nothing may move the factors until the step. ``ValueError`` if ``p``
        is not ours."""
        self._locate(p)
        state = self.state.get(p)
        return bool(state) and accumulation.open_sums(state) is not None

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
        if not self._trains_low_rank(p, group):
            raise ValueError(f"drift: {self._name(p)} is trained by plain AdamW; it has no drift probe")
        if not group["drift_probes"]:
            raise ValueError(
                f"drift probes are off for the group of the parameter of shape {tuple(p.shape)} "
                f"(drift_probes={group['drift_probes']!r}); construct with drift_probes=k, k >= 1"
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
            if self._trains_low_rank(p, group) and group["drift_probes"]
        }

    def _guarded(self) -> list[tuple[int, Tensor, dict[str, Any]]]:
        """``(index, p, group)`` of every low-rank parameter with guard state."""
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        return [(index, p, group) for index, (p, group) in enumerate(params)
                if self._trains_low_rank(p, group) and STEP_SIZE_REFERENCE in self.state.get(p, {})]

    def step_size_report(self) -> dict[int, StepSizeReport]:
        """The divergence guard's values (:mod:`lora_optim.divergence`) of every low-rank parameter
        that has them, keyed by the parameter's index in the optimizer: the largest and the latest
        relative step ``s·‖ΔW‖/‖W₀‖`` and the group's ``divergence_threshold``. One host read per
        parameter."""
        return {index: step_size_report(self.state[p], group["divergence_threshold"])
                for index, p, group in self._guarded()}

    def _guard_entries(self) -> list[tuple[str, dict[str, Any], float]]:
        return [(self._name(p), self.state[p], group["divergence_threshold"])
                for _, p, group in self._guarded() if group["divergence_threshold"] is not None]

    def check_step_sizes(self) -> list[str]:
        """Read the divergence guard's largest relative steps now (one host read per device: a sync
        on an accelerator) and warn (:class:`~lora_optim.divergence.DivergenceWarning`, once per
        parameter) for those above their group's ``divergence_threshold``; returns their names.

        ``step()`` checks by itself without a sync (after steps 1, 2, 4, …, 512 and every 512th it
        starts a copy to the host that does not block, and warns at a later step once the copy
        has landed; on the CPU at once), except inside ``torch.compile`` or a CUDA graph: a
        compiled training loop calls this itself, outside the compiled function."""
        self._step_sizes_pending = None  # superseded by this read
        return check_step_sizes(self._guard_entries(), self._divergence_warned)

    def nonfinite_skips(self, p: Tensor | None = None) -> int:
        """Steps skipped because of a NaN/Inf gradient or state: for parameter ``p``, or in total.
        The counts are 0-dim int64 tensors in the optimizer state (``"nonfinite_skips"``, advanced
        on the device), so they checkpoint; reading them is a host read, which also issues the
        warnings of skips not reported yet (:mod:`lora_optim.nonfinite`)."""
        if p is not None:
            self._locate(p)  # ValueError if p is not ours
        self._report_skips()
        if p is not None:
            return int(self.state[p].get(NONFINITE_SKIPS, 0)) if p in self.state else 0
        return sum(int(state.get(NONFINITE_SKIPS, 0)) for state in self.state.values())

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict`.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
        parameter's dtype; that would round fp32 factors and moments of a bf16 weight to bf16.
        Here every state tensor keeps the dtype it was saved with (and is copied, so the loaded
        optimizer never shares storage with ``state_dict``); ints (seeds, draw counters) load
        exactly, and an int step count from an older checkpoint becomes the tensor a step reads.

        Before anything changes, the state dict is checked against this optimizer
        (:func:`lora_optim.checkpoint.check_loadable`): a checkpoint made with another rank,
        projection, precision, ``drift_probes`` or parameter shapes raises ``ValueError`` naming
        the parameter (index, group, shape) and the mismatch, and leaves the optimizer as it was.
        Other options (``lr``, ``betas``, ...) come from the checkpoint, as in ``torch.optim``.
        """
        check_loadable(self.param_groups, state_dict, self._trains_low_rank)
        self._state_made = False  # a parameter without state in the checkpoint has none now
        saved_state = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        # Structural options were checked to agree (resolved for each weight); keep this
        # optimizer's own spelling (precision="compensated" for a checkpoint's None).
        structural = [{name: group[name] for name in STRUCTURAL_OPTIONS if name in group} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, structural):
            group.update(options)
        self._index.clear()
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for pid, (p, group) in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            state = self.state[p]
            for key, value in saved_state[pid].items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, copy=True)
            # Counters a step advances on the device are 0-dim int64 tensors; older checkpoints hold ints.
            counters = [NONFINITE_SKIPS]
            if self._trains_low_rank(p, group):
                counters += [*get_projection(group["projection"]).counter_keys,
                             *get_writer(self._precision(p, group)).counter_keys]
            for key in counters:
                value = state.get(key, 0 if key == NONFINITE_SKIPS else None)
                if value is not None and not isinstance(value, Tensor):
                    state[key] = torch.tensor(int(value), dtype=torch.int64, device=local(p).device)
            self._skips_seen[id(state[NONFINITE_SKIPS])] = int(state[NONFINITE_SKIPS])
            step = state.get(STEP)
            if step is not None and not isinstance(step, Tensor):
                state[STEP] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            elif isinstance(step, Tensor):
                state[STEP] = step.to(dtype=torch.float32)
            group = self._group_of(p)
            if (group["divergence_threshold"] is not None and self._trains_low_rank(p, group)
                    and STEP_SIZE_REFERENCE not in state and RANK in state and row_shard(p) is None):
                # A checkpoint without the divergence guard's state: measured from the weight as loaded.
                state.update(init_step_size_state(as_matrix(p.detach()), get_projection(group["projection"]),
                                                  state[RANK], state[MOMENT_KEYS["A"][0]].dtype))
            if "accumulated_pieces" in state:  # the format before the accumulation status
                pieces = state.pop("accumulated_pieces")
                if pieces and ACCUMULATED_GRAD_A in state:
                    state[ACCUMULATION] = accumulation.OPEN
                else:
                    accumulation.clear_(state)
