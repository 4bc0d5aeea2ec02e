"""Checks that an optimizer state dict fits the optimizer it is loaded into.

``torch.optim.Optimizer.load_state_dict`` matches saved state to parameters by position and
checks only the number of groups and of parameters per group. A checkpoint made with another
rank, projection, write mode or model shape would then load silently and fail (or train
something else) later. :func:`check_loadable` compares the state dict with the optimizer
*before* anything is changed and raises a ``ValueError`` naming the parameter (its index in
the optimizer, its group, its shape) and the mismatch.

What must match: the group structure; per group the options that decide the layout of the
state (``rank``, ``projection``, ``precision`` resolved for the weight's dtype,
``drift_probes``); per parameter the shapes of the saved moments, factors and weight-shaped
buffers. Every other option (``lr``, ``betas``, ``resample_every``, ...) comes from the
checkpoint, as in ``torch.optim``.

``precision=None`` in a checkpoint means the default write mode *of the version that wrote it*
(``compensated`` for bf16/fp16 weights before 0.2, ``stochastic`` since), so a saved parameter's
mode is read from its state: a Kahan buffer means ``compensated``, a rounding seed
``stochastic``, neither ``nearest``. A checkpoint of an older bf16 run then loads only into an
optimizer that asks for its mode (``precision="compensated"``), which resumes it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from lora_optim.matrix import matrix_shape
from lora_optim.option_table import COMMON_OPTIONS, STRUCTURAL_OPTIONS
from lora_optim.precision import default_precision, get_writer
from lora_optim.state_keys import (
    DRIFT_KEYS,
    EXP_AVG,
    EXP_AVG_SQ,
    MOMENT_KEYS,
    RANK,
    ROUNDING_SEED,
    WEIGHT_COMPENSATION,
)

__all__ = ["check_loadable"]

# What a checkpoint that predates a structural option implies for it.
_MISSING = {"rank": None, "projection": None, "precision": None, "drift_probes": 0}


def _resolved(option: str, value: Any, p: Tensor) -> Any:
    return default_precision(p.dtype) if option == "precision" and value is None else value


def _saved_precision(value: Any, state: Mapping[str, Any] | None, p: Tensor) -> Any:
    """The write mode a checkpoint's parameter was trained with (see the module docstring)."""
    if value is not None or state is None or MOMENT_KEYS["A"][0] not in state:
        return _resolved("precision", value, p)
    if WEIGHT_COMPENSATION in state:
        return "compensated"
    return "stochastic" if ROUNDING_SEED in state else "nearest"


def check_loadable(
    param_groups: list[dict[str, Any]], state_dict: Mapping[str, Any], is_low_rank: Callable[[Tensor, Mapping], bool]
) -> None:
    """Raise ``ValueError`` if ``state_dict`` does not fit ``param_groups``; change nothing.

    ``is_low_rank(p, group)`` says whether ``p`` is trained through factors in ``group``.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a mapping with keys 'state' and 'param_groups' (from LoRAAdam.state_dict())")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"cannot load optimizer state: the state dict has {len(saved_groups)} param group(s), "
            f"the optimizer {len(param_groups)}"
        )
    index = 0
    for group_index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        params = group["params"]
        if len(saved["params"]) != len(params):
            raise ValueError(
                f"cannot load optimizer state: group {group_index} has {len(saved['params'])} parameter(s) in the "
                f"state dict and {len(params)} in the optimizer (shapes {[tuple(p.shape) for p in params]})"
            )
        for pid, p in zip(saved["params"], params):
            where = f"parameter {index} (group {group_index}, shape {tuple(p.shape)})"
            for option in STRUCTURAL_OPTIONS:
                missing = _MISSING.get(option, COMMON_OPTIONS[option].default)
                if option == "precision":
                    was = _saved_precision(saved.get(option, missing), saved_state.get(pid), p)
                else:
                    was = _resolved(option, saved.get(option, missing), p)
                now = _resolved(option, group.get(option, missing), p)
                if was != now:
                    hint = (f"; pass precision={was!r} to resume it (the default for {p.dtype} weights is now "
                            f"{default_precision(p.dtype)!r})" if option == "precision" and saved.get(option) is None
                            else "")
                    raise ValueError(
                        f"cannot load optimizer state: {where}: {option} was {was!r} in the checkpoint, "
                        f"the optimizer has {now!r}{hint}"
                    )
            if pid in saved_state:
                _check_param_state(where, p, group, saved_state[pid], is_low_rank(p, group))
            index += 1


def _check_param_state(where: str, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any],
                       low_rank: bool) -> None:
    saved_low_rank = MOMENT_KEYS["A"][0] in state
    if saved_low_rank != low_rank:
        kind = {True: "low-rank factors", False: "plain AdamW moments"}
        raise ValueError(
            f"cannot load optimizer state: {where}: the checkpoint holds {kind[saved_low_rank]}, "
            f"the optimizer trains it with {kind[low_rank]}"
        )
    if not low_rank:
        expected = {EXP_AVG: tuple(p.shape), EXP_AVG_SQ: tuple(p.shape)}
    else:
        out_features, in_features = matrix_shape(p.shape)
        rank = min(group["rank"], out_features, in_features)
        if state.get(RANK) != rank:
            raise ValueError(
                f"cannot load optimizer state: {where}: the checkpoint has factors of rank {state.get(RANK)!r}, "
                f"the optimizer expects rank {rank} (rank={group['rank']}, clipped to min(out, in))"
            )
        shapes = {"A": (out_features, rank), "B": (rank, in_features)}
        expected = {key: shapes[factor] for factor, keys in MOMENT_KEYS.items() for key in keys}
        expected.update({factor: shape for factor, shape in shapes.items() if factor in state})
        precision = _resolved("precision", group["precision"], p)
        expected.update({key: (out_features, in_features) for key in get_writer(precision).weight_shaped_keys})
        probes = group.get("drift_probes", 0)
        if probes:
            expected.update(zip(DRIFT_KEYS, ((in_features, probes), (out_features, probes), (out_features, probes))))
    for key, shape in expected.items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise ValueError(f"cannot load optimizer state: {where}: the checkpoint has no tensor {key!r}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"cannot load optimizer state: {where}: {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                f"expected {shape}"
            )
