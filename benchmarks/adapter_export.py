"""How much of a run survives export as a PEFT adapter, by rank and by SVD method. Measured on MiniLM.

``lora_optim.export_peft_adapter`` writes ``lora`` runs exactly (their factors) and runs whose
change is not a product of the factors (``random``: the change sums every draw) as a truncated
SVD of ``ΔW = W − W₀`` (:mod:`lora_optim.interop.svd`). This script trains the demo's ``random``
run (:mod:`lora_optim.demo`: the packaged all-MiniLM-L6-v2 classifier on the docstring task, 36
encoder Linear weights at rank 8 redrawn every step, dense head, ``--steps`` steps, default 50),
and a ``lora`` run for reference, then exports ``random`` at every rank in ``--ranks`` and at every
energy threshold in ``--energies``, with the exact SVD (``torch.linalg.svd``) and the randomised
one (``torch.svd_lowrank`` with 2 and 4 power iterations), and reports:

* the share of ``‖ΔW‖_F²`` kept (smallest and median over the 36 modules; exact, not estimated:
  see :mod:`lora_optim.interop.svd`), and the largest gap between the randomised and the exact
  SVD's share over modules;
* the held-out accuracy of the base model with the adapter loaded back by
  ``peft.PeftModel.from_pretrained``, next to the trained model's;
* the adapter's size (its ``adapter_model.safetensors``), against the 40.5 MiB of the 36 dense
  ``ΔW`` in fp32.

No timing unless ``--timing`` (the median wall time of the 36 SVDs per method; measure it on an
idle machine). Output: a markdown table on stdout, saved to
``benchmarks/results/adapter_export.md``, and a plot ``adapter_export.png`` (kept share and
accuracy against rank).

Run ``python benchmarks/adapter_export.py`` (``--quick``: 3 steps on small subsets, ranks 4 and 8,
a smoke test of the script, numbers meaningless and not saved), ``--steps``, ``--ranks``,
``--energies``, ``--threads``, ``--timing``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lora_optim import LoRAAdam, export_peft_adapter
from lora_optim.demo import METHODS, DemoConfig
from lora_optim.interop.svd import truncate_dense
from lora_optim.matrix import as_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, machine_info, markdown_table, save_results  # noqa: E402


def _train(method: str, config: DemoConfig, data) -> tuple[torch.nn.Module, LoRAAdam, torch.nn.Module]:
    from lora_optim.examples import minilm_task as mt

    train, train_labels = data
    base = mt.build_classifier(6, seed=config.seed).eval()
    model = copy.deepcopy(base)
    optimizer = METHODS[method].build(model, METHODS[method].lr, config)
    batches = mt.iterate_batches(train, train_labels, config.batch_size, seed=config.seed, num_epochs=None)
    for _ in range(config.steps):
        mt.cross_entropy_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), optimizer, base


def _reloaded_accuracy(base, path, evaluation) -> float:
    from peft import PeftModel

    from lora_optim.examples import minilm_task as mt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    return mt.evaluate_accuracy(loaded, *evaluation)


def _deltas(model, base, optimizer, scale: bool = False) -> dict[str, torch.Tensor]:
    """``{module name: W − W₀}`` of the low-rank weights (divided by ``s`` with ``scale``, as the
    export factors them)."""
    names = dict(base.named_parameters())
    return {n.removesuffix(".weight"): (as_matrix(p.detach()) - as_matrix(names[n].detach()))
            / (optimizer.factor_scale(p) if scale else 1.0)
            for n, p in model.named_parameters() if p in optimizer.state and optimizer.is_low_rank(p)}


def _svd_seconds(model, base, optimizer, rank: int, method: str, niter: int) -> float:
    """Wall time of the 36 truncated SVDs alone (``--timing``)."""
    deltas = _deltas(model, base, optimizer)
    start = time.perf_counter()
    for delta in deltas.values():
        truncate_dense(delta, rank=rank, method=method, niter=niter)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps on small subsets: a smoke test")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ranks", default=None, help="comma-separated export ranks (default 2,4,8,16,32,64)")
    parser.add_argument("--energies", default="0.5,0.8,0.9,0.95", help="comma-separated energy thresholds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timing", action="store_true", help="also time the SVDs (on an idle machine only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lora_optim.examples import minilm_task as mt

    ranks = [int(r) for r in (args.ranks or ("4,8" if args.quick else "2,4,8,16,32,64")).split(",")]
    energies = [float(e) for e in args.energies.split(",")] if not args.quick else [0.5]
    config = DemoConfig(steps=args.steps or (3 if args.quick else 50), batch_size=8 if args.quick else 16,
                        max_length=32 if args.quick else 64)
    task = mt.build_docstring_task(seed=config.task_seed)
    tokenizer = mt.load_tokenizer()
    count = 64 if args.quick else len(task.train_texts)
    train = (mt.tokenize(task.train_texts[:count], tokenizer, config.max_length), list(task.train_labels[:count]))
    test_count = 16 if args.quick else len(task.test_texts)
    evaluation = (mt.tokenize(task.test_texts[:test_count], tokenizer, config.max_length),
                  list(task.test_labels[:test_count]))
    info = machine_info()
    rows = []
    curves: dict[str, list[tuple[int, float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model, optimizer, base = _train("lora", config, train)
        report = export_peft_adapter(model, optimizer, Path(scratch) / "lora")
        size = (Path(scratch) / "lora" / "adapter_model.safetensors").stat().st_size / 2**20
        rows.append(["lora (exact)", f"{report.modules[0].rank}", "1.000", "1.000", "-", "-",
                     f"{mt.evaluate_accuracy(model, *evaluation):.3f}",
                     f"{_reloaded_accuracy(base, Path(scratch) / 'lora', evaluation):.3f}", f"{size:.2f}", ""])
        model, optimizer, base = _train("random", config, train)
        trained = mt.evaluate_accuracy(model, *evaluation)
        for label, choice in [(f"rank {r}", dict(rank=r)) for r in ranks] + [(f"energy {e}", dict(energy=e))
                                                                                for e in energies]:
            path = Path(scratch) / label.replace(" ", "_")
            exact = export_peft_adapter(model, optimizer, path, base=base, svd="exact", **choice)
            accuracy = _reloaded_accuracy(base, path, evaluation)
            size = (path / "adapter_model.safetensors").stat().st_size / 2**20
            kept = [m.kept for m in exact.modules]
            gaps = [None, None]
            if "rank" in choice:  # the randomised SVD export would use, on the same changes
                deltas = _deltas(model, base, optimizer, scale=True)
                gaps = [max(abs(truncate_dense(deltas[m.module], rank=choice["rank"], method="lowrank",
                                               niter=niter).kept - m.kept) for m in exact.modules)
                        for niter in (2, 4)]
            chosen = [m.rank for m in exact.modules]
            seconds = ""
            if args.timing and "rank" in choice:
                seconds = " / ".join(f"{_svd_seconds(model, base, optimizer, choice['rank'], m, n):.2f}"
                                     for m, n in (("exact", 4), ("lowrank", 2), ("lowrank", 4)))
            rows.append([f"random, {label}", f"{min(chosen)}–{max(chosen)}" if min(chosen) != max(chosen) else
                         str(chosen[0]), f"{min(kept):.3f}", f"{statistics.median(kept):.3f}",
                         *("-" if gap is None else f"{gap:.1e}" for gap in gaps), f"{trained:.3f}",
                         f"{accuracy:.3f}", f"{size:.2f}", seconds])
            if "rank" in choice:
                curves.setdefault("random", []).append((choice["rank"], min(kept), accuracy))
    columns = ["run, export", "rank", "kept (min)", "kept (median)", "lowrank2 − exact (max)",
               "lowrank4 − exact (max)", "trained acc", "PEFT-reloaded acc", "adapter (MiB)"]
    if args.timing:
        columns.append("SVD s: exact / lowrank2 / lowrank4")
    else:
        rows = [row[:len(columns)] for row in rows]
    notes = (
        f"Setup: the demo's runs (`python -m lora_optim.demo`), {config.steps} steps, batch {config.batch_size}"
        f"×{config.max_length}; accuracy on {test_count} held-out docstrings (standard error about "
        f"{100 * (0.8 * 0.2 / test_count) ** 0.5:.0f} points at 80% accuracy). *kept*: share of "
        "‖W − W₀‖²_F in the adapter, over the 36 modules. *lowrankN − exact*: largest difference of that "
        "share, "
        "over the modules, between `torch.svd_lowrank` (q = rank + 10, N power iterations; 4 is the library's) and "
        "`torch.linalg.svd`. The 36 dense "
        "changes would take 40.5 MiB in fp32.\n\n"
    )
    command = "python benchmarks/adapter_export.py " + " ".join(sys.argv[1:])
    text = header("Adapter export: what a truncated SVD keeps", info) + f"Command: `{command.strip()}`\n\n" + notes
    text += markdown_table(columns, rows)
    figure = _plot(curves, trained if curves else None)
    if args.quick:  # a smoke test: its numbers must not replace the committed ones
        print(text)
    else:
        save_results("adapter_export", text, figure)
    return 0


def _plot(curves, trained):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, points in curves.items():
        ranks, kept, accuracy = zip(*points)
        left.plot(ranks, kept, marker="o", label=name)
        right.plot(ranks, accuracy, marker="o", label=f"{name}, PEFT-reloaded")
    if trained is not None:
        right.axhline(trained, color="grey", linestyle="--", label="random, trained")
    left.set(xlabel="export rank", ylabel="kept share of ‖ΔW‖² (min over modules)")
    right.set(xlabel="export rank", ylabel="held-out accuracy")
    ticks = sorted({rank for points in curves.values() for rank, _, _ in points})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(rank) for rank in ticks])
        axis.minorticks_off()
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    raise SystemExit(main())
