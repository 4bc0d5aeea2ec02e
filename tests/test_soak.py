"""Soak: 2,000 steps of a small model with ``random`` factors redrawn every step.

After a warm-up of 200 steps neither the resident memory of the process nor the Python heap
grows (a leak of one weight-sized tensor per step would add 64 MiB, of one small Python object
per step ~100 KiB), the optimizer state keeps its size, and the drift check holds for every
matrix. Slow: CI runs it in its own step (``pytest -m slow``).
"""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, optimizer_state_bytes

STEPS, WARM_UP = 2000, 200


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_random_resampling_soak_keeps_memory_flat_and_drift_small():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
        opt = LoRAAdam(model.parameters(), lr=1e-3, rank=8, projection="random", resample_every=1, drift_probes=2)
        gen = torch.Generator().manual_seed(1)
        teacher = torch.randn(64, 10, generator=gen)
        resident, heap = [], []
        for step in range(STEPS):
            x = torch.randn(32, 64, generator=gen)
            loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(dim=1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == WARM_UP:
                gc.collect()
                state_bytes = optimizer_state_bytes(opt)
                state_keys = {id(p): sorted(s) for p, s in opt.state.items()}
                tracemalloc.start()
                heap_start = tracemalloc.get_traced_memory()[0]
                resident_start = _resident_bytes()
            if step > WARM_UP and step % 100 == 0:
                gc.collect()
                resident.append(_resident_bytes() - resident_start)
                heap.append(tracemalloc.get_traced_memory()[0] - heap_start)
        tracemalloc.stop()
        assert max(resident) <= 4 * 2**20, resident
        assert max(heap) <= 256 * 2**10, heap
        assert optimizer_state_bytes(opt) == state_bytes
        assert {id(p): sorted(s) for p, s in opt.state.items()} == state_keys
        assert all(s["draws"] == STEPS for s in opt.state.values() if "draws" in s)
        report = opt.drift_report()
        assert len(report) == 3
        for index, drift in report.items():
            assert drift.relative_to_weight <= 1e-5, (index, drift)
        assert opt.nonfinite_skips() == 0
    finally:
        torch.set_num_threads(threads)
