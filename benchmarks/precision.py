"""Write modes for bf16 weights: how much of the update each keeps, what it costs.

**Accuracy.** A ``512×512`` bf16 weight with ``|W| ≈ 0.02`` (``W₀ ~ N(0, 0.02²)``) is trained by
``LoRAAdam`` (``lora``, rank 8, ``alpha=16`` so ``s = 2``) towards ``W₀`` plus a rank-8 gap of rms
0.01 (``G = W − W*``: coherent updates that shrink as ``W`` gets there), for 1,000 steps at lr
1e-4 and 1e-3 (and 1e-5, where updates are smallest). For every write mode the table gives

* ``rel. error``: ``‖(W_T − W₀) − E‖ / ‖E‖`` with ``E = s·(A_T B_T − A_0 B_0)`` in fp64: how far
  the weight is from where the factor steps put it (the issue's 1% criterion);
* ``lost share``: ``−⟨(W_T − W₀) − E, E⟩ / ‖E‖²``, the share of the intended change missing
  on average (0 for an unbiased mode; for ``stochastic``: mean ± sd over seeds);
* ``probe``: the same error seen by the cheap user-facing drift check
  (``opt.drift(W).relative_to_change``, 4 probe vectors);
* ``‖W_T − W*‖ / ‖W₀ − W*‖``: what the lost updates do to training.

``compensated (fp32 buffer)`` is not a library mode: it is the same Kahan write with an fp32
buffer, measured here to justify keeping the buffer in ``W``'s dtype. ``fp32 W`` is the same
run with an fp32 weight (``nearest``, exact up to fp32 rounding).

**Memory** (``4096×4096`` bf16, rank 8; ``--quick``: ``1024×1024``): state bytes kept by the
optimizer for the matrix (``optimizer_state_bytes``), and the peak extra resident memory during
one step, measured in a fresh process per mode (peak RSS reset through ``/proc/self/clear_refs``,
``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident set); writers receive the
change as a :class:`~lora_optim.weight_change.WeightDelta` and add it block of rows by block of
rows. **Time** per step for the same matrix, interleaved medians.

Run ``python benchmarks/precision.py`` (``--quick``: ``256×256`` accuracy runs, fewer seeds and
repeats; ``--threads N``); results go to ``benchmarks/results/precision.md`` and ``precision.png``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    fmt_ms,
    header,
    interleaved_times,
    machine_info,
    markdown_table,
    median,
    parse_args,
    save_results,
)

from lora_optim import LoRAAdam, optimizer_state_bytes  # noqa: E402
from lora_optim.precision import CompensatedWriter, register_writer  # noqa: E402

RANK, ALPHA, STEPS = 8, 16.0, 1000
LRS = (1e-5, 1e-4, 1e-3)


@register_writer
class CompensatedFp32Buffer(CompensatedWriter):
    """Benchmark only: the Kahan write of ``compensated`` with an fp32 buffer (4 bytes/element)."""

    name = "compensated (fp32 buffer)"

    def init_state(self, weight: torch.Tensor, seed: int) -> dict[str, Any]:
        return {"weight_compensation": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)}


def accuracy_run(precision: str, lr: float, size: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One 1,000-step regression run; the metrics of the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter((torch.randn(size, size, generator=gen) * 0.02).to(dtype))
    start = weight.detach().double().clone()
    gap = torch.randn(size, RANK, generator=gen) @ torch.randn(RANK, size, generator=gen) / RANK**0.5
    target = start + 0.01 * gap.double()
    target32 = target.float()
    opt = LoRAAdam([weight], lr=lr, rank=RANK, alpha=ALPHA, precision=precision, seed=seed, drift_probes=4)
    A0, B0 = (x.double() for x in opt.get_factors(weight))
    for _ in range(STEPS):
        weight.grad = (weight.detach().float() - target32).to(dtype)
        opt.step()
    A, B = (x.double() for x in opt.get_factors(weight))
    expected = (ALPHA / RANK) * (A @ B - A0 @ B0)
    error = weight.detach().double() - start - expected
    return {
        "relative_error": (torch.linalg.norm(error) / torch.linalg.norm(expected)).item(),
        "lost_share": (-(error * expected).sum() / (expected * expected).sum()).item(),
        "probe": opt.drift(weight).relative_to_change,
        "distance": (torch.linalg.norm(weight.detach().double() - target) / torch.linalg.norm(start - target)).item(),
    }


def accuracy_table(size: int, seeds: int) -> tuple[str, dict]:
    modes = [("nearest", 1), ("stochastic", seeds), ("compensated", 1), ("compensated (fp32 buffer)", 1)]
    rows, results = [], {}
    for lr in LRS:
        for precision, runs in modes:
            got = [accuracy_run(precision, lr, size, seed=s) for s in range(runs)]
            results[(lr, precision)] = got
            rows.append([f"{lr:g}", precision, *_cells(got)])
        got = [accuracy_run("nearest", lr, size, dtype=torch.float32)]
        results[(lr, "fp32 W")] = got
        rows.append([f"{lr:g}", "fp32 W (nearest)", *_cells(got)])
    table = markdown_table(
        ["lr", "write mode", "rel. error", "lost share", "probe (drift check)", "‖W_T − W*‖ / ‖W₀ − W*‖"], rows
    )
    return table, results


def _mean_sd(values: list[float], digits: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, digits)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{format(mean, digits)} ± {format(sd, digits)} (n={len(values)})"


def _cells(runs: list[dict]) -> list[str]:
    return [
        _mean_sd([r["relative_error"] for r in runs], ".2%"),
        _mean_sd([r["lost_share"] for r in runs], "+.2%"),
        _mean_sd([r["probe"] for r in runs], ".2%"),
        _mean_sd([r["distance"] for r in runs], ".3f"),
    ]


# ------------------------------------------------------------------------------------ memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(precision: str, size: int) -> None:
    """In a fresh process: state bytes and the peak extra resident memory of one step."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.empty(size, size, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
    weight.grad = torch.empty(size, size, dtype=torch.bfloat16).normal_(0, 1, generator=gen)
    opt = LoRAAdam([weight], rank=RANK, precision=precision)
    for _ in range(2):
        opt.step()
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set size (VmHWM)
    opt.step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"state_bytes": optimizer_state_bytes(opt), "peak_extra_bytes": (peak - before) * 1024}))


def memory_rows(size: int) -> list[list[str]]:
    rows = []
    weight_bytes = size * size * 2
    for precision in ("nearest", "stochastic", "compensated"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(
            [sys.executable, __file__, "--child-memory", precision, str(size), "--threads",
             str(torch.get_num_threads())],
            check=True, capture_output=True, text=True, env=env,
        ).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        factors = 3 * RANK * (size + size) * 4
        kept = measured["state_bytes"] - factors
        rows.append([
            precision,
            f"{measured['state_bytes'] / 2**20:.2f}",
            f"{kept / 2**20:.2f} ({kept / weight_bytes:.0%} of W)",
            f"{measured['peak_extra_bytes'] / 2**20:.1f}",
        ])
    return rows


def time_rows(size: int, repeats: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    steps = {}
    for precision in ("nearest", "stochastic", "compensated"):
        weight = nn.Parameter(torch.empty(size, size, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
        weight.grad = torch.empty(size, size, dtype=torch.bfloat16).normal_(0, 1, generator=gen)
        steps[precision] = LoRAAdam([weight], rank=RANK, lr=1e-4, precision=precision).step
    times = interleaved_times(steps, repeats=repeats)
    base = median(times["nearest"])
    return [[name, fmt_ms(median(ts)), f"{median(ts) / base:.2f}"] for name, ts in times.items()]


def figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["nearest", "stochastic", "compensated", "compensated (fp32 buffer)", "fp32 W"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for offset, lr in zip((-width, 0.0, width), LRS):
        values = [sum(r["relative_error"] for r in results[(lr, m)]) / len(results[(lr, m)]) for m in modes]
        ax.bar([i + offset for i in range(len(modes))], values, width, label=f"lr {lr:g}")
    ax.axhline(0.01, color="k", linestyle="--", linewidth=1, label="1%")
    ax.set_yscale("log")
    ax.set_xticks(range(len(modes)), [m.replace(" (", "\n(") for m in modes], fontsize=8)
    ax.set_ylabel("‖(W_T − W₀) − E‖ / ‖E‖")
    ax.set_title(f"bf16 W after {STEPS} steps: error against the fp64 change of the factors")
    ax.legend()
    return fig


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-memory":
        if "--threads" in sys.argv:
            torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        child_memory(sys.argv[2], int(sys.argv[3]))
        return
    args = parse_args("bf16 write modes: accuracy, memory, time", repeats=11, quick_repeats=3)
    warnings.simplefilter("ignore")
    before = machine_info()
    size, seeds, memory_size = (256, 3, 1024) if args.quick else (512, 5, 4096)
    accuracy, results = accuracy_table(size, seeds)
    memory = memory_rows(memory_size)
    timing = time_rows(memory_size, args.repeats)
    after = machine_info()
    text = header("Write modes for bf16 weights", before, after)
    text += (
        f"Command: `python benchmarks/precision.py{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`.\n\n"
        f"## Accuracy: {size}×{size} bf16 W, |W| ≈ 0.02, rank {RANK}, s = {ALPHA / RANK:g}, {STEPS} steps\n\n"
        "`rel. error` = ‖(W_T − W₀) − E‖/‖E‖ with E = s·(A_T B_T − A_0 B_0) in fp64; `lost share` = "
        "−⟨(W_T − W₀) − E, E⟩/‖E‖² (share of the change missing on average); `probe` = the drift "
        "check's relative_to_change (4 probe vectors); stochastic: mean ± sd over seeds.\n\n"
        + accuracy
        + f"\n## Memory: {memory_size}×{memory_size} bf16 W, rank {RANK} "
        f"(W itself: {memory_size * memory_size * 2 / 2**20:.0f} MiB)\n\n"
        "Kept = optimizer state for the matrix (factors and moments: "
        f"{3 * RANK * 2 * memory_size * 4 / 2**20:.2f} MiB in every mode) and what the mode adds. "
        "Peak extra = peak resident memory during one step above the resident memory before it "
        "(the whole step: projection, Adam, write), in a fresh process per mode.\n\n"
        + markdown_table(
            ["write mode", "state kept (MiB)", "added by the mode (MiB)", "peak extra during a step (MiB)"],
            memory,
        )
        + f"\n## Time per step: {memory_size}×{memory_size} bf16 W, rank {RANK} "
        f"(medians of {args.repeats} interleaved repeats)\n\n"
        + markdown_table(["write mode", "median ms", "÷ nearest"], timing)
    )
    save_results("precision", text, figure(results))


if __name__ == "__main__":
    main()
