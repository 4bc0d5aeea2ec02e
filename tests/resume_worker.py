"""The training runs of ``tests/test_resume.py``, and their resumption in a new process.

Imported by the test (which trains each run, saves a checkpoint part-way and finishes the run
uninterrupted) and run as a script by it in a fresh Python process::

    python tests/resume_worker.py CHECKPOINT_DIR OUT_FILE THREADS

which rebuilds every model and optimizer from scratch (different initial weights, so only the
checkpoint can make them agree), loads the checkpoint with ``weights_only=True``, finishes the
run and saves the final weights and optimizer state to ``OUT_FILE``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_optim import LoRAAdam, NonFiniteGradientWarning, available_writers

#: Steps in all, the step after which the checkpoint is taken, a step whose gradient has a NaN.
TOTAL_STEPS, CHECKPOINT_AT, NAN_AT = 8, 4, 1

_PROJECTIONS = {
    "lora": dict(projection="lora", init="symmetric"),
    "random1": dict(projection="random", resample_every=1),
    "random3": dict(projection="random", resample_every=3, moment_rule="transport"),
    "additive": dict(projection="additive"),
}

#: name -> (weight dtype, optimizer options): every projection with every write mode on a bf16
#: model, and the fp32 default.
CONFIGS = {
    f"{name}-{precision}": (torch.bfloat16, dict(options, precision=precision))
    for name, options in _PROJECTIONS.items()
    for precision in available_writers()
}
CONFIGS["lora-fp32-default"] = (torch.float32, dict(_PROJECTIONS["lora"]))


def build(name: str, init_seed: int = 0):
    """``(model, optimizer, scheduler)`` of run ``name``; ``init_seed`` sets the initial weights."""
    dtype, options = CONFIGS[name]
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = LoRAAdam(
        [{"params": weights}, {"params": biases, "rank": None}],
        lr=2e-2, rank=3, alpha=6.0, weight_decay=0.01, seed=11, drift_probes=2, **options,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS)
    return model, opt, scheduler


def batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same data in every process."""
    dtype, _ = CONFIGS[name]
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(24, 12, generator=gen).to(dtype), torch.randint(0, 5, (24,), generator=gen))
        for _ in range(TOTAL_STEPS)
    ]


def train(model, opt, scheduler, data, start: int, stop: int) -> None:
    """Steps ``start..stop-1`` of the run (step ``NAN_AT`` gets a NaN in one gradient entry)."""
    for step in range(start, stop):
        x, y = data[step]
        nn.functional.cross_entropy(model(x).float(), y).backward()
        if step == NAN_AT:
            model[0].weight.grad[1, 2] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteGradientWarning)
            opt.step()
        opt.zero_grad()
        scheduler.step()


def snapshot(model, opt) -> dict:
    """Final weights and optimizer state, to compare bit for bit."""
    return {"params": [p.detach().clone() for p in model.parameters()], "opt": opt.state_dict()}


def main(checkpoint_dir: str, out_file: str, threads: str) -> None:
    torch.set_num_threads(int(threads))
    results = {}
    for name in CONFIGS:
        model, opt, scheduler = build(name, init_seed=1234)  # different weights until loaded
        checkpoint = torch.load(Path(checkpoint_dir) / f"{name}.pt", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        train(model, opt, scheduler, batches(name), CHECKPOINT_AT, TOTAL_STEPS)
        results[name] = snapshot(model, opt)
    torch.save(results, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
