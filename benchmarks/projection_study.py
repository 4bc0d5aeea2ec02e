"""Closing the gap (issue 19): the projections on the eight-class MiniLM task, at equal state bytes.

Every run trains the packaged MiniLM on the eight-class docstring task (576 train, 576 held-out;
:func:`lora_optim.examples.minilm_task.build_eight_class_task`) for 200 steps of batch 16×64,
the 36 encoder Linear weights low-rank and the head dense, fp32 weights
(``benchmarks/_training.py`` has the setup and what each run measures). Runs are listed in
:data:`PLAN` by phase; each result is saved to ``benchmarks/results/projection_study.json`` as
soon as it finishes, and a rerun skips the runs already there, so the study can be interrupted
and resumed. The report (``projection_study.md``, ``.png``) is written from the JSON.

Phases:

* ``sweep``: a learning-rate grid per projection, 3 seeds, at equal optimizer-state bytes:
  ``lora`` and ``additive`` at rank 8 (factors and moments: ``3·r·(out+in)`` numbers per
  matrix), ``random`` redrawn every step at rank 12 (moments only: ``2·r·(out+in)``). The
  learning rates are the plain parametrisation's (``update_scale="plain"``, ``alpha = r``:
  ``s = 1``); the matched parametrisation is the same runs at ``lr / c`` (see ``docs/choosing.md``);
* ``peft``: PEFT LoRA (rank 8, ``lora_alpha = 8``) at ``lora``'s learning rates, 3 seeds;
* ``variants``: ``random``'s redraw period and moment rule, ``additive``'s redrawn index maps,
  each at equal bytes and at its projection's best learning rate of the sweep, 3 seeds.

Commands::

    python benchmarks/projection_study.py                  # train what is missing, write the report
    python benchmarks/projection_study.py --phase sweep    # one phase
    python benchmarks/projection_study.py --report         # only the report, from the JSON
    python benchmarks/projection_study.py --quick          # smoke run: 2 runs of 3 steps (numbers meaningless)
    python benchmarks/projection_study.py --method additive --lrs 1e-4,2e-4 --opt remap_every=1  # ad hoc
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, header, machine_info, markdown_table, mean_std, save_results  # noqa: E402
from _training import ResultStore, RunSpec, load_task, spec, train  # noqa: E402

SEEDS = (0, 1, 2)
#: Chance level of the eight-class task, and the accuracy below which a run counts as collapsed.
CHANCE, COLLAPSED = 1 / 8, 0.25


def _grid(method: str, lrs, seeds=SEEDS, **kwargs) -> list[RunSpec]:
    return [spec(method, lr, seed, **kwargs) for seed in seeds for lr in lrs]


def _seeds_outermost(runs: list[RunSpec]) -> list[RunSpec]:
    """Seeds outermost, so that an interrupted phase still compares every configuration."""
    return sorted(runs, key=lambda run: run.seed)


LRS = {
    "lora": (5e-4, 1e-3, 2e-3, 4e-3),
    "random": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
    "additive": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
}
#: Equal optimizer-state bytes with ``lora`` at rank 8: ``random`` redrawn every step stores no factors.
EQUAL_BYTES_RANK = {"lora": 8, "random": 12, "additive": 8}

#: The study's runs, by phase.
PLAN: dict[str, list[RunSpec]] = {
    "sweep": _seeds_outermost(
        _grid("lora", LRS["lora"]) + _grid("random", LRS["random"], rank=12) + _grid("additive", LRS["additive"])),
    "peft": _grid("peft", (1e-3, 2e-3)),
    "variants": [],  # filled in once the sweep has named each projection's best lr (see main)
}
QUICK_PLAN = [spec("lora", 1e-3, 0, steps=3), spec("additive", 1e-3, 0, steps=3, remap_every=1)]


# --------------------------------------------------------------------------- report


def _config(result: dict[str, Any]) -> tuple:
    """A run's configuration without its seed."""
    s = result["spec"]
    return (s["method"], s["rank"], s["alpha"], tuple(sorted(s["options"].items())), s["steps"], s["batch"],
            s.get("update_scale", "plain"), s["lr"])


def _label(config: tuple) -> str:
    method, rank, alpha, options, steps, batch, scale, _ = config
    parts = [f"{method} r{rank}"] + [f"{k}={v}" for k, v in options]
    if scale != "plain":
        parts.append(f"update_scale={scale}")
    return ", ".join(parts)


def _groups(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[_config(result)].append(result)
    for runs in groups.values():
        runs.sort(key=lambda r: r["spec"]["seed"])
    return groups


def _accuracy(runs) -> list[float]:
    return [100 * r["accuracy"] for r in runs]


def _collapsed(run) -> bool:
    return run["accuracy"] < COLLAPSED or not math.isfinite(run["held_out_loss"])


def best_lrs(results: list[dict[str, Any]]) -> dict[tuple, float]:
    """For each configuration without its lr, the lr of the best mean held-out accuracy over the
    seeds it has (only lrs run on every seed of that configuration count)."""
    groups = _groups(results)
    seeds_of = defaultdict(set)
    for config, runs in groups.items():
        seeds_of[config[:-1]] |= {r["spec"]["seed"] for r in runs}
    best: dict[tuple, tuple[float, float]] = {}
    for config, runs in groups.items():
        base = config[:-1]
        if {r["spec"]["seed"] for r in runs} != seeds_of[base]:
            continue
        score = statistics.fmean(_accuracy(runs))
        if base not in best or score > best[base][1]:
            best[base] = (config[-1], score)
    return {base: lr for base, (lr, _) in best.items()}


def _paired(runs, reference) -> list[float]:
    by_seed = {r["spec"]["seed"]: r for r in reference}
    return [100 * (r["accuracy"] - by_seed[r["spec"]["seed"]]["accuracy"]) for r in runs if r["spec"]["seed"] in by_seed]


def _peak(run, key="guard_max") -> float:
    values = [v for v in run.get(key, []) if math.isfinite(v)]
    return max(values) if values else float("nan")


def sweep_table(results) -> str:
    groups = _groups(results)
    best = best_lrs(results)
    rows = []
    for config in sorted(groups, key=lambda c: (c[0], c[1], str(c[3]), c[-1])):
        runs = groups[config]
        mark = "**" if best.get(config[:-1]) == config[-1] else ""
        collapsed = sum(_collapsed(r) for r in runs)
        rows.append([f"{mark}{_label(config)}{mark}", f"{config[-1]:g}", f"{mark}{mean_std(_accuracy(runs), 1)}{mark}",
                     mean_std([r["held_out_loss"] for r in runs], 3),
                     ", ".join(f"{a:.1f}" for a in _accuracy(runs)),
                     f"{statistics.fmean(_peak(r) for r in runs):.2g}" if runs[0].get("guard_max") else "–",
                     f"{runs[0]['state_bytes'] / 2**20:.2f}", f"{collapsed}/{len(runs)}" if collapsed else ""])
    return markdown_table(["configuration", "lr", "held-out acc (%)", "held-out loss", "per seed (%)",
                           "largest step ‖ΔW‖/‖W₀‖", "state (MiB)", "collapsed"], rows)


def summary(results) -> dict[str, Any]:
    """The numbers the notebook and the docs quote: per configuration its best lr and accuracies."""
    groups = _groups(results)
    best = best_lrs(results)
    out = {}
    for base, lr in best.items():
        config = (*base, lr)
        out[_label(config)] = {"lr": lr, "accuracy": _accuracy(groups[config]),
                               "state_bytes": groups[config][0]["state_bytes"]}
    return out


def report(store: ResultStore, path_name: str = "projection_study") -> str:
    results = list(store.runs.values())
    machine = machine_info()
    loads = [r["load_avg"][0] for r in results]
    text = header("Closing the gap: projections on the eight-class MiniLM task", machine).rstrip() + "\n\n"
    text += (f"Command: `python benchmarks/projection_study.py`. {len(results)} runs (200 steps of batch 16×64 unless "
             "the configuration says otherwise; 576 held-out docstrings: one run's accuracy has a standard error of "
             "about ±1.7 points); alpha = r (s = 1), plain parametrisation unless `update_scale` is shown. Load average "
             f"at the end of the runs: {min(loads, default=0):.2f} to {max(loads, default=0):.2f} (accuracies do not "
             "depend on load). Bold: each configuration's best lr (mean over seeds). *largest step*: the divergence "
             "guard's largest `s·‖ΔW‖/‖W₀‖` of one step over the 36 matrices and 200 steps, mean over seeds. "
             f"*collapsed*: held-out accuracy below {COLLAPSED:.0%} (chance is {CHANCE:.1%}).\n\n")
    text += "## All configurations\n\n" + sweep_table(results)
    save_results(path_name, text)
    return text


# --------------------------------------------------------------------------- main


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _train_missing(runs: list[RunSpec], store: ResultStore) -> None:
    todo = [r for r in runs if r not in store]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs done; {len(todo)} to train; load {machine_info()['load_avg']}",
          flush=True)
    data = load_task() if todo else None
    for index, run in enumerate(todo):
        start = time.perf_counter()
        result = train(run, data)
        store.add(result)
        print(f"[{index + 1}/{len(todo)}] {run.key()}: acc {result['accuracy']:.3f} loss {result['held_out_loss']:.3f} "
              f"largest step {_peak(result):.2e} ({time.perf_counter() - start:.0f} s, load {result['load_avg'][0]:.2f})",
              flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", action="append", choices=sorted(PLAN), help="train only this phase (repeatable)")
    parser.add_argument("--report", action="store_true", help="only write the report from the JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 runs of 3 steps, then the report")
    parser.add_argument("--method", help="ad hoc runs of this method (with --lrs, --seeds, --rank, --opt)")
    parser.add_argument("--lrs", default="1e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--update-scale", default="plain")
    parser.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="a projection option")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    store = ResultStore(RESULTS_DIR / "projection_study.json")
    if args.quick:
        _train_missing(QUICK_PLAN, store)
    elif args.method:
        options = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.opt)}
        _train_missing([spec(args.method, float(lr), int(seed), rank=args.rank, steps=args.steps,
                             update_scale=args.update_scale, **options)
                        for seed in args.seeds.split(",") for lr in args.lrs.split(",")], store)
    elif not args.report:
        for phase in args.phase or list(PLAN):
            _train_missing(PLAN[phase], store)
    print(report(store))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
