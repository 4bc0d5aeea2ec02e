"""PiSSA's fast SVD: init time and distance to the exact SVD, by number of subspace iterations.

``init="pissa"`` takes ``A = U_r (S_r/s)^½``, ``B = (S_r/s)^½ V_rᵀ`` from the top-``r`` singular
triplets of ``W`` (:func:`lora_optim.projections.lora.singular_factors`). The triplets come from
:func:`lora_optim.truncated_svd.top_singular`: the exact ``torch.linalg.svd`` (``svd_niter=None``)
or the seeded randomized SVD of ``torch.svd_lowrank`` with ``niter`` subspace iterations and
``q = r + oversample`` columns. For each matrix, rank ``r`` and ``niter`` in {0, 1, 2, 4, 8, 16,
exact} this measures, against the exact SVD:

* ``L1(A,B)``: PiSSA's table's error, the mean absolute difference between the fast and the
  exact factors ``A`` and ``B`` (each singular pair's sign aligned to the exact one first), at
  ``s = 1``;
* ``excess``: ``‖W − s·A·B‖_F / ‖W − W_r‖_F − 1``, how much worse than the best rank-``r``
  approximation (Eckart–Young) the fast principal part leaves the residual;
* ``rel. error``: ``‖s·A·B − W_r‖_F / ‖W_r‖_F``, the error of the principal part itself;
* ``sin θ``: the sine of the largest principal angle between the fast and the exact top-``r``
  left singular subspaces;
* the init time (median over repeats of one :func:`singular_factors` call), unless
  ``--no-timing``.

Matrices: the 36 encoder weights of the packaged all-MiniLM-L6-v2 (``query``/``key``/``value``/
attention ``dense`` 384×384, ``intermediate.dense`` 1536×384, ``output.dense`` 384×1536; errors
averaged over the matrices of each shape, times of the first), and two synthetic 4096×4096 fp32
matrices: ``gaussian`` (i.i.d. entries: a flat Marchenko–Pastur spectrum, the hardest case for a
randomized SVD) and ``power-law`` (``σ_i ∝ i^{-1/2}`` with random singular vectors, closer to
trained weights). ``--quick``: 1024×1024 instead of 4096×4096, fewer repeats.

Run ``python benchmarks/svd_init.py`` (the lead times it on an idle machine); results go to
``benchmarks/results/svd_init.md`` and ``svd_init.png``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

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

from lora_optim.projections.lora import singular_factors  # noqa: E402
from lora_optim.truncated_svd import DEFAULT_NITER, DEFAULT_OVERSAMPLE, top_singular  # noqa: E402

NITERS = (0, 1, 2, 4, 8, 16, None)  # None: exact
RANKS = (8, 64)
QUICK_RANKS = (8,)
OVERSAMPLES = (0, DEFAULT_OVERSAMPLE)
BIG, QUICK_BIG = 4096, 1024


def _label(niter: int | None) -> str:
    return "exact" if niter is None else str(niter)


def minilm_matrices() -> dict[str, list[torch.Tensor]]:
    """The 36 encoder Linear weights of the packaged MiniLM, grouped by shape."""
    from lora_optim.examples import minilm_task as mt

    model = mt.load_minilm(dtype=torch.float32)
    groups: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach()
            groups.setdefault(f"MiniLM {weight.shape[0]}×{weight.shape[1]}", []).append(weight)
    return groups


def synthetic_matrices(size: int) -> dict[str, list[torch.Tensor]]:
    """``gaussian`` and ``power-law`` ``size×size`` fp32 matrices from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(size, size, generator=generator) / math.sqrt(size)
    left = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    spectrum = torch.arange(1, size + 1, dtype=torch.float64).pow(-0.5)
    power = ((left * spectrum) @ right.t()).float()
    return {f"gaussian {size}×{size}": [gaussian], f"power-law {size}×{size}": [power]}


def reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact SVD of ``weight`` in fp64 (computed once per matrix)."""
    return torch.linalg.svd(weight.double(), full_matrices=False)


def errors(weight: torch.Tensor, exact: tuple, rank: int, niter: int | None, oversample: int) -> dict[str, float]:
    """The four error measures of one matrix (see the module docstring), in fp64."""
    wide = weight.double()
    U, S, Vh = exact
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    tail = S[rank:].square().sum().sqrt().item()
    u, s, v = top_singular(weight, rank, niter=niter, seed=0, oversample=oversample)
    u, s, v = u.double(), s.double(), v.double()
    signs = torch.sign((u * U[:, :rank]).sum(dim=0))  # align each pair's sign to the exact one
    signs[signs == 0] = 1
    A_fast, B_fast = u * signs * s.sqrt(), (v * signs * s.sqrt()).t()
    A_exact, B_exact = U[:, :rank] * S[:rank].sqrt(), (Vh[:rank].t() * S[:rank].sqrt()).t()
    l1 = torch.cat([(A_fast - A_exact).abs().flatten(), (B_fast - B_exact).abs().flatten()]).mean().item()
    principal = A_fast @ B_fast
    residual = torch.linalg.norm(wide - principal).item()
    overlap = torch.linalg.svdvals(U[:, :rank].t() @ u)  # cosines of the principal angles
    return {
        "l1": l1,
        "excess": residual / tail - 1 if tail > 0 else 0.0,
        "relative": (torch.linalg.norm(principal - best) / torch.linalg.norm(best)).item(),
        "sin": math.sqrt(max(0.0, 1.0 - overlap.min().item() ** 2)),
    }


def run(groups: dict[str, list[torch.Tensor]], ranks, repeats: int, timing: bool) -> list[dict]:
    rows = []
    for name, weights in groups.items():
        exact = [reference(w) for w in weights]
        for rank in ranks:
            print(f"... {name} r={rank}", file=sys.stderr, flush=True)
            times = {}
            if timing:
                calls = {_label(n): (lambda n=n: singular_factors(weights[0], rank, 1.0, niter=n, seed=0))
                         for n in NITERS}
                big = weights[0].numel() >= 4096 * 4096
                times = interleaved_times(calls, repeats=max(1, repeats // 5) if big else repeats, warmup=0 if big else 1)
            for oversample in OVERSAMPLES:
                for niter in NITERS:
                    if niter is None and oversample != OVERSAMPLES[-1]:
                        continue  # the exact SVD has no oversampling
                    measured = [errors(w, e, rank, niter, oversample) for w, e in zip(weights, exact)]
                    mean = {key: sum(m[key] for m in measured) / len(measured) for key in measured[0]}
                    rows.append({"matrix": name, "count": len(weights), "rank": rank, "niter": _label(niter),
                                 "oversample": "" if niter is None else oversample, **mean,
                                 "time": median(times[_label(niter)]) if times and oversample == DEFAULT_OVERSAMPLE else None})
    return rows


def _table(rows: list[dict]) -> str:
    body = [[r["matrix"] + (f" (×{r['count']})" if r["count"] > 1 else ""), r["rank"], r["niter"], r["oversample"],
             f"{r['l1']:.2e}", f"{r['excess']:.2e}", f"{r['relative']:.2e}", f"{r['sin']:.2e}",
             fmt_ms(r["time"]) if r["time"] is not None else ""] for r in rows]
    return markdown_table(["matrix", "r", "niter", "oversample", "L1(A,B)", "excess", "rel. error", "sin θ",
                           "init ms"], body)


def _figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = list(dict.fromkeys(r["matrix"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for matrix in matrices:
        for rank in sorted({r["rank"] for r in rows}):
            subset = [r for r in rows if r["matrix"] == matrix and r["rank"] == rank
                      and r["oversample"] == DEFAULT_OVERSAMPLE]
            xs = [int(r["niter"]) for r in subset]
            axes[0].plot(xs, [max(r["excess"], 1e-17) for r in subset], "-o", markersize=3, label=f"{matrix}, r={rank}")
            axes[1].plot(xs, [max(r["l1"], 1e-17) for r in subset], "-o", markersize=3, label=f"{matrix}, r={rank}")
    for ax, title in zip(axes, ("excess residual over Eckart–Young", "PiSSA's L1 distance of A, B to the exact SVD")):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set_xlabel("niter (subspace iterations)")
        ax.set_title(title)
        ax.axvline(DEFAULT_NITER, color="grey", linestyle=":", linewidth=0.8)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Randomized SVD against the exact SVD (oversample {DEFAULT_OVERSAMPLE}; dotted: default niter)")
    return fig


def main() -> None:
    args = parse_args(
        "PiSSA fast-SVD init: accuracy and time by niter", repeats=7, quick_repeats=3,
        extra=lambda parser: (
            parser.add_argument("--no-timing", action="store_true", help="accuracy only (no init times)"),
            parser.add_argument("--output", default="svd_init", help="results/NAME.md and .png"),
        ),
    )
    before = machine_info()
    groups = minilm_matrices()
    groups.update(synthetic_matrices(QUICK_BIG if args.quick else BIG))
    rows = run(groups, QUICK_RANKS if args.quick else RANKS, args.repeats, timing=not args.no_timing)
    after = machine_info()
    text = header("PiSSA's fast SVD: accuracy and init time by niter", before, after)
    text += (
        f"Command: `python benchmarks/svd_init.py {' '.join(sys.argv[1:])}`. Errors against the exact "
        "`torch.linalg.svd` (fp64 reference), averaged over the matrices of a shape; `L1(A,B)`: PiSSA's "
        "mean absolute difference of the factors at s = 1 (signs aligned); `excess`: ‖W − sAB‖/‖W − W_r‖ − 1; "
        "`rel. error`: ‖sAB − W_r‖/‖W_r‖; `sin θ`: largest principal angle between the top-r left singular "
        "subspaces. `init ms`: median time of one `singular_factors` call (fp32, "
        f"oversample {DEFAULT_OVERSAMPLE}), on the first matrix of a shape"
        + (" (not measured in this run)" if args.no_timing else "") + f". Library default: niter {DEFAULT_NITER}, "
        f"oversample {DEFAULT_OVERSAMPLE}.\n\n"
    )
    text += _table(rows)
    save_results(args.output, text, _figure(rows))


if __name__ == "__main__":
    main()
