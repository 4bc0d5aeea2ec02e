"""LoRS on the real pretrained MiniLM pruned to 50% sparsity: 100 steps, float64, against an explicit
masked graph twin.

The packaged all-MiniLM-L6-v2 encoder (float64, dropout off) has each of its 36 ``query``/``key``/
``value``/``dense`` weights pruned to 50% magnitude sparsity (the half of the entries of smallest
magnitude set to 0). Two copies then train the rank-8 change of those 36 weights on the same real
sentences (mean-pooled embeddings regressed onto fixed random targets, as in
``test_peft_equivalence.py``):

* ours: :class:`~lora_optim.LoRAAdam` with ``preserve_sparsity=True`` (``rank=8``, ``alpha=16``,
  weight decay), the model untouched;
* the twin: ``W = W_res + s·(A·B) ⊙ M`` with ``M = [W₀ ≠ 0]`` and ``W_res = W₀ − s·(A₀B₀) ⊙ M``,
  evaluated through ``torch.func.functional_call`` so that autograd forms the masked factor
  gradients, trained by ``torch.optim.AdamW(foreach=False)`` from our initial factors.

After every step the losses agree to 1e-10 (relative); at the end the weights do, no zero has
moved (bit for bit), and the loss has fallen. Measured (CPU, torch 2.13, 1 thread): worst loss
difference 5.1e-15, weights 2.6e-15, loss 0.315 -> 0.0071.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lora_optim import LoRAAdam
from lora_optim.examples import minilm_task as mt
from test_peft_equivalence import BATCH, MAX_LENGTH, SENTENCES, _loss, _rel

STEPS = 100
RANK, ALPHA = 8, 16
HYPER = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
TOL = 1e-10

pytestmark = pytest.mark.slow


def _batches():
    tokenizer = mt.load_tokenizer()
    batches = []
    for start in range(0, len(SENTENCES), BATCH):
        enc = tokenizer(SENTENCES[start : start + BATCH], padding="longest", truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt", return_token_type_ids=True)
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


@pytest.fixture(scope="module")
def run() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train() -> dict:
    batches = _batches()
    generator = torch.Generator().manual_seed(1234)
    targets = [0.5 * torch.randn(b["input_ids"].shape[0], 384, generator=generator, dtype=torch.float64)
               for b in batches]
    base = mt.load_minilm(dtype=torch.float64, dropout=0.0)
    base.eval()
    base.requires_grad_(False)
    names = [f"{name}.weight" for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    assert len(names) == 36
    params = dict(base.named_parameters())
    masks = {}
    with torch.no_grad():
        for name in names:
            weight = params[name]
            threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
            weight.masked_fill_(weight.abs() <= threshold, 0.0)
            masks[name] = weight != 0
    pruned = {name: params[name].detach().clone() for name in names}

    ours = copy.deepcopy(base)
    weights = dict(ours.named_parameters())
    for name in names:
        weights[name].requires_grad_(True)
    opt = LoRAAdam([weights[name] for name in names], rank=RANK, alpha=ALPHA, preserve_sparsity=True, **HYPER)
    scale = ALPHA / RANK
    A = {n: nn.Parameter(opt.get_factors(weights[n])[0]) for n in names}
    B = {n: nn.Parameter(opt.get_factors(weights[n])[1]) for n in names}
    residual = {n: pruned[n] - scale * (A[n].detach() @ B[n].detach()) * masks[n] for n in names}
    twin_opt = torch.optim.AdamW([t for n in names for t in (A[n], B[n])], foreach=False, **HYPER)

    def twin_weights():
        return {n: residual[n] + scale * (A[n] @ B[n]) * masks[n] for n in names}

    losses = []
    for step in range(STEPS + 1):
        batch, target = batches[step % len(batches)], targets[step % len(batches)]
        loss_ours = _loss(ours, batch, target)
        twin_out = functional_call(base, twin_weights(), args=(), kwargs=batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)
        pooled = (twin_out.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1)
        loss_twin = (pooled - target).square().mean()
        losses.append((step, loss_twin.item(), loss_ours.item()))
        if step == STEPS:
            break
        opt.zero_grad()
        loss_ours.backward()
        opt.step()
        twin_opt.zero_grad()
        loss_twin.backward()
        twin_opt.step()
    with torch.no_grad():
        final_twin = {n: w.detach() for n, w in twin_weights().items()}
    return dict(losses=losses, names=names, masks=masks, pruned=pruned, weights=weights, twin=final_twin)


def test_loss_matches_the_masked_twin_at_every_step(run):
    for step, loss_twin, loss_ours in run["losses"]:
        rel = abs(loss_ours - loss_twin) / abs(loss_twin)
        assert rel <= TOL, f"step {step}: twin {loss_twin!r} vs LoRAAdam {loss_ours!r} ({rel:.3e})"


def test_weights_match_the_masked_twin(run):
    for name in run["names"]:
        rel = _rel(run["weights"][name].detach(), run["twin"][name])
        assert rel <= TOL, f"{name}: {rel:.3e}"


def test_no_zero_moved_and_the_rest_trained(run):
    for name in run["names"]:
        weight, mask = run["weights"][name].detach(), run["masks"][name]
        assert mask.float().mean().item() == pytest.approx(0.5, abs=1e-3)
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
        moved = (weight - run["pruned"][name])[mask]
        assert moved.abs().max() > 1e-4, name


def test_loss_fell(run):
    first, last = run["losses"][0][1], run["losses"][-1][1]
    assert last < 0.5 * first, (first, last)
