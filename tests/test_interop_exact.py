"""Interop exact in every configuration, or a clear refusal (float64, against PEFT's own reload).

One notion of the change a run made, ``W − W_base = (s·L·R) ⊙ M`` (:mod:`lora_optim.learnt_change`),
answers export, unmerge and load; these tests check every consumer against PEFT:

* the matrix: every projection × every ``lora`` init × ``keep_initial_factors`` ×
  ``preserve_sparsity``, two low-rank groups with different rank and alpha (one with rsLoRA) and a
  dense head. Export without base weights is exact (PEFT's reload of the adapter gives the trained
  outputs) or, for a sparse group, a truncated SVD of the masked change whose reported share is
  that of the exact SVD of ``W − W₀``; where the change is unknown it raises before writing
  anything. With the base weights at full rank every route is exact;
* the six cases of issue 17 (sparse export, sparse unmerge, sparse load, nested names in
  ``tests/test_peft_patterns.py``, load into non-zero inits, a NaN in the second module), each of
  which failed before;
* the drift check sees the writes of ``set_factors``/``merge_factors`` of a sparse group.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import interop_models as im
from lora_optim import LoRAAdam, export_peft_adapter, load_peft_adapter, unmerge_
from twins import prune_

TOL = 1e-10
LOW_RANK = im.LOW_RANK  # emb.weight, lin.weight, conv.weight
INITS = ("peft", "symmetric", "pissa", "minor", "gradient")
NONZERO_INITS = ("symmetric", "pissa", "minor")

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(sparse: bool, seed: int = 0) -> im.Small:
    model = im.make_small(seed=seed)
    if sparse:
        for name in LOW_RANK:
            prune_(model.get_parameter(name), 0.4)
    return model


def _two_group_optimizer(model: im.Small, *, sparse: bool = False, **options) -> LoRAAdam:
    """emb and conv at rank 2, alpha 3; lin at rank 3, alpha 1.5 with rsLoRA; the head densely."""
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in LOW_RANK or name.startswith("head."))
    low = dict(preserve_sparsity=sparse, **options)
    return LoRAAdam([
        {"params": [named["emb.weight"], named["conv.weight"]], "rank": 2, "alpha": 3.0, **low},
        {"params": [named["lin.weight"]], "rank": 3, "alpha": 1.5, "use_rslora": True, **low},
        {"params": [named["head.weight"], named["head.bias"]], "rank": None},
    ], lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01)


#: Inputs of every comparison (ids and an image, float64).
INPUTS = im.inputs(im.make_small(), seed=9)


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*INPUTS)


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(tensor.shape[0], -1)


def _change(model, base, name: str) -> torch.Tensor:
    return _matrix(model.get_parameter(name)) - _matrix(base.get_parameter(name))


def _peft_change(loaded, module: str, shape) -> torch.Tensor:
    with torch.no_grad():
        return loaded.base_model.model.get_submodule(module).get_delta_weight("default").reshape(shape[0], -1)


CONFIGS = [("lora", dict(init=init, keep_initial_factors=keep)) for init in INITS for keep in (False, True)] + [
    ("additive", {}), ("random", {}), ("svd", {})]


def _unknown(projection: str, options: dict) -> bool:
    """Whether a trained run's change is unknown without the base weights."""
    return projection in ("random", "svd") or (options.get("init") in NONZERO_INITS
                                               and not options["keep_initial_factors"])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("projection,options", CONFIGS,
                         ids=[f"{p}-{o.get('init', '')}{'-kept' if o.get('keep_initial_factors') else ''}"
                              for p, o in CONFIGS])
def test_export_is_exact_or_refused_in_every_configuration(projection, options, sparse, tmp_path):
    model = _model(sparse)
    base = copy.deepcopy(model)
    opt = _two_group_optimizer(model, sparse=sparse, projection=projection, **options)
    im.train(model, opt, steps=3)
    trained = _outputs(model)
    assert im.relative(trained, _outputs(base)) > 1e-3  # it trained

    # Without the base weights: exact, the masked change's SVD, or a refusal before writing.
    if _unknown(projection, options):
        with pytest.raises(ValueError, match="base="):
            export_peft_adapter(model, opt, tmp_path / "plain")
        assert not (tmp_path / "plain").exists()
    else:
        report = export_peft_adapter(model, opt, tmp_path / "plain")
        assert {module.route for module in report.modules} == ({"masked"} if sparse else {"exact"})
        if not sparse:
            assert report.min_kept == 1.0
            assert im.relative(_outputs(im.load_with_peft(base, tmp_path / "plain")), trained) <= TOL

    # With the base weights at full rank every route is exact.
    report = export_peft_adapter(model, opt, tmp_path / "full", base=base, rank=64)
    assert report.min_kept >= 1 - 1e-12
    assert im.relative(_outputs(im.load_with_peft(base, tmp_path / "full")), trained) <= TOL

    # At the groups' ranks: the kept share is the exact SVD's of W − W0, and PEFT's change leaves the rest.
    report = export_peft_adapter(model, opt, tmp_path / "cut", base=base)
    loaded = im.load_with_peft(base, tmp_path / "cut")
    for module in report.modules:
        name = f"{module.module}.weight"
        delta = _change(model, base, name)
        S = torch.linalg.svdvals(delta)
        assert module.kept == pytest.approx(float(S[:module.rank].square().sum() / S.square().sum()), rel=1e-9)
        residual = (delta - _peft_change(loaded, module.module, delta.shape)).norm() ** 2 / delta.norm() ** 2
        assert float(residual) == pytest.approx(1 - module.kept, abs=1e-10)
        if sparse and not _unknown(projection, options):
            assert module.route == "masked"


# ----------------------------------------------------------------------------- case 1: sparse export


def test_sparse_export_takes_the_masked_change_and_reports_its_share(tmp_path):
    """Issue 17, case 1: the exporter wrote s·A·B (route 'exact', kept 1.0) for a change (s·A·B) ⊙ M;
    PEFT's reload was 1e-1 away."""
    model = _model(sparse=True)
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, preserve_sparsity=True)
    im.train(model, opt)
    report = export_peft_adapter(model, opt, tmp_path / "cut")
    loaded = im.load_with_peft(base, tmp_path / "cut")
    for module in report.modules:
        delta = _change(model, base, f"{module.module}.weight")
        S = torch.linalg.svdvals(delta)
        assert module.route == "masked" and 0 < module.kept < 1
        assert module.kept == pytest.approx(float(S[:module.rank].square().sum() / S.square().sum()), rel=1e-9)
        residual = (delta - _peft_change(loaded, module.module, delta.shape)).norm() ** 2 / delta.norm() ** 2
        assert float(residual) == pytest.approx(1 - module.kept, abs=1e-10)
    export_peft_adapter(model, opt, tmp_path / "full", rank=64)  # no base needed
    assert im.relative(_outputs(im.load_with_peft(base, tmp_path / "full")), _outputs(model)) <= TOL


def test_a_sparse_group_without_zeros_exports_exactly(tmp_path):
    """The masked route only where the mask has a zero: a dense weight's change is s·A·B."""
    model = im.make_small()
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, preserve_sparsity=True)
    im.train(model, opt)
    report = export_peft_adapter(model, opt, tmp_path)
    assert {module.route for module in report.modules} == {"exact"}
    assert im.relative(_outputs(im.load_with_peft(base, tmp_path)), _outputs(model)) <= TOL


# ----------------------------------------------------------------------------- case 2: sparse unmerge


@pytest.mark.parametrize("projection,options", [("lora", {}), ("lora", dict(init="symmetric", keep_initial_factors=True)),
                                                ("additive", {})], ids=["lora", "symmetric-kept", "additive"])
def test_sparse_unmerge_gives_the_base_back_and_keeps_every_zero(projection, options):
    """Issue 17, case 2: unmerge_ wrote an unmasked change: W ended 7.6e-2 from W0 and every pruned
    zero was non-zero."""
    model = _model(sparse=True)
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, preserve_sparsity=True, projection=projection, **options)
    im.train(model, opt)
    unmerge_(model, opt, strict=False)
    for name in LOW_RANK:
        W, W0 = model.get_parameter(name).detach(), base.get_parameter(name)
        assert im.relative(W, W0) <= 1e-12, name
        assert torch.equal(W[W0 == 0], W0[W0 == 0]), name


# ----------------------------------------------------------------------------- case 3: sparse load


def _adapter(tmp_path, *, seed: int = 0, init: str = "peft", steps: int = 3, name: str = "adapter"):
    """A trained rank-2 adapter (alpha 3) of the small model with seed ``seed``, its base model and
    PEFT's reload of it."""
    source = im.make_small(seed=seed)
    base = copy.deepcopy(source)
    opt = im.optimizer_for(source, dense=(), init=init)
    im.train(source, opt, steps=steps, seed=10 + seed)
    export_peft_adapter(source, opt, tmp_path / name)
    return tmp_path / name, base, im.load_with_peft(base, tmp_path / name)


def test_sparse_load_merges_the_masked_change_and_reports_the_share(tmp_path):
    """Issue 17, case 3: a sparse group took the whole adapter, and every pruned entry became
    non-zero. Now W = W0 + (PEFT's change) ⊙ M, and the report gives ‖(s·L·R) ⊙ M‖² / ‖s·L·R‖²."""
    path, _, _ = _adapter(tmp_path)
    model = _model(sparse=True)
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, dense=(), preserve_sparsity=True, drift_probes=3)
    report = load_peft_adapter(model, opt, path)
    loaded = im.load_with_peft(base, path)
    assert sorted(report.modules) == ["conv", "emb", "lin"]
    shares = {}
    for module in report.modules:
        name = f"{module}.weight"
        W0 = _matrix(base.get_parameter(name))
        mask = W0 != 0
        theirs = _peft_change(loaded, module, W0.shape)
        assert torch.equal(_matrix(model.get_parameter(name))[~mask], W0[~mask]), module
        assert im.relative(_change(model, base, name), theirs * mask) <= 1e-12, module
        assert opt.drift(model.get_parameter(name)).relative_to_change <= 1e-12
        shares[module] = float((theirs * mask).square().sum() / theirs.square().sum())
    assert report.kept == pytest.approx(tuple(shares[module] for module in report.modules), rel=1e-12)
    assert all(0 < kept < 1 for kept in report.kept) and report.min_kept == min(report.kept)
    im.train(model, opt)  # training continues from the adapter's factors, zeros kept
    for name in LOW_RANK:
        W0 = base.get_parameter(name)
        assert torch.equal(model.get_parameter(name)[W0 == 0], W0[W0 == 0])


# ----------------------------------------------------------------------------- case 5: non-zero inits


@pytest.mark.parametrize("keep", [False, True], ids=["", "kept"])
@pytest.mark.parametrize("init", INITS)
def test_load_into_a_fresh_optimizer_is_exact_whatever_the_init(init, keep, tmp_path):
    """Issue 17, case 5: the load moved W from A0·B0 instead of from the base: 0.88 (symmetric) and
    1.06 (PiSSA) relative to PEFT's own reload of the same adapter."""
    path, base, theirs = _adapter(tmp_path)
    model = copy.deepcopy(base)
    opt = im.optimizer_for(model, dense=(), init=init, keep_initial_factors=keep)
    load_peft_adapter(model, opt, path)
    assert im.relative(_outputs(model), _outputs(theirs)) <= TOL
    for name in LOW_RANK:  # the factors continue PEFT's: the change is s·lora_B·lora_A
        L, R = opt.weight_change_factors(model.get_parameter(name))
        assert im.relative(L, opt.get_factors(model.get_parameter(name))[0]) == 0.0 and L.shape[1] == 2
    export_peft_adapter(model, opt, tmp_path / "again")  # and export exactly, at rank r
    again = im.load_with_peft(base, tmp_path / "again")
    assert im.relative(_outputs(again), _outputs(theirs)) <= TOL


@pytest.mark.parametrize("init", NONZERO_INITS + ("peft",))
def test_task_switching_with_kept_nonzero_inits_is_exact(init, tmp_path):
    """A run trained from a non-zero initial product (kept) switches to another task's adapter and
    back to its base exactly."""
    path, base, theirs = _adapter(tmp_path, seed=0)
    model = copy.deepcopy(base)
    opt = im.optimizer_for(model, dense=(), init=init, keep_initial_factors=True)
    im.train(model, opt, seed=40)  # task 1
    load_peft_adapter(model, opt, path)  # task 2, replacing task 1's change
    assert im.relative(_outputs(model), _outputs(theirs)) <= TOL
    unmerge_(model, opt)
    for name in LOW_RANK:
        assert im.relative(model.get_parameter(name).detach(), base.get_parameter(name)) <= 1e-12, name


@pytest.mark.parametrize("init", NONZERO_INITS)
def test_load_into_a_trained_optimizer_with_an_unknown_change_is_refused_naming_the_init(init, tmp_path):
    path, base, _ = _adapter(tmp_path)
    model = copy.deepcopy(base)
    opt = im.optimizer_for(model, dense=(), init=init)
    im.train(model, opt, seed=40)
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"\w+\.weight: .*init='{init}'.*keep_initial_factors=True"):
        load_peft_adapter(model, opt, path)
    assert _unchanged(model, opt, snapshot)


def test_an_unmoved_nonzero_init_knows_its_change_until_the_first_step():
    model = im.make_small()
    opt = im.optimizer_for(model, dense=(), init="symmetric")
    p = model.lin.weight
    L, R = opt.weight_change_factors(p)
    assert float((L @ R).abs().max()) <= 1e-15  # W is its base: no change
    assert opt.initial_factors(p) is not None
    im.train(model, opt, steps=1)
    assert opt.weight_change_factors(p) is None and opt.initial_factors(p) is None
    assert "init='symmetric'" in opt.learnt_change(p).unknown


# ----------------------------------------------------------------------------- case 6: every check first


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()})


def _unchanged(model, opt, snapshot) -> bool:
    weights, states = snapshot
    same = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    same &= {id(p) for p in opt.state} == set(states)
    for p, state in opt.state.items():
        old = states.get(id(p), {})
        same &= set(state) == set(old)
        for key, value in state.items():
            same &= torch.equal(value, old[key]) if isinstance(value, torch.Tensor) else value == old[key]
    return same


def _damaged_copy(path, target, key_end: str, change) -> None:
    target.mkdir()
    shutil.copy(path / "adapter_config.json", target / "adapter_config.json")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith(key_end))
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(target / "adapter_model.safetensors"))


def _nan_at_first(tensor):
    tensor.view(-1)[0] = float("nan")
    return tensor


@pytest.mark.parametrize("key_end,change,message", [
    ("lin.lora_A.weight", _nan_at_first, r"lin\.weight .*non-finite"),
    ("conv.lora_B.weight", lambda t: t.fill_(float("inf")), r"conv\.weight .*non-finite"),
    ("lin.lora_A.weight", lambda t: t.to(torch.int32), r"lin\.weight .*not a float dtype"),
    ("lin.lora_B.weight", lambda t: t[:, :1].contiguous(), r"'lin'.*do not fit"),
    ("head.weight", _nan_at_first, r"head\.weight.*non-finite"),
], ids=["nan", "inf", "int", "shape", "nan-in-a-copy"])
def test_a_bad_tensor_in_a_later_module_changes_nothing(key_end, change, message, tmp_path):
    """Issue 17, case 6: with a NaN in the second module's lora_A the first module was already
    merged when set_factors raised, and the message did not name the module."""
    source = im.make_small()
    base = copy.deepcopy(source)
    source_opt = im.optimizer_for(source)
    im.train(source, source_opt)
    export_peft_adapter(source, source_opt, tmp_path / "good")
    _damaged_copy(tmp_path / "good", tmp_path / "bad", key_end, change)
    model = copy.deepcopy(base)
    opt = im.optimizer_for(model)
    im.train(model, opt, steps=1, seed=30)
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(model, opt, tmp_path / "bad")
    assert _unchanged(model, opt, snapshot)


def test_the_modes_pending_pieces_are_asked_through_the_public_surface():
    model = im.make_small()
    opt = im.optimizer_for(model, dense=())
    assert not opt.has_pending_pieces(model.lin.weight)  # no state yet: nothing pending
    im.train(model, opt, steps=1)
    opt.accumulate_grad_(model.lin.weight, torch.ones_like(model.lin.weight))
    assert opt.has_pending_pieces(model.lin.weight) and not opt.has_pending_pieces(model.conv.weight)
    with pytest.raises(RuntimeError, match="merge_factors"):
        opt.merge_factors(model.lin.weight, *opt.get_factors(model.lin.weight))
    opt.step()
    assert not opt.has_pending_pieces(model.lin.weight)


# ----------------------------------------------------------------------------- the drift check


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_the_drift_check_follows_every_write(sparse, tmp_path):
    """set_factors(update_weight=True), merge_factors and unmerge_ write as a step does, so the
    probes see exactly what W did (a sparse group's writes are masked)."""
    path, _, _ = _adapter(tmp_path)
    model = _model(sparse)
    opt = im.optimizer_for(model, dense=(), preserve_sparsity=sparse, drift_probes=4,
                           init="symmetric", keep_initial_factors=True)
    im.train(model, opt)
    load_peft_adapter(model, opt, path)
    im.train(model, opt, seed=50)
    p = model.lin.weight
    A, B = opt.get_factors(p)
    opt.set_factors(p, 2 * A, B, update_weight=True)
    unmerge_(model, opt)
    for report in opt.drift_report().values():
        assert report.relative_to_weight <= 1e-13 and report.change_norm > 0


def test_merge_factors_refuses_other_projections():
    model = im.make_small()
    opt = im.optimizer_for(model, dense=(), projection="additive")
    with pytest.raises(ValueError, match="projection 'additive'"):
        opt.merge_factors(model.lin.weight, *opt.get_factors(model.lin.weight))


def test_config_files_name_each_module_exactly(tmp_path):
    """The two-group export writes per-module alphas and ranks PEFT reads back module by module."""
    model = _model(sparse=False)
    opt = _two_group_optimizer(model)
    im.train(model, opt)
    report = export_peft_adapter(model, opt, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = im.load_with_peft(copy.deepcopy(model), tmp_path)
    for module in report.modules:
        layer = loaded.base_model.model.get_submodule(module.module)
        assert layer.r["default"] == module.rank
        assert layer.scaling["default"] == pytest.approx(opt.factor_scale(model.get_parameter(f"{module.module}.weight")),
                                                         rel=1e-15)
    assert all(key.startswith("^") for key in {**config["rank_pattern"], **config["alpha_pattern"]})


def test_set_factors_with_a_mask_switched_on_late_changes_nothing():
    """preserve_sparsity switched on after the state was made: set_factors(update_weight=True) and
    merge_factors raise before the factors move."""
    model = _model(sparse=True)
    opt = im.optimizer_for(model, dense=())
    im.train(model, opt, steps=1)
    opt.param_groups[0]["preserve_sparsity"] = True
    snapshot = _snapshot(model, opt)
    A, B = opt.get_factors(model.lin.weight)
    for write in (lambda: opt.set_factors(model.lin.weight, 2 * A, B, update_weight=True),
                  lambda: opt.merge_factors(model.lin.weight, 2 * A, B)):
        with pytest.raises(ValueError, match="preserve_sparsity"):
            write()
        assert _unchanged(model, opt, snapshot)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_bf16_load_goes_through_the_write_mode(sparse, tmp_path):
    """A bf16 model loads a float64 adapter through its group's write mode: W is the rounded
    W0 + (s·L·R) ⊙ M (within one bf16 ulp per element, whatever the rounding mode) and every zero
    stays zero."""
    path, _, _ = _adapter(tmp_path)
    model = _model(sparse).to(torch.bfloat16)
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, dense=(), preserve_sparsity=sparse, init="symmetric")
    load_peft_adapter(model, opt, path)
    loaded = im.load_with_peft(base.double(), path)
    for name in LOW_RANK:
        W0 = _matrix(base.get_parameter(name)).double()
        expected = W0 + _peft_change(loaded, name.rpartition(".")[0], W0.shape) * (W0 != 0 if sparse else 1)
        got = _matrix(model.get_parameter(name)).double()
        assert ((got - expected).abs() <= 2 ** -7 * expected.abs()).all(), name  # one ulp: any rounding mode
        if sparse:
            assert torch.equal(got[W0 == 0], W0[W0 == 0]), name
