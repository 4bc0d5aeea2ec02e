"""The optimizer step of one weight matrix, against the roofline and against peers.

For each shape ``out×in``, rank ``r`` and weight dtype (fp32, bf16), one process times
``opt.step()`` on a single weight ``W`` with a fixed gradient ``G`` (``W``'s dtype), for:

* ``lora_optim`` ``lora``, ``additive``, ``random`` (``resample_every=1``: its factors are
  regenerated from the seed every step, included in the time), ``svd`` (GaLore-style one-sided
  projection; its basis is computed from ``G`` at the first step, run before timing and reported
  on its own, and refreshed every 200 steps, as GaLore's), all with ``precision="nearest"``;
  ``lora (torch path)``: the same step with the compiled kernels off (two skinny GEMMs, a
  concat and one addmm: the straightforward step); for bf16 also ``lora (stochastic)``, the
  default write mode for bf16 weights, and ``lora (compensated)`` (keeps a bf16 compensation
  buffer, more traffic);
* ``torch.optim.AdamW`` foreach and fused (full-rank references);
* GaLore (``galore-torch``, ``proj_type="std"``, ``update_proj_gap=200``; its SVD step is run
  before timing and reported on its own), APOLLO (``apollo-torch``, ``proj="random"``,
  ``proj_type="std"``), Flora (``flora-opt``, ``beta1=0.9``), each at the same ``r``;
* PEFT LoRA: only its optimizer step, fused AdamW on the adapter factors (``out×r`` and
  ``r×in``); the adapter's extra forward/backward work is not counted.

The roofline is measured in the same run, interleaved with the steps: the copy bandwidth from
a 128 MiB fp32 ``copy_`` (bytes read + written per second) and the GEMM rate from a 2048²
fp32 ``mm``. The unavoidable work of a step is reading ``G`` once, reading and writing ``W``
once, and ``8·out·in·r`` flops for ``lora``/``random`` (``G·Bᵀ``, ``Aᵀ·G`` and the rank-2r
update of ``W``; ``5·out·in`` for ``additive``; ``4·out·in·r`` for ``svd``: one projection and a
rank-r update), so

    t_roof = max((|G| + 2·|W|) bytes / copy bandwidth, flops / GEMM rate).

Each case also lists the optimizer state (:func:`lora_optim.optimizer_state_bytes`) of ``svd``,
``lora`` and GaLore after their first step. Methods are interleaved (rotated order) over the
repeats; tables show medians and ratios from this run only.

Compiled rows (``r = 8`` cases): ``lora (compiled)`` is ``torch.compile(opt.step)`` (inductor,
``fullgraph=True``; for bf16 weights ``nearest`` and, as ``lora (stochastic, compiled)``, the
default write mode), against ``AdamW fused (compiled)`` (torch runs its fused kernel outside the graph)
and ``AdamW foreach (compiled)`` (inductor's own AdamW, ``capturable=True``). The compile itself
runs before timing.

The kernel table compares the hand-written CPU kernels (:mod:`lora_optim.kernels`) with the same
math written in torch and compiled by inductor, pass by pass, at the target shapes: the
projection ``(G·Bᵀ, Aᵀ·G)`` (two GEMMs; or two broadcast sums), and the weight-change pass
``W += s·L·R`` (``addmm``; or a broadcast sum, which inductor fuses with the rounding) for fp32
and for each bf16 write mode. The rule (issue 18): the kernels go if the compiled torch math is
within 10% of them.

The first table is not a timing: it is the *GPU shape* of one step of many matrices, counted
with :class:`lora_optim.dispatch_count.DispatchCounter` on the torch path (native kernels off,
the path every GPU takes): aten ops and host syncs per step of 64 weight matrices (32 of
1024×1024 and 32 of 1024×2816, rank 8), for every projection and precision and for the peers,
each at its third step (no first-step work), with an accelerator's block size
(:func:`lora_optim.kernels.paths.accelerator_paths`: one block per weight, where the CPU path
cuts bf16 temporaries into 1 MiB blocks). On an accelerator each op is a kernel launch (views
aside) and each sync stalls the host.

Run ``python benchmarks/step.py`` (``--quick``: small shapes, fewer repeats; ``--ops-only``:
the op table alone); results go to ``benchmarks/results/step.md`` and ``step.png``.
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    fmt_ms,
    fmt_ratio,
    header,
    interleaved_times,
    machine_info,
    markdown_table,
    median,
    parse_args,
    quartiles,
    save_results,
)

from lora_optim import LoRAAdam, optimizer_state_bytes  # noqa: E402
from lora_optim.dispatch_count import DispatchCounter  # noqa: E402
from lora_optim.kernels import native_kernels, use_native  # noqa: E402
from lora_optim.kernels.paths import accelerator_paths  # noqa: E402
from lora_optim.nonfinite import finite_flags  # noqa: E402

SHAPES = [(256, 256), (1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096)]
QUICK_SHAPES = [(256, 256), (1024, 1024)]
RANKS = (8, 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_SHAPES = {(4096, 4096), (4096, 11008)}
#: Targets at the target shapes, r = 8, fp32 (issue 18): the step within 1.3× its roofline and no
#: slower than fused AdamW, both from the same run.
TARGETS = {"lora": 1.3, "additive": 1.3, "random": 1.3}
TARGET_VS_ADAMW = 1.0
COMPILED_RANKS = (8,)
OURS = ("lora", "additive", "random", "svd")
PEERS = ("AdamW foreach", "AdamW fused", "GaLore", "APOLLO", "Flora", "PEFT LoRA (AdamW step)",
         "AdamW fused (compiled)", "AdamW foreach (compiled)")
LR = 1e-5

COPY_ELEMENTS = 32 << 20  # 128 MiB of fp32
GEMM_SIZE = 2048


def _flops(method: str, rows: int, cols: int, rank: int) -> float:
    if method.startswith("additive"):
        return 5.0 * rows * cols
    return (4.0 if method.startswith("svd") else 8.0) * rows * cols * rank


def _lora_optim(param: torch.nn.Parameter, rank: int, projection: str, precision: str, native: bool,
                compiled: bool = False):
    opt = LoRAAdam([param], lr=torch.tensor(LR), rank=rank, alpha=2 * rank, projection=projection,
                   precision=precision)
    if compiled:
        return opt, torch.compile(opt.step, fullgraph=True)

    def step() -> None:
        with use_native(native):
            opt.step()

    return opt, step


def _peer_makers(params: list[torch.nn.Parameter], rank: int) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """How to make each peer optimizer for ``params`` (the configurations of ``../shared/PEERS.md``)."""

    def galore():
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                             "proj_type": "std"}], lr=LR)

    def apollo():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from apollo_torch import APOLLOAdamW
        return APOLLOAdamW([{"params": params, "rank": rank, "proj": "random", "proj_type": "std",
                             "scale_type": "channel", "update_proj_gap": 200, "scale": 1}], lr=LR)

    def flora():
        from flora_opt import Flora
        return Flora(params, lr=LR, rank=rank, beta1=0.9)

    return {
        "AdamW foreach": lambda: torch.optim.AdamW(params, lr=LR, foreach=True),
        "AdamW fused": lambda: torch.optim.AdamW(params, lr=LR, fused=True),
        "GaLore": galore, "APOLLO": apollo, "Flora": flora,
    }


def _peers(param: torch.nn.Parameter, grad: torch.Tensor, rank: int, notes: list[str],
           state_bytes: dict[str, int] | None = None, compiled: bool = False) -> dict[str, Callable[[], None]]:
    """Every peer's step on ``param`` (``param.grad`` set); a peer that fails is left out with a note.
    GaLore's state after its first step goes into ``state_bytes``. With ``compiled``, torch's AdamW
    also as ``torch.compile(opt.step)`` (fused: torch runs its kernel outside the graph; foreach:
    inductor's code)."""
    rows, cols = param.shape
    makers = _peer_makers([param], rank)
    if compiled:
        makers["AdamW fused (compiled)"] = lambda: _compiled_optimizer(torch.optim.AdamW([param], lr=LR, fused=True))
        # capturable: step counts on the device, as a CUDA graph needs (on the CPU in torch 2.13 a
        # non-capturable foreach AdamW fails to trace once another optimizer step was compiled).
        makers["AdamW foreach (compiled)"] = lambda: _compiled_optimizer(
            torch.optim.AdamW([param], lr=LR, foreach=True, capturable=True))
    steps: dict[str, Callable[[], None]] = {}
    for name, make in makers.items():
        try:
            opt = make()
            param.grad = grad
            start = time.perf_counter()
            opt.step()  # first step: state, and GaLore's SVD (every 200 steps after)
            first = time.perf_counter() - start
            if name == "GaLore":
                notes.append(f"GaLore's first step (with its SVD) took {first * 1e3:.0f} ms")
                if state_bytes is not None:
                    state_bytes["GaLore"] = optimizer_state_bytes(opt)
            steps[name] = opt.step
        except Exception as error:  # a peer that cannot run this case is reported, not fatal
            notes.append(f"{name}: not run ({type(error).__name__}: {str(error)[:100]})")
    # PEFT LoRA's optimizer step: fused AdamW on lora_B (out×r) and lora_A (r×in).
    adapters = [torch.nn.Parameter(torch.zeros(rows, rank, dtype=param.dtype)),
                torch.nn.Parameter(torch.randn(rank, cols, dtype=param.dtype) / cols**0.5)]
    for adapter in adapters:
        adapter.grad = torch.randn_like(adapter) * 1e-3
    peft_opt = torch.optim.AdamW(adapters, lr=LR, fused=True)
    steps["PEFT LoRA (AdamW step)"] = peft_opt.step
    return steps


class _compiled_optimizer:
    """An optimizer whose ``step`` is ``torch.compile``d (for the peers' compiled rows)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.step = torch.compile(optimizer.step)
        self.state = optimizer.state


def _with_grad(param: torch.nn.Parameter, grad: torch.Tensor, step: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        param.grad = grad
        step()

    return call


def _roofline_probes() -> dict[str, Callable[[], None]]:
    source = torch.randn(COPY_ELEMENTS)
    target = torch.empty_like(source)
    left = torch.randn(GEMM_SIZE, GEMM_SIZE)
    right = torch.randn(GEMM_SIZE, GEMM_SIZE)
    out = torch.empty(GEMM_SIZE, GEMM_SIZE)
    return {"[copy]": lambda: target.copy_(source), "[gemm]": lambda: torch.mm(left, right, out=out)}


def run_case(rows: int, cols: int, rank: int, dtype_name: str, repeats: int) -> dict:
    """Time every method at one shape/rank/dtype; return medians, quartiles and the roofline."""
    # Every optimizer's step runs through one code object (torch.optim's profiling wrapper), and
    # Dynamo keeps at most ``recompile_limit`` compiled versions of it (one per optimizer):
    # the compiled steps of the previous cases are dropped first.
    torch._dynamo.reset()
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(rows, cols, generator=generator) * 0.02).to(dtype))
    grad = (torch.randn(rows, cols, generator=generator) * 1e-3).to(dtype)
    param.grad = grad
    notes: list[str] = []
    methods: dict[str, Callable[[], None]] = {}
    keep_alive = []
    state_bytes: dict[str, int] = {}
    for projection in OURS:
        opt, step = _lora_optim(param, rank, projection, "nearest", native=True)
        keep_alive.append(opt)
        methods[projection] = step
        if projection in ("svd", "lora"):
            start = time.perf_counter()
            step()  # first step: state, and svd's basis from G (every 200 steps after)
            first = time.perf_counter() - start
            if projection == "svd":
                notes.append(f"svd's first step (with its SVD of G) took {first * 1e3:.0f} ms")
            state_bytes[projection] = optimizer_state_bytes(opt)
    opt, step = _lora_optim(param, rank, "lora", "nearest", native=False)
    keep_alive.append(opt)
    methods["lora (torch path)"] = step
    if dtype == torch.bfloat16:
        for precision in ("stochastic", "compensated"):
            opt, step = _lora_optim(param, rank, "lora", precision, native=True)
            keep_alive.append(opt)
            methods[f"lora ({precision})"] = step
    if rank in COMPILED_RANKS:
        compiled = {"lora (compiled)": "nearest"}
        if dtype == torch.bfloat16:
            compiled["lora (stochastic, compiled)"] = "stochastic"
        for name, precision in compiled.items():
            opt, step = _lora_optim(param, rank, "lora", precision, native=True, compiled=True)
            keep_alive.append(opt)
            start = time.perf_counter()
            param.grad = grad
            step()  # the compile, and the first step
            notes.append(f"{name}: compile and first step {time.perf_counter() - start:.1f} s")
            methods[name] = step
    methods.update(_peers(param, grad, rank, notes, state_bytes, compiled=rank in COMPILED_RANKS))
    notes.append("optimizer state after the first step: " + ", ".join(
        f"{name} {size / 2**20:.3f} MiB" for name, size in state_bytes.items()))
    # Flora sets p.grad = None after its step: every method gets the same G back first.
    methods = {name: _with_grad(param, grad, step) for name, step in methods.items()}
    methods.update(_roofline_probes())
    methods["[finite check]"] = lambda: finite_flags([grad])  # part of every LoRAAdam step
    times = interleaved_times(methods, repeats, warmup=1)
    finite_check = median(times.pop("[finite check]"))
    copy_bandwidth = 2 * COPY_ELEMENTS * 4 / median(times.pop("[copy]"))
    gemm_rate = 2 * GEMM_SIZE**3 / median(times.pop("[gemm]"))
    moved = rows * cols * (grad.element_size() + 2 * param.element_size())
    result = {"rows": rows, "cols": cols, "rank": rank, "dtype": dtype_name, "notes": notes, "finite_check": finite_check,
              "copy_GBps": copy_bandwidth / 1e9, "gemm_GFLOPs": gemm_rate / 1e9, "methods": {}}
    for name, samples in times.items():
        roof = max(moved / copy_bandwidth, _flops(name, rows, cols, rank) / gemm_rate)
        result["methods"][name] = {"median": median(samples), "quartiles": quartiles(samples), "roof": roof}
    del keep_alive, methods, param
    gc.collect()
    return result


KERNEL_SHAPES = [(4096, 4096), (4096, 11008)]
KERNEL_RANK = 8


def _kernel_case(rows: int, cols: int, repeats: int) -> list[list[str]]:
    """One shape of the kernel table: each pass by the native kernel and by inductor (module docstring)."""
    from lora_optim.precision import get_writer
    from lora_optim.projections import FactorChange, get_projection
    from lora_optim.weight_change import weight_delta

    kernels = native_kernels()
    if kernels is None:
        return [[f"{rows}×{cols}", "native kernels not built", "", "", "", ""]]
    torch._dynamo.reset()  # the writers' lambdas share a code object (see run_case)
    r = KERNEL_RANK
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(rows, cols, generator=generator) * 1e-3
    A, B = torch.randn(rows, r, generator=generator), torch.randn(r, cols, generator=generator)
    dA, dB = torch.randn(rows, r, generator=generator) * 1e-3, torch.randn(r, cols, generator=generator) * 1e-3
    left, right = torch.cat((A + dA, dA), dim=1), torch.cat((dB, B), dim=0)
    W = torch.randn(rows, cols, generator=generator) * 0.02
    G16, W16 = G.bfloat16(), W.bfloat16()
    lora = get_projection("lora")
    change = FactorChange(A, B, A + dA, B + dB, dA, dB)

    def gemms(grad, a, b):
        return grad @ b.t(), a.t() @ grad

    def sums(grad, a, b):
        return (grad.unsqueeze(1) * b.unsqueeze(0)).sum(-1), (a.unsqueeze(2) * grad.unsqueeze(1)).sum(0)

    def addmm(weight, l, rr):
        weight.addmm_(l, rr, alpha=0.5)

    def broadcast(weight, l, rr):
        weight.add_((l.unsqueeze(2) * rr.unsqueeze(0)).sum(1), alpha=0.5)

    def writer(name):
        target, write = W16.clone(), get_writer(name)
        state = write.init_state(target, 3)
        return lambda: write.write_(target, state, weight_delta(lora, change, 0.5, None))

    compiled = {name: torch.compile(fn) for name, fn in (("gemms", gemms), ("sums", sums), ("addmm", addmm),
                                                          ("broadcast", broadcast))}
    targets = [W.clone() for _ in range(3)]
    passes = {
        "projection, fp32 G": ({"native": lambda: kernels.project_lowrank(G, A, B)},
                               {"two GEMMs": lambda: compiled["gemms"](G, A, B),
                                "two broadcast sums": lambda: compiled["sums"](G, A, B)}),
        "projection, bf16 G": ({"native": lambda: kernels.project_lowrank(G16, A, B)},
                               {"two GEMMs": lambda: compiled["gemms"](G16.float(), A, B)}),
        "write, fp32 W": ({"native": lambda: kernels.add_lowrank_(targets[0], left, right, 0.5)},
                          {"addmm": lambda: compiled["addmm"](targets[1], left, right),
                           "broadcast sum": lambda: compiled["broadcast"](targets[2], left, right)}),
    }
    for mode in ("nearest", "stochastic", "compensated"):
        eager, traced = writer(mode), torch.compile(writer(mode))
        passes[f"write, bf16 W, {mode}"] = ({"native": eager}, {"broadcast sum + rounding": traced})
    methods: dict[str, Callable[[], object]] = {}
    for name, (native, inductor) in passes.items():
        methods.update({f"{name}|native|{k}": fn for k, fn in native.items()})
        methods.update({f"{name}|inductor|{k}": fn for k, fn in inductor.items()})
    for fn in methods.values():  # compiles, outside the timing
        fn()
    with use_native(True):
        times = interleaved_times(methods, repeats, warmup=1)
    rows_out = []
    for name in passes:
        native_ms = min(median(t) for key, t in times.items() if key.startswith(f"{name}|native|"))
        best_key, best = min(((key, median(t)) for key, t in times.items() if key.startswith(f"{name}|inductor|")),
                             key=lambda kv: kv[1])
        ratio = best / native_ms
        rows_out.append([f"{rows}×{cols}", name, fmt_ms(native_ms), f"{fmt_ms(best)} ({best_key.split('|')[2]})",
                         fmt_ratio(ratio), "yes" if ratio <= 1.10 else "no"])
    return rows_out


def kernel_table(quick: bool, repeats: int) -> str:
    """Native CPU kernels against the same math compiled by inductor (module docstring)."""
    shapes = [(512, 512), (512, 1376)] if quick else KERNEL_SHAPES
    rows = [row for rows_, cols in shapes for row in _kernel_case(rows_, cols, repeats)]
    table = markdown_table(["shape", "pass (r = 8)", "native ms", "inductor ms (best form)", "inductor ÷ native",
                            "within 10%"], rows)
    return (f"Each pass of a step alone, native kernel against inductor's code for the same math (compile "
            f"outside the timing), {repeats} interleaved repeats, medians.\n\n" + table + "\n")


OP_COUNT_SHAPES = [(1024, 1024)] * 32 + [(1024, 2816)] * 32
OP_COUNT_RANK = 8


def _count_step(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], dtype: torch.dtype,
                shapes=OP_COUNT_SHAPES) -> DispatchCounter:
    """Ops of the third step of an optimizer over weights of ``shapes`` (torch path)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(dtype)) for shape in shapes]
    grads = [(torch.randn(shape, generator=generator) * 1e-3).to(dtype) for shape in shapes]
    optimizer = make(params)
    with use_native(False), accelerator_paths(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            for param, grad in zip(params, grads):
                param.grad = grad
            if step < 2:
                optimizer.step()
                continue
            with DispatchCounter() as counter:
                optimizer.step()
    return counter


def op_count_table(quick: bool) -> str:
    """The GPU shape of one step: aten ops and host syncs per step of 64 matrices (module docstring)."""
    shapes = [(128, 128)] * 32 + [(128, 352)] * 32 if quick else OP_COUNT_SHAPES
    count = len(shapes)
    rows = []

    def row(name: str, counter: DispatchCounter) -> None:
        rows.append([name, f"{counter.total / count:.1f}", f"{counter.launches / count:.1f}", str(counter.syncs),
                     str(counter.ops.get("aten._fused_adamw_.default", 0))])

    ours = [("lora", {}), ("random", {}), ("random", {"resample_every": 200}), ("additive", {})]
    for dtype_name, precision in (("fp32", None), ("bf16", "nearest"), ("bf16", None), ("bf16", "compensated")):
        for projection, options in ours:
            def make(params, projection=projection, options=options, precision=precision):
                return LoRAAdam(params, lr=LR, rank=OP_COUNT_RANK, alpha=2 * OP_COUNT_RANK, projection=projection,
                                precision=precision, **options)
            label = f"lora_optim {projection}{' K=200' if options else ''}, {dtype_name} W, " \
                    f"{precision or ('stochastic' if dtype_name == 'bf16' else 'nearest')}"
            row(label, _count_step(make, DTYPES[dtype_name], shapes))
    for name in ("AdamW fused", "AdamW foreach", "GaLore", "APOLLO", "Flora"):
        try:
            row(f"{name}, fp32 W", _count_step(lambda params, name=name: _peer_makers(params, OP_COUNT_RANK)[name](),
                                               torch.float32, shapes))
        except Exception as error:  # a missing peer is reported, not fatal
            rows.append([f"{name}: not run ({type(error).__name__})", "", "", "", ""])

    def peft_adapters(params):  # PEFT's optimizer step: fused AdamW on lora_B (out×r) and lora_A (r×in)
        adapters = [torch.nn.Parameter(torch.zeros(p.shape[0], OP_COUNT_RANK)) for p in params] + [
            torch.nn.Parameter(torch.randn(OP_COUNT_RANK, p.shape[1]) / p.shape[1] ** 0.5) for p in params]
        for adapter in adapters:
            adapter.grad = torch.randn_like(adapter) * 1e-3  # made once, outside the counted step
        return torch.optim.AdamW(adapters, lr=LR, fused=True)

    row("PEFT LoRA (AdamW step on the adapters), fp32", _count_step(peft_adapters, torch.float32, shapes))
    table = markdown_table(["method", "aten ops per matrix", "of which launch a kernel", "host syncs per step",
                            "fused Adam calls"], rows)
    return (f"{count} weight matrices ({shapes[0][0]}×{shapes[0][1]} and {shapes[-1][0]}×{shapes[-1][1]}), rank "
            f"{OP_COUNT_RANK}, torch path, third step. Views (transposes, slices) are ops that launch no kernel. "
            "PEFT's row counts only its optimizer step; its adapters' forward and backward launch more kernels "
            "per layer, which are not counted here.\n\n" + table + "\n")


def _case_table(case: dict) -> str:
    methods = case["methods"]
    fused = methods.get("AdamW fused", {}).get("median")
    rows = []
    for name, m in methods.items():
        q1, q3 = m["quartiles"]
        ours = name.split(" ")[0] in OURS
        rows.append([
            name,
            fmt_ms(m["median"]),
            f"{fmt_ms(q1)}–{fmt_ms(q3)}",
            fmt_ratio(m["median"] / m["roof"]) if ours else "",
            fmt_ratio(m["median"] / fused) if fused else "",
        ])
    roof_lora = methods["lora"]["roof"]
    roof_add = methods["additive"]["roof"]
    title = (
        f"### {case['rows']}×{case['cols']}, r = {case['rank']}, {case['dtype']} weights\n\n"
        f"copy {case['copy_GBps']:.1f} GB/s, GEMM {case['gemm_GFLOPs']:.0f} GFLOP/s → t_roof "
        f"{fmt_ms(roof_lora)} ms (lora/random), {fmt_ms(roof_add)} ms (additive); the exact non-finite "
        f"screen of G alone (one more read of G; steps no longer make it, they check the factor gradients, "
        f"except at an svd refresh): {fmt_ms(case['finite_check'])} ms\n\n"
    )
    notes = "".join(f"- {note}\n" for note in case["notes"])
    table = markdown_table(["method", "median ms", "IQR ms", "× t_roof", "× AdamW fused"], rows)
    return title + table + ("\n" + notes if notes else "") + "\n"


def _summary(cases: list[dict]) -> str:
    rows = []
    for case in cases:
        shape = (case["rows"], case["cols"])
        methods = case["methods"]
        peer_best = min((methods[p]["median"], p) for p in PEERS if p in methods)
        fused = methods.get("AdamW fused", {}).get("median")
        names = [name for name in methods if name.split(" ")[0] in OURS and ("compiled" in name or name in OURS)]
        for name in names:
            m = methods[name]
            ratio = m["median"] / m["roof"]
            versus = m["median"] / fused if fused else float("nan")
            base = name.split(" ")[0]
            target = TARGETS.get(base) if (shape in TARGET_SHAPES and case["rank"] == 8 and case["dtype"] == "fp32"
                                           and name in OURS) else None
            verdict = "" if target is None else (
                "met" if ratio <= target and versus <= TARGET_VS_ADAMW else "NOT met")
            rows.append([
                f"{shape[0]}×{shape[1]}", case["rank"], case["dtype"], name, fmt_ms(m["median"]),
                fmt_ratio(ratio), fmt_ratio(versus), f"≤ {target}, ≤ {TARGET_VS_ADAMW}" if target else "", verdict,
                f"{fmt_ratio(peer_best[0] / m['median'])} ({peer_best[1]})",
                "yes" if m["median"] < peer_best[0] else "NO",
            ])
    return markdown_table(
        ["shape", "r", "W", "method", "median ms", "× t_roof", "× AdamW fused", "target (t_roof, AdamW)", "",
         "fastest peer ÷ ours", "faster than all peers"],
        rows,
    )


def _figure(cases: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(c["dtype"] for c in cases))
    ranks = list(dict.fromkeys(c["rank"] for c in cases))
    all_names = list(dict.fromkeys(n for c in cases for n in c["methods"]))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(all_names)}
    fig, axes = plt.subplots(len(dtypes), len(ranks), figsize=(6.5 * len(ranks), 4.2 * len(dtypes)),
                             squeeze=False, sharey=True)
    for i, dtype in enumerate(dtypes):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            subset = [c for c in cases if c["dtype"] == dtype and c["rank"] == rank]
            labels = [f"{c['rows']}×{c['cols']}" for c in subset]
            names = list(dict.fromkeys(n for c in subset for n in c["methods"]))
            for name in names:
                ys = [c["methods"][name]["median"] / c["methods"]["lora"]["roof"] if name in c["methods"] else None
                      for c in subset]
                style = "-o" if name.split(" ")[0] in OURS else "--x"
                ax.plot(labels, ys, style, label=name, markersize=4, color=colors[name])
            ax.axhline(TARGETS["lora"], color="grey", linewidth=0.8, linestyle=":")
            ax.set_yscale("log")
            ax.set_title(f"{dtype} weights, r = {rank}")
            ax.set_ylabel("step time / t_roof(lora)")
            ax.tick_params(axis="x", labelrotation=20)
    handles = [plt.Line2D([], [], color=colors[n], marker="o" if n.split(" ")[0] in OURS else "x",
                          linestyle="-" if n.split(" ")[0] in OURS else "--") for n in all_names]
    axes[0][-1].legend(handles, all_names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Optimizer step of one weight: median time over the lora roofline (lower is better)")
    return fig


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--output", default="step", help="results/NAME.md and .png")
        parser.add_argument("--ops-only", action="store_true", help="only the op and sync counts (no timing)")

    args = parse_args("Optimizer step vs roofline and peers", repeats=15, quick_repeats=5, extra=extra)
    before = machine_info()  # before any work of this script, so its load is the machine's, not ours
    ops = op_count_table(args.quick)
    if args.ops_only:
        print(ops)
        return
    kernels = native_kernels()
    kernel_text = kernel_table(args.quick, args.repeats)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    cases = []
    for rows, cols in shapes:
        for dtype_name in DTYPES:
            for rank in RANKS:
                print(f"... {rows}×{cols} r={rank} {dtype_name}", file=sys.stderr, flush=True)
                cases.append(run_case(rows, cols, rank, dtype_name, args.repeats))
    after = machine_info()
    text = header("Optimizer step of one weight matrix vs roofline and peers", before, after)
    text += (
        f"Native CPU kernels: {'on' if kernels is not None else 'OFF (torch path)'}. "
        f"{args.repeats} interleaved repeats per method, medians; ratios from this run only. "
        "`× t_roof` uses each method's own roofline (lora/random: 8·out·in·r flops; additive: "
        "5·out·in); PEFT LoRA is its optimizer step only (fused AdamW on the adapters). Command: "
        f"`python benchmarks/step.py {' '.join(sys.argv[1:])}`.\n\n"
        "## GPU shape: ops and host syncs per step\n\n" + ops +
        "\n## Native kernels against inductor\n\n" + kernel_text +
        "\n## Summary\n\n" + _summary(cases) + "\n## Every case\n\n"
    )
    text += "".join(_case_table(case) for case in cases)
    save_results(args.output, text, _figure(cases))


if __name__ == "__main__":
    main()
