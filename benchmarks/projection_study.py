"""Closing the gap (issue 19): the projections on the eight-class MiniLM task, at equal state bytes.

Runs are listed in :data:`PLAN` (phases) and trained by :func:`_training.train`; each result is
saved to ``benchmarks/results/projection_study.json`` as soon as it finishes, and a rerun skips
the runs already there, so the study can be interrupted and resumed. ``report`` writes the
tables (``projection_study.md``) from the JSON.

Commands::

    python benchmarks/projection_study.py run --phase sweep     # train what is missing
    python benchmarks/projection_study.py run --method additive --lrs 1e-4,2e-4 --seeds 0,1,2 --opt remap_every=1
    python benchmarks/projection_study.py report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info  # noqa: E402
from _training import ResultStore, load_task, spec, train  # noqa: E402

STORE = RESULTS_DIR / "projection_study.json"
SEEDS = (0, 1, 2)


def _grid(method: str, lrs, seeds=SEEDS, **kwargs):
    return [spec(method, lr, seed, **kwargs) for seed in seeds for lr in lrs]


#: The study's runs, by phase (learning rates in the plain parametrisation, alpha = r: s = 1).
#: ``sweep``: an lr grid per projection at equal optimizer-state bytes (lora and additive at rank 8,
#: random redrawn every step at rank 12: it stores no factors), seeds outermost.
PLAN = {
    "sweep": [
        run
        for seed in SEEDS
        for run in (_grid("lora", (5e-4, 1e-3, 2e-3, 4e-3), (seed,))
                    + _grid("random", (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), (seed,), rank=12)
                    + _grid("additive", (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3), (seed,)))
    ],
}


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the missing runs of a phase or of an ad hoc grid")
    run.add_argument("--phase", choices=sorted(PLAN))
    run.add_argument("--method")
    run.add_argument("--lrs", default="")
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--rank", type=int, default=8)
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--store", type=Path, default=STORE)
    sub.add_parser("report", help="write projection_study.md from the JSON")
    args = parser.parse_args(argv)
    if args.command == "run":
        torch.set_num_threads(args.threads)
        if args.phase:
            runs = PLAN[args.phase]
        else:
            options = dict(item.split("=", 1) for item in args.opt)
            options = {k: _parse_value(v) for k, v in options.items()}
            runs = [spec(args.method, float(lr), int(seed), rank=args.rank, steps=args.steps, **options)
                    for seed in args.seeds.split(",") for lr in args.lrs.split(",")]
        store = ResultStore(args.store)
        todo = [r for r in runs if r not in store]
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done; {len(todo)} to train; {machine_info()}", flush=True)
        data = load_task() if todo else None
        for index, r in enumerate(todo):
            start = time.perf_counter()
            result = train(r, data)
            store.add(result)
            print(f"[{index + 1}/{len(todo)}] {r.key()}: acc {result['accuracy']:.3f} loss {result['held_out_loss']:.3f} "
                  f"max dW/W {max(result['change_max'] or [0]):.2e} ({time.perf_counter() - start:.0f} s, load "
                  f"{result['load_avg'][0]:.2f})", flush=True)
        return 0
    raise SystemExit("report: not written yet")


if __name__ == "__main__":
    raise SystemExit(main())
