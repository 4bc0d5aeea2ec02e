"""Shared benchmark utilities: the machine, interleaved timing, medians, markdown tables, saving.

Timings on a small shared machine swing by 2x from run to run, so every benchmark here:

* runs all the methods it compares in one process, **interleaved**: repeat ``k`` calls every
  method once (in a rotated order) before repeat ``k+1`` starts, so a burst of load from
  elsewhere hits all of them alike;
* reports **medians** over the repeats, and **ratios computed in the same run**;
* prints the machine (CPU model, threads) and its load average before and after.

Typical use::

    args = parse_args("what this measures")
    times = interleaved_times({"a": fn_a, "b": fn_b}, repeats=args.repeats)
    rows = [[name, fmt_ms(median(ts))] for name, ts in times.items()]
    text = header("My benchmark", machine_info()) + markdown_table(["method", "median ms"], rows)
    save_results("mybench", text, figure)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS_DIR",
    "parse_args",
    "machine_info",
    "header",
    "interleaved_times",
    "median",
    "quartiles",
    "fmt_ms",
    "fmt_ratio",
    "mean_std",
    "markdown_table",
    "save_results",
]

#: Where results go: ``benchmarks/results``, or the folder named by ``LORA_OPTIM_RESULTS_DIR``
#: (the smoke tests of ``tests/test_benchmarks.py`` write there, not over the committed files).
RESULTS_DIR = Path(os.environ.get("LORA_OPTIM_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def parse_args(description: str, *, repeats: int = 15, quick_repeats: int = 5,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (a short run), ``--repeats N`` (default ``repeats``, or ``quick_repeats`` with
    ``--quick``), ``--threads N`` (torch threads; default: torch's), plus what ``extra`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer shapes and repeats)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per method")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else repeats
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPUs, torch threads, load average (1/5/15 min), memory, versions."""
    try:
        load = tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        load = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gib = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": load,
        "memory_gib": memory_gib,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def header(title: str, before: Mapping[str, Any], after: Mapping[str, Any] | None = None) -> str:
    """A markdown title plus one line on the machine; ``after`` adds the load at the end."""
    load = f"load average (1/5/15 min) {before['load_avg']} at start"
    if after is not None:
        load += f", {after['load_avg']} at end"
    return (
        f"# {title}\n\n"
        f"Machine: {before['cpu']}, {before['logical_cpus']} logical CPUs, torch threads "
        f"{before['torch_threads']}, {before['memory_gib']} GiB; {load}; torch {before['torch']}, "
        f"Python {before['python']}.\n\n"
    )


def interleaved_times(
    methods: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1, inner: int = 1,
    collect_garbage: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each method: ``repeats`` rounds, each calling every method once,
    starting at a different method every round (so none always runs first after a pause).

    ``warmup`` untimed rounds come first. ``inner`` calls are timed together and divided (for
    calls too short for the clock). Garbage is collected before each round, not inside a timing.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        if collect_garbage:
            gc.collect()
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            function = methods[name]
            start = time.perf_counter()
            for _ in range(inner):
                function()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """``(q1, q3)`` (inclusive method); both equal the value for a single sample."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def fmt_ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(value: float) -> str:
    """A ratio with 2 decimals (or 3 significant digits when large)."""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sample std`` of ``values`` (the mean alone for one value); ``nan (diverged)``
    when any value is not finite (a run whose loss blew up)."""
    if not all(math.isfinite(v) for v in values):
        return "nan (diverged)"
    if len(values) < 2:
        return f"{statistics.fmean(values):.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells are ``str()``-ed)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_results(name: str, markdown: str, figure: Any | None = None) -> Path:
    """Write ``results/NAME.md`` (and ``results/NAME.png`` from a matplotlib ``figure``); print
    the markdown; return the markdown's path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(markdown, encoding="utf-8")
    if figure is not None:
        figure.savefig(RESULTS_DIR / f"{name}.png", dpi=120, bbox_inches="tight")
    print(markdown)
    return path
