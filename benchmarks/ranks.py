"""Which rank? Every projection at several ranks on the MiniLM docstring task.

Fine-tunes the packaged all-MiniLM-L6-v2 classifier (:mod:`lora_optim.examples.minilm_task`;
600 train / 150 held-out docstrings, 6 classes) with ``LoRAAdam`` for every projection in
``--projections`` (default ``lora``, ``random``, ``additive``) at every rank in ``--ranks``
(default 2, 4, 8, 16, 32), over ``--seeds`` (default 0 and 1: data order, head init, factor
draws). Setup as ``python -m lora_optim.demo`` (:func:`lora_optim.demo.run_demo`): 50 steps of
batch 16×64, the 36 encoder Linear weights low-rank with ``alpha = 2r`` (so ``s = 2`` at every
rank, PEFT's convention of fixing ``alpha/r``), the head dense, the rest frozen, each
projection at the demo's learning rate. The projections of one (rank, seed) train side by side
in one process on the same batches.

Reported per (projection, rank): held-out accuracy and final training loss (fixed set of 128
training docstrings), mean ± std over seeds; optimizer state
(:func:`lora_optim.optimizer_state_bytes`) and the median ``opt.step`` time. Output: a markdown
table on stdout, saved to ``benchmarks/results/ranks.md`` (per-seed numbers in ``ranks.json``)
and a plot ``ranks.png``.

``python benchmarks/ranks.py`` (about 10 minutes on an idle 2-core machine); ``--quick``: 3
steps on small subsets, one seed, ranks 2 and 8 (a smoke run; numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lora_optim.demo import METHODS, DemoConfig, RunResult, run_demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, mean_std  # noqa: E402

PROJECTIONS = ("lora", "random", "additive")


def summarize(results: dict[tuple[str, int], list[RunResult]]) -> list[dict]:
    """One row per (projection, rank), per-seed values kept."""
    return [dict(projection=projection, rank=rank, lr=runs[0].lr,
                 acc=[r.accuracy for r in runs], loss=[r.train_loss for r in runs],
                 state_mib=runs[0].state_bytes / 2**20,
                 opt_step_ms=statistics.median(r.optimizer_step_seconds for r in runs) * 1e3)
            for (projection, rank), runs in results.items()]


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Rank of each projection (MiniLM docstring task)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} logical CPUs, torch {info['torch']}, {info['threads']} "
        f"thread(s); load average (1/5/15 min) ({info['load_before']}) at start, ({info['load_after']}) at end; "
        f"{info['seconds']:.0f} s.",
        "",
        f"Command: `{info['command']}`. {info['steps']} steps, batch {info['batch']}×{info['max_length']}, "
        f"alpha = 2r, seeds {info['seeds']} (mean ± std over seeds); held-out accuracy on {info['n_eval']} "
        f"docstrings (one docstring = {100 / info['n_eval']:.2f} points), train loss on a fixed set of "
        f"{info['n_loss']} training docstrings. *opt.step*: median of the optimizer call, timed in the run "
        "(comparable between rows of this file only).",
        "",
        "| projection | rank | lr | held-out acc | train loss | opt state (MiB) | opt.step (ms) | acc per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        per_seed = ", ".join(f"{a:.3f}" for a in row["acc"])
        lines.append(f"| {row['projection']} | {row['rank']} | {row['lr']:g} | {mean_std(row['acc'])} | "
                     f"{mean_std(row['loss'])} | {row['state_mib']:.2f} | {row['opt_step_ms']:.1f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, projection in enumerate(dict.fromkeys(r["projection"] for r in rows)):
        mine = [r for r in rows if r["projection"] == projection]
        ranks = [r["rank"] for r in mine]
        for ax, key in ((axes[0], "acc"), (axes[1], "loss")):
            means = [statistics.fmean(r[key]) for r in mine]
            stds = [statistics.stdev(r[key]) if len(r[key]) > 1 else 0.0 for r in mine]
            ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=3, color=f"C{i}", label=projection)
    for ax, title in ((axes[0], "held-out accuracy"), (axes[1], "train loss (fixed set)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r (alpha = 2r)")
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("LoRAAdam projections by rank, MiniLM docstring task (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,4,8,16,32", help="comma-separated ranks")
    parser.add_argument("--projections", default=",".join(PROJECTIONS), help="comma-separated demo methods")
    parser.add_argument("--seeds", default="0,1", help="comma-separated int training seeds")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, seed 0, ranks 2 and 8")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for ranks.md / .json / .png")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    projections = [p for p in args.projections.split(",") if p]
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown or not projections:
        parser.error(f"--projections: unknown {unknown}; known: {list(PROJECTIONS)}")
    if min(ranks) < 1:
        parser.error("--ranks must be positive")
    if args.quick:
        seeds, ranks = seeds[:1], [2, 8]
        base = DemoConfig(steps=3, batch_size=8, max_length=32, warmup=1, train_subset=64, eval_subset=16,
                          loss_examples=16)
    else:
        base = DemoConfig(steps=args.steps)
    info = dict(command="python benchmarks/ranks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                steps=base.steps, batch=base.batch_size, max_length=base.max_length, seeds=seeds,
                n_eval=base.eval_subset or 150, n_loss=base.loss_examples, cpu=machine_info()["cpu"], cores=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                load_before=", ".join(f"{x:.2f}" for x in os.getloadavg()))
    start = time.perf_counter()
    results: dict[tuple[str, int], list[RunResult]] = {(p, r): [] for p in projections for r in ranks}
    for rank in ranks:
        for seed in seeds:
            config = DemoConfig(**{**base.__dict__, "rank": rank, "seed": seed})
            runs = [(p, METHODS[p].lr) for p in projections]
            for projection, result in zip(projections, run_demo(config, runs)):
                results[(projection, rank)].append(result)
    info.update(seconds=time.perf_counter() - start, load_after=", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = summarize(results)
    text = markdown(rows, info)
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranks.md").write_text(text)
    (args.out / "ranks.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / "ranks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
