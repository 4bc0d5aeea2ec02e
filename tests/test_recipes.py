"""The BitFit recipe of docs/interop.md (seed 002): biases only, in a ``rank=None`` group."""

from __future__ import annotations

import copy

import pytest
import torch

import interop_models as im
from lora_optim import LoRAAdam, export_peft_adapter


def test_bitfit_trains_the_biases_only_as_adamw_does(tmp_path):
    model = im.make_small()
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model)
    # The recipe, as written in the docs.
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    model.requires_grad_(False)
    for p in biases:
        p.requires_grad_(True)
    opt = LoRAAdam([{"params": biases, "rank": None}], lr=1e-3)
    ref_biases = [p for name, p in reference.named_parameters() if name.endswith(".bias")]
    reference.requires_grad_(False)
    for p in ref_biases:
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW(ref_biases, lr=1e-3, weight_decay=0.0, fused=True)
    for step in range(3):
        x = im.inputs(model, seed=step)
        for m, o in ((model, opt), (reference, ref_opt)):
            m(*x).square().mean().backward()
            o.step()
            o.zero_grad()
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), before.parameters()):
        assert torch.equal(p, q), name  # bit for bit torch.optim.AdamW(fused=True)
        assert torch.equal(p, p0) != name.endswith(".bias"), name  # biases moved, nothing else did
    with pytest.raises(ValueError, match="no low-rank weight"):
        export_peft_adapter(model, opt, tmp_path / "bitfit")
