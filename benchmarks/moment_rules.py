"""Which moment rule should the ``random`` projection use at a redraw? Measured on MiniLM.

``LoRAAdam(projection="random")`` redraws its Gaussian factors every ``resample_every`` steps;
at a redraw the Adam moments of the factors are kept, reset, or transported into the new
subspace (:mod:`lora_optim.moment_rules`). This script fine-tunes the packaged all-MiniLM-L6-v2
classifier on the docstring task (:mod:`lora_optim.examples.minilm_task`; 600 train / 150
held-out docstrings, 6 classes) with every rule in ``MOMENT_RULES`` and every
``resample_every`` in ``--every`` (default 1 and 10), for ``--steps`` steps (default 60, batch 16,
``max_length`` 64), over ``--seeds`` training seeds (default 0, 1, 2: data order, head init,
factor draws; the train / held-out split is the same for all). Setup as in
``python -m lora_optim.demo`` (:func:`lora_optim.demo.run_demo`): rank 8, ``alpha`` 16, the 36
encoder Linear weights low-rank, the head dense, the rest frozen, no weight decay. All rule ×
period configurations of one seed train side by side in one process on the same batches.

Reported per configuration: mean ± std over seeds of the held-out accuracy and of the final
training loss (on a fixed set of 128 training docstrings), and the accuracy difference to
``keep`` paired by seed; a run whose loss went non-finite is marked as diverged. Output: a
markdown table on stdout, saved to ``benchmarks/results/moment_rules.md`` (per-seed numbers in
``moment_rules.json``), and a plot ``benchmarks/results/moment_rules.png``.

Run ``python benchmarks/moment_rules.py`` (``--quick``: 4 steps, one seed, small subsets, a
smoke test of the script, numbers meaningless). ``--lr`` (default: the demo's lr of
``random``), ``--rules``, ``--every``, ``--seeds``, ``--eval-split validation`` (score on 100
held-back training docstrings: for lr checks), ``--threads`` (1 is steadier on a shared
machine), ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lora_optim.demo import METHODS, DemoConfig, Method, RunResult, lora_optim_builder, run_demo
from lora_optim.moment_rules import MOMENT_RULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, mean_std  # noqa: E402


def _label(every: int, rule: str) -> str:
    return f"random every={every} {rule}"


def summarize(results: dict[tuple[int, str], list[RunResult]], seeds: list[int]) -> list[dict]:
    """One row per (every, rule): accuracies and losses per seed, and paired differences to keep."""
    rows = []
    for (every, rule), runs in results.items():
        keep = results.get((every, "keep"))
        diffs = [r.accuracy - k.accuracy for r, k in zip(runs, keep)] if keep else []
        rows.append(dict(every=every, rule=rule, acc=[r.accuracy for r in runs], loss=[r.train_loss for r in runs],
                         diff=diffs))
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Moment rule of the `random` projection at a redraw (MiniLM docstring task)",
        "",
        f"`{info['command']}`",
        "",
        f"{info['steps']} steps, batch {info['batch']}×{info['max_length']}, rank 8, alpha 16, lr {info['lr']:g}, "
        f"seeds {info['seeds']} (mean ± std over seeds); {info['eval_name']} accuracy on {info['n_eval']} docstrings, "
        f"train loss on a fixed set of {info['n_loss']} training docstrings. Machine: {info['cpu']}, "
        f"{info['cores']} cores, torch {info['torch']}, {info['threads']} thread(s); load average before "
        f"{info['load_before']}, "
        f"after {info['load_after']}; {info['seconds']:.0f} s.",
        "",
        f"| resample_every | moment rule | {info['eval_name']} acc | Δacc vs keep (paired) | train loss | "
        "acc per seed |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        diff = mean_std(row["diff"]) if row["rule"] != "keep" and row["diff"] else "—"
        per_seed = ", ".join(f"{a:.3f}" for a in row["acc"])
        diverged = sum(not math.isfinite(x) for x in row["loss"])
        if diverged:
            per_seed += f" (loss non-finite in {diverged}/{len(row['loss'])} seeds)"
        lines.append(f"| {row['every']} | {row['rule']} | {mean_std(row['acc'])} | {diff} | "
                     f"{mean_std(row['loss'])} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"every={r['every']}\n{r['rule']}" for r in rows]
    colors = [f"C{list(MOMENT_RULES).index(r['rule'])}" for r in rows]
    for ax, key, title in ((axes[0], "acc", "held-out accuracy"), (axes[1], "loss", "train loss (fixed set)")):
        finite = [[x for x in r[key] if math.isfinite(x)] for r in rows]
        means = [statistics.fmean(v) if v else 0.0 for v in finite]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in finite]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=4)
        for i, v in enumerate(finite):
            ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
            if len(v) < len(rows[i][key]):
                ax.annotate("diverged", (i, 0.0), ha="center", va="bottom", rotation=90, fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title)
    axes[0].set_ylim(bottom=0.0)
    fig.suptitle("random projection: moment rule at a redraw (mean ± std over seeds, dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated int training seeds")
    parser.add_argument("--every", default="1,10", help="comma-separated resample_every values")
    parser.add_argument("--rules", default=",".join(MOMENT_RULES), help="comma-separated moment rules")
    parser.add_argument("--lr", type=float, default=METHODS["random"].lr)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-split", choices=("test", "validation"), default="test",
                        help="score on the held-out docstrings, or on 100 held-back training ones (lr checks)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, seed 0, small subsets")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for moment_rules.md / .png")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    everies = [int(e) for e in args.every.split(",")]
    rules = [r for r in args.rules.split(",") if r]
    unknown = [r for r in rules if r not in MOMENT_RULES]
    if unknown or not rules:
        parser.error(f"--rules: unknown {unknown}; known: {list(MOMENT_RULES)}")
    if args.quick:
        seeds = seeds[:1]
        base = DemoConfig(steps=4, batch_size=8, max_length=32, warmup=1, train_subset=64, eval_subset=16,
                          loss_examples=16, eval_split=args.eval_split)
    else:
        base = DemoConfig(steps=args.steps, eval_split=args.eval_split)
    configs = [(every, rule) for every in everies for rule in rules]
    methods = {
        key: Method(_label(*key), args.lr,
                    lora_optim_builder("random", resample_every=key[0], moment_rule=key[1]), _label(*key))
        for key in configs
    }
    info = dict(command="python benchmarks/moment_rules.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                steps=base.steps, batch=base.batch_size, max_length=base.max_length, lr=args.lr, seeds=seeds,
                n_eval=base.eval_subset or (150 if base.eval_split == "test" else 100), n_loss=base.loss_examples,
                eval_name="held-out" if base.eval_split == "test" else "validation", cpu=machine_info()["cpu"], cores=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), load_before=", ".join(f"{x:.2f}" for x in os.getloadavg()))
    start = time.perf_counter()
    results: dict[tuple[int, str], list[RunResult]] = {key: [] for key in configs}
    for seed in seeds:
        config = DemoConfig(**{**base.__dict__, "seed": seed})
        for key, result in zip(configs, run_demo(config, [(methods[key], args.lr) for key in configs])):
            results[key].append(result)
    info.update(seconds=time.perf_counter() - start, load_after=", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = summarize(results, seeds)
    text = markdown(rows, info)
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moment_rules.md").write_text(text)
    (args.out / "moment_rules.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / "moment_rules.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
