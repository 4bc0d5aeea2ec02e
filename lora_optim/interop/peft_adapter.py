"""PEFT adapters out of and into a :class:`~lora_optim.LoRAAdam` run.

A run of the optimizer leaves its result in the weights: ``W = W_base + (s·L·R) ⊙ M`` for every
low-rank weight (:mod:`lora_optim.learnt_change`; ``M`` is the mask of a ``preserve_sparsity``
group, all ones otherwise). :func:`export_peft_adapter` writes that change as a directory
``peft.PeftModel.from_pretrained(base_model, path)`` loads (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names), and :func:`load_peft_adapter` merges a PEFT
adapter into the weights and continues from its factors. Both ask the optimizer for the change
(:meth:`LoRAAdam.learnt_change <lora_optim.LoRAAdam.learnt_change>`) and nothing else.

Export, per low-rank weight (the routes of :mod:`lora_optim.interop.svd`):

* **exact**: the change is known and unmasked, ``s·L·R``: ``lora`` with a zero initial product
  writes ``(A, B)`` (rank ``r``), with kept non-zero initial factors ``([A, −A₀], [B; B₀])``
  (rank ``2r``), ``additive`` its exact rank-``2r`` form. PEFT's ``lora_B``/``lora_A`` are our
  ``A``/``B`` unchanged and ``lora_alpha`` is chosen so that PEFT's scaling is our ``s``
  (``alpha = s·k``, or ``s·√k`` with ``use_rslora``): PEFT continues the same parametrisation.
* **truncated**: with ``rank=`` or ``energy=``, a product wider than asked is cut to its best
  approximation (an SVD of the ``k×k`` core; no base weights needed).
* **masked**: a ``preserve_sparsity=True`` group whose base had zeros: the known change
  ``(s·L·R) ⊙ M`` is not a low-rank product, so it is formed and truncated by an SVD to ``rank``
  (default: the group's; ``min(out, in)`` is exact) or to an ``energy`` share; no base weights
  needed.
* **svd**: the change is unknown (``random`` and ``svd``, whose change sums every draw or basis;
  an init with a non-zero ``A₀·B₀`` whose factors were not kept, once trained):
  ``ΔW = W − W₀`` with ``W₀`` from ``base=`` (the base model, or a state dict of it:
  ``{name: tensor}`` as ``model.state_dict()`` names them; keep it on the CPU or on disk, the
  optimizer keeps no copy of ``W₀``), truncated to ``rank`` (default: the group's) or to an
  ``energy`` share. Without ``base=`` such a weight raises ``ValueError`` naming it, its
  projection and init; nothing is written then.

The report (:class:`AdapterExport`) gives each module's route, rank and the share of
``‖ΔW‖_F²`` it keeps (``1.0`` for exact factors).

The config names every module exactly under PEFT's matching rules (:mod:`lora_optim.interop.patterns`:
anchored ``rank_pattern``/``alpha_pattern`` keys, ``target_modules`` as one expression where a
list of names would match more modules); where no config can (a ``modules_to_save`` entry that
is the end of another module's name) it raises ``ValueError`` naming both modules, before
anything is written.

Densely trained parameters are saved as PEFT saves them: the bias of an adapted layer with
``bias="lora_only"``, any other module holding a trained parameter as ``modules_to_save`` (PEFT
then replaces the whole module by the saved copy). A trained parameter PEFT cannot express
raises ``ValueError`` naming it (:mod:`lora_optim.interop.layers`); nothing is written then.

PEFT is needed (``pip install peft``): the config is written with ``peft.LoraConfig``, so its
fields are those of the installed version.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_optim.distributed import is_dtensor
from lora_optim.interop.layers import ADAPTER_PREFIX, PeftLayer, peft_layer
from lora_optim.interop.patterns import check_config, exact_pattern, pattern_value, target_modules_for
from lora_optim.interop.svd import SVD_METHODS, Truncation, truncate_dense, truncate_product
from lora_optim.learnt_change import masked_share
from lora_optim.matrix import as_matrix
from lora_optim.optimizer import LoRAAdam
from lora_optim.precision import factor_dtype

__all__ = [
    "ModuleExport",
    "AdapterExport",
    "AdapterImport",
    "export_peft_adapter",
    "load_peft_adapter",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SAVE_DTYPES",
]

#: PEFT's file names.
CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
#: dtypes an adapter can be saved in (``dtype=``).
SAVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModuleExport:
    """How one module's weight change was written.

    Attributes:
        module: the module's name (PEFT's target).
        route: ``"exact"`` (the optimizer's factors), ``"truncated"`` (an SVD of them),
            ``"masked"`` (an SVD of the masked change ``(s·L·R) ⊙ M`` of a ``preserve_sparsity``
            group) or ``"svd"`` (an SVD of ``W − W₀``).
        rank: the adapter's rank for this module.
        alpha: the ``lora_alpha`` written for it (PEFT's scaling is ``alpha / rank``, or
            ``alpha / √rank`` with ``use_rslora``; it equals the optimizer's ``s``).
        kept: the share of ``‖ΔW‖_F²`` the adapter keeps (``1.0`` when exact).
    """

    module: str
    route: str
    rank: int
    alpha: float
    kept: float


@dataclass(frozen=True)
class AdapterExport:
    """What :func:`export_peft_adapter` wrote.

    Attributes:
        path: the adapter directory.
        modules: one :class:`ModuleExport` per adapted module, in model order.
        modules_to_save: modules saved whole (their trained dense parameters).
        bias: PEFT's ``bias`` setting written (``"none"`` or ``"lora_only"``).
        use_rslora: PEFT's ``use_rslora`` setting written.
    """

    path: Path
    modules: tuple[ModuleExport, ...]
    modules_to_save: tuple[str, ...]
    bias: str
    use_rslora: bool

    @property
    def min_kept(self) -> float:
        """The smallest kept share over the modules (``1.0`` when every module is exact)."""
        return min((module.kept for module in self.modules), default=1.0)


@dataclass(frozen=True)
class AdapterImport:
    """What :func:`load_peft_adapter` did.

    Attributes:
        modules: the modules whose factors were taken from the adapter (and merged into ``W``).
        copied: the parameters copied from the adapter (``modules_to_save``, biases).
        kept: per module of ``modules``, the share of the adapter's change ``‖s·lora_B·lora_A‖_F²``
            merged: ``1.0``, except in a ``preserve_sparsity=True`` group, which merges the masked
            change ``(s·lora_B·lora_A) ⊙ M`` (:func:`lora_optim.learnt_change.masked_share`).
    """

    modules: tuple[str, ...]
    copied: tuple[str, ...]
    kept: tuple[float, ...] = ()

    @property
    def min_kept(self) -> float:
        """The smallest kept share over the modules (``1.0`` when every module merged all of it)."""
        return min(self.kept, default=1.0)


# ----------------------------------------------------------------------------- model structure


@dataclass(frozen=True)
class _Owner:
    module_name: str
    module: nn.Module
    parameter_name: str
    parent: nn.Module | None

    @property
    def full_name(self) -> str:
        return f"{self.module_name}.{self.parameter_name}" if self.module_name else self.parameter_name


def _owners(model: nn.Module) -> dict[int, list[_Owner]]:
    """``id(parameter) -> every (module, attribute) that holds it`` (shared and tied ones repeat)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    found: dict[int, list[_Owner]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        parent = modules.get(name.rpartition(".")[0]) if name else None
        for parameter_name, parameter in module.named_parameters(recurse=False):
            found.setdefault(id(parameter), []).append(_Owner(name, module, parameter_name, parent))
    return found


def _single_owner(owners: dict[int, list[_Owner]], p: Tensor, what: str) -> _Owner:
    held = owners.get(id(p))
    if not held:
        raise ValueError(f"{what}: the optimizer trains a parameter of shape {tuple(p.shape)} that is not in the "
                         "model; pass the model that holds every trained parameter")
    if len({owner.full_name for owner in held}) > 1:
        names = sorted({owner.full_name for owner in held})
        raise ValueError(f"{what}: {names[0]} is shared with {names[1:]}; PEFT adapts one module at a time, so a "
                         "shared (tied) trained parameter cannot be written as an adapter")
    return held[0]


def _groups_by_param(optimizer: LoRAAdam) -> dict[int, Mapping[str, Any]]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _check_optimizer(optimizer: Any, what: str) -> None:
    if not isinstance(optimizer, LoRAAdam):
        raise TypeError(f"{what} expects a lora_optim.LoRAAdam, got {type(optimizer).__name__}")
    if any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(f"{what}: the model is sharded (FSDP2 DTensor parameters); save a DCP checkpoint, load it "
                         "into the unsharded model and optimizer in one process, and run it there")


def _require_peft(what: str):
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is a dev/examples dependency
        raise ImportError(f"{what} needs PEFT: pip install peft") from error
    return peft


def _scale_alpha(scale: float, rank: int, rslora: bool) -> float:
    """The ``lora_alpha`` that gives PEFT's scaling ``s`` at ``rank``."""
    return scale * (math.sqrt(rank) if rslora else rank)


# ----------------------------------------------------------------------------- export


@torch.no_grad()
def export_peft_adapter(
    model: nn.Module,
    optimizer: LoRAAdam,
    path: str | os.PathLike[str],
    *,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    svd: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
) -> AdapterExport:
    """Write the optimizer's change of ``model`` as a PEFT LoRA adapter directory (module docstring).

    Args:
        model: the trained model (every parameter the optimizer trained must be in it).
        optimizer: the :class:`~lora_optim.LoRAAdam` that trained it.
        path: the directory to write (created; existing adapter files are overwritten).
        base: the base weights ``W₀`` (an ``nn.Module`` like ``model`` before training, or a
            mapping from parameter names to tensors), needed only for weights whose change is
            unknown (``random``, ``svd``, unknown initial factors).
        rank: the largest rank to write per module; wider changes are truncated by SVD. For
            the ``masked`` and ``svd`` routes the default is the group's ``rank``.
        energy: instead of ``rank``, keep the smallest rank whose share of ``‖ΔW‖_F²`` reaches
            this value (in ``(0, 1]``).
        svd: ``"auto"``, ``"exact"`` or ``"lowrank"`` for the SVD of ``W − W₀``
            (:func:`~lora_optim.interop.svd.truncate_dense`).
        dtype: save the tensors in this dtype (e.g. ``torch.bfloat16``); default: the factors'
            dtype (fp32 for bf16/fp16 weights).
        seed: int seed of the randomised SVD.
        base_model_name_or_path: written into the config for PEFT's bookkeeping.

    Returns:
        An :class:`AdapterExport` (per module: route, rank, alpha and kept share).

    Raises:
        ValueError: a trained parameter PEFT cannot express, a weight whose change needs
            ``base`` when none is given, a missing base weight, module names PEFT would read
            as other modules too, bad arguments; nothing is written then.
        TypeError: ``optimizer`` is not a ``LoRAAdam``; ``dtype`` is not a torch float dtype.
    """
    _check_optimizer(optimizer, "export_peft_adapter")
    if rank is not None and energy is not None:
        raise ValueError(f"export_peft_adapter: give rank or energy, not both (rank={rank!r}, energy={energy!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"export_peft_adapter: rank must be an int >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < energy <= 1.0):
        raise ValueError(f"export_peft_adapter: energy must be a number in (0, 1], got {energy!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"export_peft_adapter: svd must be one of {SVD_METHODS}, got {svd!r}")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise TypeError(f"export_peft_adapter: dtype must be one of {SAVE_DTYPES}, got {dtype!r}")
    peft = _require_peft("export_peft_adapter")
    base_weights = _base_weights(base)

    owners = _owners(model)
    groups = _groups_by_param(optimizer)
    trained = [p for group in optimizer.param_groups for p in group["params"] if p in optimizer.state]
    low_rank: list[tuple[Tensor, _Owner, PeftLayer]] = []
    dense: list[tuple[Tensor, _Owner]] = []
    for p in trained:
        owner = _single_owner(owners, p, "export_peft_adapter")
        if optimizer.is_low_rank(p):
            low_rank.append((p, owner, peft_layer(owner.module_name, owner.module, owner.parameter_name,
                                                  owner.parent)))
        else:
            dense.append((p, owner))
    if not low_rank:
        raise ValueError("export_peft_adapter: the optimizer has trained no low-rank weight of this model, so there "
                         "is no LoRA adapter to write")
    targets = {layer.module_name for _, _, layer in low_rank}
    bias, modules_to_save = _dense_plan(dense, targets)

    rslora_flags = {bool(groups[id(p)].get("use_rslora", False)) for p, _, _ in low_rank}
    use_rslora = rslora_flags == {True}
    tensors: dict[str, Tensor] = {}
    reports: list[ModuleExport] = []
    for p, owner, layer in low_rank:
        scale = optimizer.factor_scale(p)
        L, R, route, kept = _module_factors(p, owner, optimizer, groups[id(p)], scale, base_weights,
                                            rank=rank, energy=energy, svd=svd, seed=seed)
        tensors.update(layer.to_peft(L, R))
        reports.append(ModuleExport(layer.module_name, route, L.shape[1], _scale_alpha(scale, L.shape[1], use_rslora),
                                    kept))
    modules = dict(model.named_modules())
    for module_name in modules_to_save:  # as PEFT saves them: the module's whole state dict
        for key, value in modules[module_name].state_dict().items():
            tensors[f"{ADAPTER_PREFIX}{module_name}.{key}"] = value.detach()
    if bias == "lora_only":  # PEFT saves the bias of every adapted layer that has one
        for name in sorted(targets):
            layer_bias = getattr(modules[name], "bias", None)
            if isinstance(layer_bias, Tensor):
                tensors[f"{ADAPTER_PREFIX}{name}.base_layer.bias"] = layer_bias.detach()

    config = _config(peft, model, reports, sorted(modules_to_save), bias, use_rslora, base_model_name_or_path)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    _save_tensors(tensors, directory / WEIGHTS_NAME, dtype)
    return AdapterExport(directory, tuple(reports), tuple(sorted(modules_to_save)), bias, use_rslora)


def _base_weights(base: nn.Module | Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
    if base is None:
        return None
    if isinstance(base, nn.Module):
        return dict(base.named_parameters(remove_duplicate=False))
    if isinstance(base, Mapping):
        return base
    raise TypeError(f"export_peft_adapter: base must be an nn.Module or a mapping of names to tensors, got "
                    f"{type(base).__name__}")


def _dense_plan(dense: list[tuple[Tensor, _Owner]], targets: set[str]) -> tuple[str, list[str]]:
    """PEFT's ``bias`` setting and ``modules_to_save`` for the densely trained parameters."""
    bias = "none"
    modules_to_save: set[str] = set()
    for _, owner in dense:
        if owner.module_name in targets:
            if owner.parameter_name != "bias":
                raise ValueError(
                    f"export_peft_adapter: {owner.full_name} is trained densely in a layer whose weight is an adapter; "
                    "PEFT can save such a layer's bias (bias='lora_only') but no other parameter of it"
                )
            bias = "lora_only"
            continue
        if not owner.module_name:
            raise ValueError(f"export_peft_adapter: {owner.full_name} belongs to the root module; PEFT saves trained "
                             "parameters as whole named submodules (modules_to_save)")
        modules_to_save.add(owner.module_name)
    for name in sorted(modules_to_save):
        inside = sorted(t for t in targets if t.startswith(name + "."))
        if inside:
            raise ValueError(
                f"export_peft_adapter: the module {name!r} holds a densely trained parameter and also adapted layers "
                f"({inside[:3]}...); PEFT would save it whole (modules_to_save) and lose their adapters"
            )
    return bias, sorted(modules_to_save)


def _module_factors(
    p: Tensor, owner: _Owner, optimizer: LoRAAdam, group: Mapping[str, Any], scale: float,
    base_weights: Mapping[str, Tensor] | None, *, rank: int | None, energy: float | None, svd: str, seed: int,
) -> tuple[Tensor, Tensor, str, float]:
    """``(L, R, route, kept)`` with ``s·L·R`` the module's exported change (the routes of the module
    docstring, from :meth:`LoRAAdam.learnt_change <lora_optim.LoRAAdam.learnt_change>`)."""
    change = optimizer.learnt_change(p)
    target_rank = rank if rank is not None else (group["rank"] if energy is None else None)
    if change.low_rank:
        L, R = change.factors
        if (rank is None or L.shape[1] <= rank) and (energy is None or energy >= 1.0):
            return L, R, "exact", 1.0
        cut = truncate_product(L, R, rank=rank, energy=energy)
        return cut.L, cut.R, "truncated", cut.kept
    if change.known:  # preserve_sparsity: (s·L·R) ⊙ M has no low-rank form; no base weights needed
        cut = truncate_dense(change.masked_product(), rank=target_rank, energy=energy, method=svd, seed=seed)
        return cut.L, cut.R, "masked", cut.kept
    if base_weights is None:
        raise ValueError(
            f"export_peft_adapter: the change of {owner.full_name} is not known from the optimizer state "
            f"({change.unknown}); pass base= (the base model or its state dict) to export it by an SVD of W - W0"
        )
    initial = base_weights.get(owner.full_name)
    if not isinstance(initial, Tensor) or tuple(initial.shape) != tuple(p.shape):
        got = "missing" if initial is None else f"shape {tuple(getattr(initial, 'shape', ()))}"
        raise ValueError(f"export_peft_adapter: base has no weight {owner.full_name!r} of shape {tuple(p.shape)} "
                         f"({got})")
    compute = factor_dtype(p.dtype)
    delta = as_matrix(p.detach()).to(compute) - as_matrix(initial.detach()).to(device=p.device, dtype=compute)
    cut: Truncation = truncate_dense(delta / scale, rank=target_rank, energy=energy, method=svd, seed=seed)
    return cut.L, cut.R, "svd", cut.kept


def _config(peft, model: nn.Module, reports: list[ModuleExport], modules_to_save: list[str], bias: str,
            use_rslora: bool, base_model_name_or_path: str | None):
    """PEFT's ``LoraConfig`` for ``reports``, with keys that match exactly the intended modules of
    ``model`` under PEFT's rules (:mod:`lora_optim.interop.patterns`); ``ValueError`` where that is
    impossible."""
    ranks = Counter(report.rank for report in reports)
    common_rank = max(ranks, key=lambda r: (ranks[r], -r))
    alphas = Counter(report.alpha for report in reports)
    common_alpha = max(alphas, key=lambda a: (alphas[a], -a))
    module_names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    target_modules = target_modules_for([report.module for report in reports], module_names)
    rank_pattern = {exact_pattern(report.module): report.rank for report in reports if report.rank != common_rank}
    alpha_pattern = {exact_pattern(report.module): report.alpha for report in reports if report.alpha != common_alpha}
    check_config(module_names, target_modules, {report.module: report.rank for report in reports},
                 {report.module: report.alpha for report in reports}, common_rank, common_alpha, rank_pattern,
                 alpha_pattern, modules_to_save, where="export_peft_adapter")
    return peft.LoraConfig(
        r=common_rank,
        lora_alpha=common_alpha,
        target_modules=target_modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias=bias,
        modules_to_save=modules_to_save or None,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )


def _save_tensors(tensors: Mapping[str, Tensor], file: Path, dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    ready = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        ready[key] = value.contiguous().clone()
    save_file(ready, str(file), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- import


@torch.no_grad()
def load_peft_adapter(model: nn.Module, optimizer: LoRAAdam, path: str | os.PathLike[str]) -> AdapterImport:
    """Merge a PEFT LoRA adapter into ``model`` and continue training from its factors.

    For every adapted module, with PEFT's ``lora_A``, ``lora_B`` and scaling ``s``, the weight
    becomes ``W_base + s·lora_B·lora_A`` exactly, whatever the optimizer's init and whatever it
    has learnt so far, and the optimizer's factors become ``A = lora_B``, ``B = lora_A``
    (:meth:`LoRAAdam.merge_factors <lora_optim.LoRAAdam.merge_factors>`: one write through the
    group's write mode; the base stays what it was, so a later :func:`export_peft_adapter` writes
    the continued run against the same base weights). On a fresh optimizer this is a plain merge;
    on a trained one the current change is replaced by the adapter's (task switching). In a
    ``preserve_sparsity=True`` group the masked change ``(s·lora_B·lora_A) ⊙ M`` is merged, so
    every zero of the weight stays zero (LoRS's parametrisation, which training then continues),
    and the report gives the share of ``‖s·lora_B·lora_A‖_F²`` kept. The factors' Adam moments
    start from zero: a PEFT adapter file holds no optimizer state. Parameters the adapter holds
    whole (``modules_to_save``, biases) are copied into ``model``.

    Each adapted weight must be a low-rank parameter of ``optimizer`` in a ``projection="lora"``
    group whose effective rank equals the adapter's rank and whose scale ``s`` (:meth:`LoRAAdam.factor_scale
    <lora_optim.LoRAAdam.factor_scale>`) equals the adapter's ``lora_alpha / r`` (``/ √r`` with
    ``use_rslora``; ``alpha_pattern`` read as PEFT reads it), and whose current change is known
    (:meth:`LoRAAdam.learnt_change <lora_optim.LoRAAdam.learnt_change>`: a trained optimizer with a
    non-zero initial product needs ``keep_initial_factors=True``). Every tensor must fit its
    parameter, be of a float dtype and finite. Everything is checked, for every module, before
    anything changes; a mismatch raises ``ValueError`` naming the module. Between ``backward``
    and ``step()`` in the per-layer or activation-side modes (projected pieces made with the
    current factors are pending) it raises ``RuntimeError``, also before changing anything.

    Returns:
        An :class:`AdapterImport` naming what was merged (with the kept shares) and copied.
    """
    _check_optimizer(optimizer, "load_peft_adapter")
    directory = Path(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"load_peft_adapter: no {CONFIG_NAME} in {str(directory)!r}")
    config = json.loads(config_file.read_text())
    _check_config(config)
    tensors = _load_tensors(directory)

    owners = _owners(model)
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    groups = _groups_by_param(optimizer)
    factor_keys = re.compile(r"^(?P<module>.+)\.(?:lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
    adapted: dict[str, PeftLayer] = {}
    copies: dict[str, str] = {}  # parameter name -> adapter key
    for key in tensors:
        if not key.startswith(ADAPTER_PREFIX):
            raise ValueError(f"load_peft_adapter: unexpected key {key!r} (PEFT keys start with {ADAPTER_PREFIX!r})")
        name = key[len(ADAPTER_PREFIX):]
        match = factor_keys.match(name)
        if match:
            module_name = match["module"]
            module = modules.get(module_name)
            if module is None or not isinstance(getattr(module, "weight", None), Tensor):
                raise ValueError(f"load_peft_adapter: the adapter adapts {module_name!r}, which the model does not "
                                 "have")
            owner = _single_owner(owners, module.weight, "load_peft_adapter")
            adapted[module_name] = peft_layer(owner.module_name, owner.module, owner.parameter_name, owner.parent)
            continue
        parameter_name = name.replace(".base_layer.", ".")
        if parameter_name not in parameters:
            raise ValueError(f"load_peft_adapter: the adapter holds {name!r}, which the model does not have")
        if tuple(parameters[parameter_name].shape) != tuple(tensors[key].shape):
            shape = tuple(parameters[parameter_name].shape)
            raise ValueError(f"load_peft_adapter: {parameter_name!r} has shape {shape} in the model and "
                             f"{tuple(tensors[key].shape)} in the adapter")
        _check_values(tensors[key], f"{parameter_name!r} (adapter key {key!r})")
        copies[parameter_name] = key

    merges: list[tuple[str, Tensor, Tensor, Tensor, float]] = []
    for module_name, layer in adapted.items():
        key_A, key_B = layer.keys
        if key_A not in tensors or key_B not in tensors:
            raise ValueError(f"load_peft_adapter: the adapter has only one of {key_A!r} and {key_B!r}")
        where = f"{module_name}.weight"
        for key in (key_A, key_B):
            _check_values(tensors[key], f"{where} (adapter key {key!r})")
        try:
            L, R = layer.from_peft(tensors[key_A], tensors[key_B])
        except ValueError as error:
            raise ValueError(f"load_peft_adapter: {error}") from None
        p = modules[module_name].weight
        group = groups.get(id(p))
        if group is None or not optimizer.is_low_rank(p):
            raise ValueError(f"load_peft_adapter: {where} is not a low-rank parameter of the optimizer")
        if group["projection"] != "lora":
            raise ValueError(f"load_peft_adapter: {where} is trained with projection {group['projection']!r}; a PEFT "
                             "adapter continues as projection='lora'")
        out_features, in_features = as_matrix(p.detach()).shape
        expected = min(group["rank"], out_features, in_features)
        if L.shape[1] != expected:
            raise ValueError(f"load_peft_adapter: {where} has rank {L.shape[1]} in the adapter and {expected} in the "
                             f"optimizer (rank={group['rank']})")
        adapter_scale = _adapter_scale(config, module_name, L.shape[1])
        ours = optimizer.factor_scale(p)
        if not math.isclose(adapter_scale, ours, rel_tol=1e-9):
            raise ValueError(
                f"load_peft_adapter: {where}: the adapter's scaling is {adapter_scale!r} (lora_alpha/r"
                f"{'**0.5' if config.get('use_rslora') else ''}), the optimizer's s is {ours!r}; construct the "
                "optimizer with the adapter's alpha (and use_rslora) so that training continues the same run"
            )
        if optimizer.has_pending_pieces(p):
            raise RuntimeError(f"load_peft_adapter: {where} has projected gradient pieces of a coming step (per-layer "
                               "or activation-side mode); nothing was changed. Load the adapter before backward or "
                               "after step()")
        current = optimizer.learnt_change(p)
        if not current.known:
            raise ValueError(f"load_peft_adapter: {where}: the optimizer's change since the base is unknown, so the "
                             f"adapter cannot be merged exactly ({current.unknown}); nothing was changed")
        merges.append((module_name, p, L, R, masked_share(L, R, current.mask)))
    if not merges:
        raise ValueError(f"load_peft_adapter: {str(directory)!r} adapts no layer")
    for _, p, L, R, _ in merges:
        optimizer.merge_factors(p, L, R)
    for parameter_name, key in copies.items():
        target = parameters[parameter_name]
        target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    return AdapterImport(tuple(name for name, *_ in merges), tuple(copies), tuple(kept for *_, kept in merges))


def _check_values(tensor: Tensor, what: str) -> None:
    """``ValueError`` naming ``what`` for a tensor that is not of a float dtype or not finite."""
    if not tensor.is_floating_point():
        raise ValueError(f"load_peft_adapter: {what} has dtype {tensor.dtype}, not a float dtype; nothing was changed")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"load_peft_adapter: {what} has non-finite entries; nothing was changed")


#: Adapter features :func:`load_peft_adapter` cannot continue (config key -> the value it must have).
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "trainable_token_indices": None,
                "layer_replication": None}


def _check_config(config: Mapping[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_adapter: the adapter is of type {config.get('peft_type')!r}, not 'LORA'")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed) not in (allowed, None, False):
            raise ValueError(f"load_peft_adapter: adapters with {key}={config[key]!r} are not supported")


def _adapter_scale(config: Mapping[str, Any], module_name: str, rank: int) -> float:
    """PEFT's scaling of a module: ``alpha / r`` (``/ √r`` with rsLoRA), with the patterns' values."""
    alpha = pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _load_tensors(directory: Path) -> dict[str, Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / WEIGHTS_NAME))
    if (directory / BIN_WEIGHTS_NAME).is_file():
        return torch.load(directory / BIN_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise ValueError(f"load_peft_adapter: no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {str(directory)!r}")
