"""The table of param-group options, and the validation of a group against it.

:data:`COMMON_OPTIONS` are the options of every group (the keyword arguments of
:class:`~lora_optim.LoRAAdam`); each registered projection adds its own
(:attr:`Projection.options <lora_optim.projections.Projection.options>`). A group is validated
as a whole by :func:`validate_group`, which also normalises values (NumPy scalars become plain
numbers) and refuses what would otherwise be ignored silently: unknown keys, and options of a
projection the group does not use. The structural options (``structural=True``) are the ones a
checkpoint must match (:mod:`lora_optim.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lora_optim.divergence import DEFAULT_DIVERGENCE_THRESHOLD
from lora_optim.nonfinite import NONFINITE_POLICIES
from lora_optim.options import Option, beta_pair, boolean, choice, integer, learning_rate, optional, real
from lora_optim.precision import available_writers
from lora_optim.projections import available_projections, get_projection, projection_options
from lora_optim.update_scale import UPDATE_SCALES, declares_first_step

__all__ = ["COMMON_OPTIONS", "STRUCTURAL_OPTIONS", "all_option_defaults", "validate_group", "check_option_names"]

#: Options of every group, in the order of :class:`~lora_optim.LoRAAdam`'s signature.
COMMON_OPTIONS: Mapping[str, Option] = {
    option.name: option
    for option in (
        Option("lr", 1e-3, learning_rate, doc="learning rate"),
        Option("rank", 8, optional(integer(1)), structural=True, doc="factor rank r, or None for plain AdamW"),
        Option("alpha", None, optional(real(0.0, inclusive=False)), doc="scale numerator: s = alpha / rank"),
        Option("projection", "lora", choice(available_projections), structural=True,
               doc="name of a registered projection"),
        Option("betas", (0.9, 0.999), beta_pair, doc="Adam's (beta1, beta2)"),
        Option("eps", 1e-8, real(0.0, inclusive=False), doc="added to the root of the second moment"),
        Option("weight_decay", 0.0, real(0.0), doc="decoupled weight decay"),
        Option("seed", 0, integer(0), doc="int seed of every random draw"),
        Option("precision", None, optional(choice(available_writers)), structural=True,
               doc="write mode into W; None picks one by the weight's dtype"),
        Option("nonfinite", "skip", choice(NONFINITE_POLICIES), doc="what a NaN/Inf gradient does"),
        Option("drift_probes", 0, integer(0), structural=True, doc="probe vectors of the drift check (0: off)"),
        # issue 19 (lora_optim.divergence): warn when a step moves a weight by more than this share of its norm.
        Option("divergence_threshold", DEFAULT_DIVERGENCE_THRESHOLD, optional(real(0.0, inclusive=False)),
               doc="warn when a step's s·‖ΔW‖/‖W₀‖ exceeds this (None: no guard, no state)"),
        # issue 19 (lora_optim.update_scale): one lr for every projection.
        Option("update_scale", "plain", choice(UPDATE_SCALES),
               doc="'matched': s times c_P, so that the first step's expected ‖ΔW‖ equals lora's"),
        # issue 11 (lora_optim.sparsity): keep every zero of W exactly zero (a stored mask in the state).
        Option("preserve_sparsity", False, boolean, structural=True,
               doc="keep the zeros of W exactly zero: W = W0 + s·ΔW ⊙ [W0 != 0] (LoRS)"),
        # --- interop with PEFT (lora_optim.interop, docs/interop.md) ---
        Option("max_grad_norm", None, optional(real(0.0, inclusive=False)),
               doc="clip the factor and dense gradients of the groups that set it to this total norm"),
        Option("loraplus_lr_ratio", 1.0, real(0.0, inclusive=False),
               doc="LoRA+: lr of A (PEFT's lora_B) = lr x ratio; B and dense parameters keep lr"),
        Option("use_rslora", False, boolean, doc="rsLoRA scaling: s = alpha / sqrt(rank) instead of alpha / rank"),
        Option("keep_initial_factors", False, boolean,
               doc="keep copies of initial factors whose product is non-zero (exact export and unmerge)"),
    )
}

#: Names of the common options a checkpoint must match.
STRUCTURAL_OPTIONS = tuple(name for name, option in COMMON_OPTIONS.items() if option.structural)


def all_option_defaults() -> dict[str, Any]:
    """Every option (common and of every registered projection) with its default."""
    defaults = {name: option.default for name, option in COMMON_OPTIONS.items()}
    defaults.update({name: option.default for name, (option, _) in projection_options().items()})
    return defaults


def check_option_names(names: Iterable[str], *, where: str) -> None:
    """``TypeError`` if a name is neither a common option nor an option of a registered projection."""
    known = set(COMMON_OPTIONS) | set(projection_options())
    unknown = sorted(set(names) - known - {"params"})
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}; the options are {sorted(known)}")


def validate_group(group: dict[str, Any], explicit: Iterable[str]) -> None:
    """Validate and normalise the options of ``group`` in place.

    ``group`` has every common option and the options of its projection (torch's
    ``add_param_group`` fills in the defaults); options of other projections are removed from it,
    so a group lists only what applies to it. ``explicit`` names the keys the user wrote in the
    group dict: an explicit option of another projection raises ``ValueError`` instead of being
    ignored. Raises before changing ``group`` if anything is wrong.
    """
    normalised: dict[str, Any] = {}
    for name, option in COMMON_OPTIONS.items():
        normalised[name] = option.validate(group[name])
    projection = get_projection(normalised["projection"])
    own = {option.name: option for option in projection.options}
    others = projection_options()
    for name in explicit:
        if name in others and name not in own:
            raise ValueError(
                f"Invalid option {name}={group[name]!r}: it is an option of projection(s) {list(others[name][1])}, and this "
                f"group uses projection {normalised['projection']!r} (its options: {sorted(own) or 'none'})"
            )
    for name, option in own.items():
        normalised[name] = option.validate(group.get(name, option.default))
    if normalised["update_scale"] == "matched" and not declares_first_step(projection):
        raise ValueError(f"Invalid option update_scale='matched' for projection {projection.name!r}: it does not derive "
                         "its first step (Projection.first_step_norm_sq); use update_scale='plain'")
    projection.validate_options({**group, **normalised})
    for name in others:
        if name not in own:
            group.pop(name, None)
    group.update(normalised)
