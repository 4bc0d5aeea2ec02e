"""PEFT's rules for finding the modules a LoRA config names, and keys that name exactly one module.

PEFT (0.21, as pinned in ``constraints.txt``; ``tests/test_peft_patterns.py`` checks this mirror
against PEFT's own functions, so a PEFT that reads names otherwise fails there) reads a config's
module names by four rules, with ``key`` a module's full name in ``model.named_modules()``:

* ``target_modules`` as a list adapts ``key`` when ``key == t`` or ``key`` ends with ``"." + t``
  for some entry ``t``; as a string, when ``re.fullmatch(t, key)`` (:func:`is_target`);
* ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in the dict's order) with
  ``re.match(rf"(.*\\.)?({k})$", key)`` gives the module its value (:func:`pattern_value`);
* ``modules_to_save``: ``key`` is saved whole when it ends with an entry ``m`` as a plain string
  (:func:`is_saved`), and no module matching ``re.match(rf"(^|.*\\.){m}($|\\..*)", key)`` is
  adapted (:func:`is_kept_from_adapters`).

So a full module name is not an exact key: in ``nn.Sequential(nn.Linear, nn.Sequential(nn.Linear))``
the names are ``0`` and ``1.0``, and ``0`` matches both under the first two rules; ``head`` matches
``lm_head`` under the third. The exported config therefore uses :func:`exact_pattern` (``^`` and
the escaped name: the optional prefix ``(.*\\.)?`` can then only be empty) for the patterns,
:func:`target_modules_for` (the list of names where it is exact, else one ``fullmatch``
alternation of the escaped names), and :func:`check_config` verifies, before anything is
written, that under these rules PEFT adapts exactly the intended modules with their ranks and
alphas and saves exactly the intended modules whole; a ``modules_to_save`` entry that cannot be
made exact (a plain suffix has no anchor) raises ``ValueError`` naming both modules.

``^`` with the full name is PEFT's own advice for a key that names one module (its pull request
2419, 2025); PEFT releases from before that rule, whose pattern match has no optional prefix
group, match no anchored key, so an adapter with per-module ranks or alphas needs a PEFT with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "exact_pattern",
    "pattern_value",
    "is_target",
    "is_saved",
    "is_kept_from_adapters",
    "target_modules_for",
    "check_config",
]


def exact_pattern(module_name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches the module ``module_name`` and no
    other under PEFT's rule: ``^`` followed by the escaped name."""
    return "^" + re.escape(module_name)


def pattern_value(patterns: Mapping[str, Any] | None, module_name: str, default: Any) -> Any:
    """The value PEFT gives ``module_name`` from ``patterns`` (``rank_pattern`` or
    ``alpha_pattern``): that of the first key matching by ``(.*\\.)?(key)$``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def is_target(target_modules: Sequence[str] | str, module_name: str) -> bool:
    """Whether PEFT's ``target_modules`` (a list of names or one regular expression) adapts
    ``module_name``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return module_name in target_modules or any(module_name.endswith(f".{t}") for t in target_modules)


def is_saved(modules_to_save: Sequence[str], module_name: str) -> bool:
    """Whether PEFT saves ``module_name`` whole for ``modules_to_save`` (a plain suffix match)."""
    return any(module_name.endswith(m) for m in modules_to_save)


def is_kept_from_adapters(modules_to_save: Sequence[str], module_name: str) -> bool:
    """Whether PEFT refuses to adapt ``module_name`` because of ``modules_to_save`` (the module, or
    one inside it, by PEFT's regular expression with the entry unescaped)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in modules_to_save)


def target_modules_for(targets: Sequence[str], module_names: Iterable[str]) -> list[str] | str:
    """PEFT's ``target_modules`` for adapting exactly ``targets`` among ``module_names`` (every
    module of the model): the list of names where that is exact, else one regular expression
    that ``re.fullmatch`` reads as exactly these names."""
    wanted = set(targets)
    listed = sorted(wanted)
    if all(is_target(listed, name) == (name in wanted) for name in module_names):
        return listed
    return "|".join(f"(?:{re.escape(name)})" for name in listed)


def check_config(module_names: Iterable[str], target_modules: Sequence[str] | str,
                 ranks: Mapping[str, int], alphas: Mapping[str, float], r: int, lora_alpha: float,
                 rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float],
                 modules_to_save: Sequence[str], where: str) -> None:
    """``ValueError`` (prefixed by ``where``) naming the first module that PEFT, reading this
    config by the rules of the module docstring, would adapt when it should not, not adapt when it
    should, give another rank or alpha than ``ranks`` / ``alphas`` (``{module: value}`` of the
    adapted modules), or save whole when it should not."""
    names = list(module_names)
    saved = set(modules_to_save)
    for name in names:
        if is_saved(modules_to_save, name) and name not in saved:
            entry = next(m for m in modules_to_save if name.endswith(m))
            raise ValueError(
                f"{where}: PEFT matches modules_to_save by the end of module names, so saving the module {entry!r} "
                f"whole would also replace {name!r} (its name ends with {entry!r}) and there is no way to name "
                f"{entry!r} alone; rename one of the modules, or train {entry!r} as low-rank weights"
            )
    for name in names:
        if name in ranks and is_kept_from_adapters(modules_to_save, name):
            entry = next(m for m in modules_to_save if is_kept_from_adapters([m], name))
            raise ValueError(f"{where}: PEFT adapts no module that its modules_to_save entry {entry!r} matches (read "
                             f"as a regular expression, with the modules inside it), and {name!r} is one: rename one "
                             "of the modules, or train them both as low-rank weights")
        adapted = is_target(target_modules, name) and not is_kept_from_adapters(modules_to_save, name)
        if adapted != (name in ranks):
            raise ValueError(f"{where}: PEFT would {'adapt' if adapted else 'not adapt'} the module {name!r} under this "
                             f"config (target_modules={target_modules!r}, modules_to_save={list(modules_to_save)!r})")
        if name in ranks:
            got = (pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, lora_alpha))
            if got != (ranks[name], alphas[name]):
                raise ValueError(f"{where}: PEFT would give the module {name!r} rank {got[0]} and alpha {got[1]} "
                                 f"instead of {ranks[name]} and {alphas[name]}")
