"""Module names PEFT reads exactly: nested names, names that are suffixes of each other, digits, dots.

* The mirror of PEFT's matching rules (:mod:`lora_optim.interop.patterns`) against PEFT's own
  functions (``get_pattern_key``, ``check_target_module_exists``), hypothesis over names;
* issue 17, case 4: ``nn.Sequential`` inside ``nn.Sequential`` (modules ``0``, ``1.0``, ``1.2``)
  with a different alpha per group: the exported key ``0`` also matched ``1.0``, so PEFT scaled it
  by the wrong alpha (outputs 0.54 off in the issue's model); now every key is anchored and PEFT's
  reload gives the trained outputs to 1e-10;
* hypothesis over module trees with nested and suffix-sharing names, a rank and alpha per trained
  layer, untrained layers whose names end like trained ones and densely trained ones: PEFT's
  reload adapts exactly the trained layers with their ranks and scalings and gives the trained
  outputs (float64, 1e-10), or, where ``modules_to_save`` cannot name a module alone (PEFT matches
  it as a plain suffix), the export raises ``ValueError`` before writing anything;
* the load reads ``alpha_pattern`` as PEFT does, also for unanchored keys PEFT itself wrote.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import interop_models as im
from lora_optim import LoRAAdam, export_peft_adapter, load_peft_adapter
from lora_optim.interop.patterns import exact_pattern, is_kept_from_adapters, is_target, pattern_value

TOL = 1e-10
#: Names that are suffixes of each other, with digits.
NAMES = ("0", "1", "10", "a", "b", "ab", "ba", "a0")

pytestmark = pytest.mark.usefixtures("one_thread")

module_names = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(".".join)


@settings(max_examples=200, deadline=None)
@given(names=st.lists(module_names, min_size=1, max_size=6, unique=True), key=module_names,
       anchored=st.booleans())
def test_pattern_rule_is_peft_s(names, key, anchored):
    from peft.utils.other import get_pattern_key

    patterns = {(exact_pattern(name) if anchored else name): index for index, name in enumerate(names)}
    theirs = patterns.get(get_pattern_key(patterns.keys(), key), -1)
    assert pattern_value(patterns, key, -1) == theirs
    if anchored:  # an anchored key matches its own module and no other
        assert theirs == (names.index(key) if key in names else -1)


@settings(max_examples=200, deadline=None)
@given(targets=st.lists(module_names, min_size=1, max_size=4, unique=True),
       saved=st.lists(module_names, max_size=2, unique=True), key=module_names, as_regex=st.booleans())
def test_target_rule_is_peft_s(targets, saved, key, as_regex):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    target_modules = "|".join(f"(?:{re.escape(t)})" for t in targets) if as_regex else targets
    config = LoraConfig(target_modules=target_modules, modules_to_save=saved or None)
    ours = is_target(target_modules, key) and not is_kept_from_adapters(saved, key)
    assert ours == bool(check_target_module_exists(config, key))
    if as_regex:
        assert is_target(target_modules, key) == (key in targets)


# ----------------------------------------------------------------------------- case 4


def _nested() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 5), nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4))).double()


@pytest.mark.parametrize("first_rank", [2, 3], ids=["alphas", "alphas-and-ranks"])
def test_nested_names_with_alphas_per_group_reload_exactly(first_rank, tmp_path):
    """Issue 17, case 4: the alpha_pattern key '0' (module 0, alpha 1) also matched module '1.0'
    (alpha 4 in training) under PEFT's rule (.*\\.)?(key)$: PEFT's reload was 0.26 off here, silently
    (with a rank_pattern key '0' too, PEFT's load fails on the shapes)."""
    model = _nested()
    base = copy.deepcopy(model)
    opt = LoRAAdam([{"params": [model[0].weight], "rank": first_rank, "alpha": 1.0},
                    {"params": [model[1][0].weight, model[1][2].weight], "rank": 2, "alpha": 4.0}], lr=5e-2)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    export_peft_adapter(model, opt, tmp_path)
    loaded = im.load_with_peft(base, tmp_path)
    with torch.no_grad():
        assert im.relative(loaded(x), model(x)) <= TOL
    for name, rank, scale in (("0", first_rank, 1 / first_rank), ("1.0", 2, 2.0), ("1.2", 2, 2.0)):
        layer = loaded.base_model.model.get_submodule(name)
        assert (layer.r["default"], layer.scaling["default"]) == (rank, pytest.approx(scale, rel=1e-15)), name
    # and back: the load finds the same scaling for each module
    fresh = copy.deepcopy(base)
    fresh_opt = LoRAAdam([{"params": [fresh[0].weight], "rank": first_rank, "alpha": 1.0},
                          {"params": [fresh[1][0].weight, fresh[1][2].weight], "rank": 2, "alpha": 4.0}], lr=5e-2)
    load_peft_adapter(fresh, fresh_opt, tmp_path)
    with torch.no_grad():
        assert im.relative(fresh(x), model(x)) <= TOL


def test_the_load_reads_unanchored_keys_as_peft_does(tmp_path):
    """A PEFT user's alpha_pattern {'0': 1} scales '0' and '1.0' (PEFT's rule), not '1.2': the load
    accepts the optimizer that matches PEFT's reading and refuses the one that matches the intent."""
    from peft import LoraConfig, get_peft_model

    base = _nested()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1.0", "1.2"], alpha_pattern={"0": 1.0},
                        init_lora_weights=False)  # random lora_B: a non-zero adapter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        wrapped = get_peft_model(copy.deepcopy(base), config)
    wrapped.save_pretrained(str(tmp_path))
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = im.load_with_peft(base, tmp_path)
    model = copy.deepcopy(base)
    opt = LoRAAdam([{"params": [model[0].weight, model[1][0].weight], "rank": 2, "alpha": 1.0},
                    {"params": [model[1][2].weight], "rank": 2, "alpha": 4.0}])
    load_peft_adapter(model, opt, tmp_path)
    with torch.no_grad():
        assert im.relative(model(x), theirs(x)) <= TOL
    intended = copy.deepcopy(base)
    opt = LoRAAdam([{"params": [intended[0].weight], "rank": 2, "alpha": 1.0},
                    {"params": [intended[1][0].weight, intended[1][2].weight], "rank": 2, "alpha": 4.0}])
    with pytest.raises(ValueError, match=r"1\.0\.weight: the adapter's scaling is 0\.5"):
        load_peft_adapter(intended, opt, tmp_path)
    assert torch.equal(intended[0].weight, base[0].weight)


@pytest.mark.parametrize("other", ["norm", "frozen linear"])
def test_a_module_whose_name_ends_like_a_target_is_left_alone(other, tmp_path):
    """Targets '0' and '1.1' as a list would also make PEFT adapt '1.0' (a LayerNorm: PEFT raises; a
    frozen Linear: an adapter that was never trained): target_modules is written as one expression
    that PEFT's re.fullmatch reads as exactly the trained layers."""
    import json

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        middle = nn.LayerNorm(4) if other == "norm" else nn.Linear(4, 4)
        model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(middle, nn.Linear(4, 4))).double()
    base = copy.deepcopy(model)
    model.requires_grad_(False)
    opt = LoRAAdam([model[0].weight.requires_grad_(True), model[1][1].weight.requires_grad_(True)], rank=2, lr=5e-2)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model(x).square().mean().backward()
    opt.step()
    export_peft_adapter(model, opt, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(written, str) and re.fullmatch(written, "1.0") is None
    loaded = im.load_with_peft(base, tmp_path)
    assert not hasattr(loaded.base_model.model.get_submodule("1.0"), "lora_A")
    with torch.no_grad():
        assert im.relative(loaded(x), model(x)) <= TOL


def test_modules_to_save_that_cannot_name_a_module_alone_is_refused(tmp_path):
    """A densely trained '0' would be saved as modules_to_save ['0'], which PEFT matches as a plain
    suffix: it would also replace '1.0' by a copy and keep it from its adapter. No key can name '0'
    alone there, so the export refuses, naming both, before writing anything."""
    model = _nested()
    opt = LoRAAdam([{"params": [model[1][0].weight], "rank": 2},
                    {"params": list(model[0].parameters()), "rank": None}], lr=5e-2)
    model(torch.ones(2, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"modules_to_save.*'0'.*'1\.0'"):
        export_peft_adapter(model, opt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ----------------------------------------------------------------------------- module trees


class Tree(nn.Module):
    """Children under arbitrary names; the output is the sum of every child's output (all 4 → 4)."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(child(x) for child in self.children())


def _build(spec) -> nn.Module:
    if spec == "linear":
        return nn.Linear(4, 4)
    if spec == "norm":
        return nn.LayerNorm(4)
    return Tree({name: _build(child) for name, child in spec.items()})


leaves = st.sampled_from(["linear", "linear", "norm"])
trees = st.recursive(leaves, lambda children: st.dictionaries(st.sampled_from(NAMES), children, min_size=1,
                                                              max_size=3), max_leaves=8)
roles = st.tuples(st.sampled_from(["low", "low", "dense", "frozen"]), st.integers(1, 3), st.sampled_from([1.0, 2.0, 8.0]))


@settings(max_examples=50, deadline=None)
@given(spec=st.dictionaries(st.sampled_from(NAMES), trees, min_size=1, max_size=3), data=st.data())
def test_module_trees_reload_exactly_or_are_refused(spec, data):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(spec).double()
    base = copy.deepcopy(model)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = {name: data.draw(roles, label=name) for name in linears}
    low = {name: role for name, role in chosen.items() if role[0] == "low"}
    dense = sorted(name for name, role in chosen.items() if role[0] == "dense")
    assume(low)
    model.requires_grad_(False)
    groups = []
    for name, (_, rank, alpha) in low.items():
        weight = model.get_submodule(name).weight.requires_grad_(True)
        groups.append({"params": [weight], "rank": rank, "alpha": alpha})
    for name in dense:
        groups.append({"params": list(model.get_submodule(name).parameters()), "rank": None})
    for group in groups[len(low):]:
        for p in group["params"]:
            p.requires_grad_(True)
    opt = LoRAAdam(groups, lr=5e-2)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    names = [name for name, _ in model.named_modules()]
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / "adapter"
        # PEFT would save another module whole, or keep a trained layer from its adapter
        clash = [m for m in dense if any(n not in dense and n.endswith(m) for n in names)
                 or any(re.match(rf"(^|.*\.){m}($|\..*)", t) for t in low)]
        event("refused" if clash else "exported")
        event("target_modules as one expression" if any(n not in low and any(n.endswith("." + t) for t in low)
                                                       for n in names) else "target_modules as a list")
        if clash:
            with pytest.raises(ValueError, match="modules_to_save"):
                export_peft_adapter(model, opt, target)
            assert not target.exists()
            return
        export_peft_adapter(model, opt, target)
        loaded = im.load_with_peft(base, target)
        with torch.no_grad():
            assert im.relative(loaded(x), model(x)) <= TOL
        adapted = {name[len("base_model.model."):]: module for name, module in loaded.named_modules()
                   if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A}
        assert sorted(adapted) == sorted(low)
        for name, (_, rank, alpha) in low.items():
            assert adapted[name].r["default"] == rank
            assert adapted[name].scaling["default"] == pytest.approx(alpha / rank, rel=1e-15)
