"""``load_peft_adapter``: a PEFT run continues here and goes back to PEFT, float64.

Round trip on the packaged MiniLM (:mod:`tests.peft_twin`): PEFT trains ``K`` steps and saves its
adapter; a fresh base model and a fresh ``LoRAAdam`` load it; then PEFT continues with a fresh
AdamW (an adapter file holds no optimizer state, so the moments restart on both sides) while we
train the same ``M`` steps: the losses agree to 1e-10 at every step. Our result is exported and
loaded by PEFT onto the base model: its outputs equal ours, and PEFT's continued model's, to
1e-10. Then the checks of the bad cases: each raises ``ValueError`` and changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch

import interop_models as im
import peft_twin as pt
from lora_optim import LoRAAdam, export_peft_adapter, load_peft_adapter

K, M = 4, 4
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
TOL = 1e-10  # measured worst: 1.1e-16 (losses), 2.1e-15 (outputs)


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False, **HYPER)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    torch.set_num_threads(1)
    base = pt.base_encoder(torch.float64)
    data = pt.batches()
    targets = pt.targets(data, torch.float64)
    peft_model = pt.peft_model(base)
    peft_optimizer = _adamw(peft_model)
    for step in range(K):
        peft_optimizer.zero_grad()
        pt.loss(peft_model, data[step % 2], targets[step % 2]).backward()
        peft_optimizer.step()
    saved = tmp_path_factory.mktemp("peft_adapter")
    peft_model.save_pretrained(str(saved))

    ours = copy.deepcopy(base)
    modules = dict(ours.named_modules())
    weights = [modules[name].weight for name in pt.linear_names(ours)]
    for weight in weights:
        weight.requires_grad_(True)
    opt = LoRAAdam([{"params": weights, "rank": 8, "alpha": 16}], **HYPER)
    report = load_peft_adapter(ours, opt, saved)

    peft_optimizer = _adamw(peft_model)  # PEFT continues with fresh moments, as we do
    losses = []
    for step in range(K, K + M):
        batch, target = data[step % 2], targets[step % 2]
        loss_peft, loss_ours = pt.loss(peft_model, batch, target), pt.loss(ours, batch, target)
        losses.append((loss_peft.item(), loss_ours.item()))
        peft_optimizer.zero_grad()
        loss_peft.backward()
        peft_optimizer.step()
        opt.zero_grad()
        loss_ours.backward()
        opt.step()
    exported = tmp_path_factory.mktemp("ours")
    export_peft_adapter(ours, opt, exported)
    reloaded = im.load_with_peft(base, exported)
    return dict(base=base, data=data, report=report, losses=losses, peft=peft_model, ours=ours, reloaded=reloaded)


def test_import_takes_every_adapted_layer(round_trip):
    assert sorted(round_trip["report"].modules) == sorted(pt.linear_names(round_trip["base"]))
    assert round_trip["report"].copied == ()


def test_training_continues_the_peft_run(round_trip):
    for step, (theirs, ours) in enumerate(round_trip["losses"]):
        assert abs(ours - theirs) / abs(theirs) <= TOL, f"step {K + step}: {ours!r} vs PEFT {theirs!r}"
    first, later = round_trip["losses"][0][0], round_trip["losses"][-2][0]  # the same batch, two steps apart
    assert later < first  # it trained


def test_the_exported_adapter_reproduces_both_runs(round_trip):
    with torch.no_grad():
        for batch in round_trip["data"]:
            ours = pt.pooled(round_trip["ours"], batch)
            assert im.relative(pt.pooled(round_trip["reloaded"], batch), ours) <= TOL
            assert im.relative(pt.pooled(round_trip["peft"], batch), ours) <= TOL


# ----------------------------------------------------------------------------- small models


def _trained_small(**options):
    model = im.make_small()
    base = copy.deepcopy(model)
    opt = im.optimizer_for(model, **options)
    im.train(model, opt)
    return model, base, opt


def test_import_merges_dense_modules_and_biases(tmp_path):
    """An adapter with modules_to_save (the head) and bias='lora_only' (lin.bias), loaded into a
    fresh model and optimizer, gives back the trained model."""
    model, base, opt = _trained_small()
    export_peft_adapter(model, opt, tmp_path)
    fresh = copy.deepcopy(base)
    report = load_peft_adapter(fresh, im.optimizer_for(fresh), tmp_path)
    assert {"head.weight", "head.bias", "lin.bias"} <= set(report.copied)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert im.relative(q.detach(), p.detach()) <= 1e-12, name


def test_import_onto_a_trained_optimizer_replaces_its_change(tmp_path):
    """Task switching: the load subtracts the current change (another task's) and adds the adapter's."""
    source, base, source_opt = _trained_small()
    export_peft_adapter(source, source_opt, tmp_path)
    model = copy.deepcopy(base)
    opt = im.optimizer_for(model)
    im.train(model, opt, seed=40)  # another task: W = W_base + s·A'B'
    load_peft_adapter(model, opt, tmp_path)
    for (name, p), q in zip(source.named_parameters(), model.parameters()):
        assert im.relative(q.detach(), p.detach()) <= 1e-12, name


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()})


def _unchanged(model, opt, snapshot) -> bool:
    weights, states = snapshot
    same = all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for p, state in opt.state.items():
        for key, value in state.items():
            old = states.get(id(p), {}).get(key)
            same &= torch.equal(value, old) if isinstance(value, torch.Tensor) else value == old
    return same


@pytest.mark.parametrize("case", ["alpha", "rank", "projection", "missing-module", "dense-only", "dora", "type"])
def test_bad_adapters_raise_and_change_nothing(case, tmp_path):
    import json

    source, base, source_opt = _trained_small()
    export_peft_adapter(source, source_opt, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    model = copy.deepcopy(base)
    options = {"alpha": dict(alpha=5.0), "rank": dict(rank=3), "projection": dict(projection="additive")}.get(case, {})
    opt = im.optimizer_for(model, **options)
    im.train(model, opt, steps=1)
    if case == "missing-module":
        model.lin = torch.nn.Identity()
    if case == "dense-only":
        opt = LoRAAdam(model.parameters(), rank=None)
    if case in ("dora", "type"):
        config.update({"dora": {"use_dora": True}, "type": {"peft_type": "IA3"}}[case])
        config_file.write_text(json.dumps(config))
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match={"alpha": "scaling", "rank": "rank", "projection": "projection",
                                          "missing-module": "lin", "dense-only": "low-rank",
                                          "dora": "use_dora", "type": "LORA"}[case]):
        load_peft_adapter(model, opt, tmp_path)
    assert _unchanged(model, opt, snapshot)


def test_a_directory_without_an_adapter_raises(tmp_path):
    model = im.make_small()
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft_adapter(model, im.optimizer_for(model), tmp_path)
