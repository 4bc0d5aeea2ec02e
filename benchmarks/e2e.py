"""End-to-end training: tokens per second and training memory of every method, side by side.

Methods (LoRA ones at r = 8, alpha = 16 on every query/key/value/dense Linear; the
classification head is trained densely by every method; everything else is frozen except for
full AdamW, which trains all parameters):

* ``full_adamw``: ``torch.optim.AdamW(fused=True)`` on every parameter.
* ``peft_lora``: HF PEFT LoRA (``lora_dropout=0``) on the encoder, fused AdamW on the adapters
  and the head.
* ``lora_optim_plain``: :class:`lora_optim.LoRAAdam` from full gradients ``G`` (the plain mode).
* ``lora_optim_per_layer``: the same with ``opt.enable_per_layer()``: each weight's ``G`` is
  projected in backward and freed at once; the step happens in ``step()``.
* ``lora_optim_activation``: the same with ``opt.attach(model)``: factor gradients from the
  layers' inputs and output gradients, ``G`` never formed.

Models: the packaged pretrained MiniLM (``lora_optim.examples.minilm_task``, batch 32×64 of the
docstring task), a BERT-base-shaped 110M encoder built from ``transformers.BertConfig()`` with
random weights (batch 8×128 of random tokens), and the same encoder built in bf16 at batch 1×32
(``bert110m-bf16``: the small-batch, low-precision regime, where every write mode's memory
shows). Dropout is 0 in all. The causal-LM regime has its own benchmark, ``benchmarks/llm.py``.

Every (model, method) runs in its own fresh subprocess; methods are interleaved (order rotated)
within each round and rounds are repeated. Per process:

* training memory: the growth of the peak RSS over the first 3 training steps,
  ``VmHWM − VmRSS`` read from ``/proc/self/status`` after resetting the peak
  (``/proc/self/clear_refs``) right before the first step — the same measure for every method;
* speed: the median step time (forward, backward, ``step``, ``zero_grad``) over the steps after
  the first, as tokens per second (batch × sequence length / step time).

Tables report medians over rounds, and ratios of medians. Run ``python benchmarks/e2e.py``
(``--quick`` for one short round); results go to ``benchmarks/results/e2e.md`` and ``e2e.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

METHODS = ("full_adamw", "peft_lora", "lora_optim_plain", "lora_optim_per_layer", "lora_optim_activation")
LABELS = {
    "full_adamw": "full AdamW (fused)",
    "peft_lora": "PEFT LoRA r8 + AdamW",
    "lora_optim_plain": "lora_optim plain (G path)",
    "lora_optim_per_layer": "lora_optim per-layer",
    "lora_optim_activation": "lora_optim activation-side",
}
MODELS = {
    "minilm": {"label": "MiniLM-L6 (22.7M, pretrained)", "batch": 32, "seq": 64},
    "bert110m": {"label": "BERT-base shape (110M, random init)", "batch": 8, "seq": 128},
    "bert110m-bf16": {"label": "BERT-base shape (110M, random init), bf16 weights", "batch": 1, "seq": 32,
                      "bf16": True},
}
TARGETS = ("query", "key", "value", "dense")
RANK, ALPHA, LR = 8, 16.0, 1e-4
MEMORY_STEPS = 3


# ---------------------------------------------------------------------------------- worker


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak_rss() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _build_model(model_name: str, num_labels: int):
    import torch
    from lora_optim.examples import minilm_task as mt

    if model_name == "minilm":
        return mt.build_classifier(num_labels, seed=0, dropout=0.0)
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    previous = torch.get_default_dtype()
    if MODELS[model_name].get("bf16"):  # built in bf16: no fp32 copy sets the peak
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = BertModel(config, add_pooling_layer=False)
    finally:
        torch.set_default_dtype(previous)
    model = mt.MiniLMClassifier(encoder, num_labels, seed=0)
    model.train()
    return model


def _batches(model_name: str, steps: int, num_labels: int):
    import itertools

    import torch
    from lora_optim.examples import minilm_task as mt

    spec = MODELS[model_name]
    if model_name == "minilm":
        task = mt.build_docstring_task(seed=0)
        encodings = mt.tokenize(task.train_texts, mt.load_tokenizer(), max_length=spec["seq"])
        batches = mt.iterate_batches(encodings, task.train_labels, spec["batch"], seed=0, num_epochs=None,
                                     trim_padding=False)
        return list(itertools.islice(batches, steps))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        shape = (spec["batch"], spec["seq"])
        out.append({
            "input_ids": torch.randint(1000, 30000, shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "token_type_ids": torch.zeros(shape, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (spec["batch"],), generator=generator),
        })
    return out


def _target_weights(model):
    from torch import nn

    return [module.weight for name, module in model.encoder.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]


def _setup_method(method: str, model):
    """``(optimizer, handle)``; the model is changed in place (frozen parts, PEFT wrapping)."""
    import torch

    from lora_optim import LoRAAdam

    if method == "full_adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, fused=True), None
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))
        model.encoder = get_peft_model(model.encoder, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=LR, fused=True), None
    for p in model.parameters():
        p.requires_grad_(False)
    weights = _target_weights(model)
    head = list(model.head.parameters())
    for p in weights + head:
        p.requires_grad_(True)
    optimizer = LoRAAdam([{"params": weights, "rank": RANK, "alpha": ALPHA}, {"params": head, "rank": None}], lr=LR)
    handle = None
    if method == "lora_optim_per_layer":
        handle = optimizer.enable_per_layer()
    elif method == "lora_optim_activation":
        handle = optimizer.attach(model)
    return optimizer, handle


def _train_step(model, optimizer, batch) -> float:
    from lora_optim.examples import minilm_task as mt

    loss = mt.cross_entropy_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def memory_worker(model_name: str, method: str, measure: str) -> dict:
    """Training memory of one method in this (fresh) process: ``measure="rss"`` is the growth of
    the peak RSS over the first 3 steps; ``measure="tensors"`` is the peak of live tensor bytes
    (allocator events recorded by ``torch.profiler``) over the same steps, relative to their start."""
    import torch

    num_labels = 6
    batches = _batches(model_name, MEMORY_STEPS, num_labels)
    model = _build_model(model_name, num_labels)
    optimizer, handle = _setup_method(method, model)
    gc.collect()
    if measure == "rss":
        _reset_peak_rss()
        rss_before = _status_mib("VmRSS")
        losses = [_train_step(model, optimizer, batch) for batch in batches]
        memory = _status_mib("VmHWM") - rss_before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            losses = [_train_step(model, optimizer, batch) for batch in batches]
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        memory = peak / 2**20
    from lora_optim import optimizer_state_bytes

    return {"model": model_name, "method": method, "measure": measure, "memory_mib": memory, "losses": losses,
            "state_mib": optimizer_state_bytes(optimizer) / 2**20, "threads": torch.get_num_threads(),
            "handle": None if handle is None else repr(handle)}


def speed_worker(model_name: str, methods: list[str], rounds: int) -> dict:
    """Step times of every method in this one process: one warm-up step each, then ``rounds``
    rounds of one step per method, the order rotated every round."""
    import torch

    num_labels = 6
    batches = _batches(model_name, rounds + 1, num_labels)
    setups = {}
    for method in methods:
        model = _build_model(model_name, num_labels)
        setups[method] = (model, *_setup_method(method, model))
    times: dict[str, list[float]] = {method: [] for method in methods}
    cpu_times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds + 1):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            model, optimizer, _ = setups[method]
            start, cpu_start = time.perf_counter(), time.process_time()
            _train_step(model, optimizer, batches[round_index])
            if round_index:
                times[method].append(time.perf_counter() - start)
                cpu_times[method].append(time.process_time() - cpu_start)
    spec = MODELS[model_name]
    return {"model": model_name, "step_s": times, "cpu_s": cpu_times, "tokens_per_step": spec["batch"] * spec["seq"],
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- driver


def _subprocess(threads: int | None, *worker_args: str) -> dict:
    command = [sys.executable, __file__, "--worker", *worker_args]
    if threads is not None:
        command += ["--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker_args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(memory_runs: list[dict], speed_runs: list[dict], models: list[str], methods: list[str]) -> dict:
    summary: dict = {}
    for model_name in models:
        speed = [r for r in speed_runs if r["model"] == model_name]
        times = {m: [t for r in speed for t in r["step_s"][m]] for m in methods}
        rows = {}
        for method in methods:
            memory = {}
            for measure in ("rss", "tensors"):
                values = [r["memory_mib"] for r in memory_runs
                          if r["model"] == model_name and r["method"] == method and r["measure"] == measure]
                memory[measure] = (statistics.median(values), [round(v) for v in values]) if values else (None, [])
            step = statistics.median(times[method])
            state = next(r["state_mib"] for r in memory_runs if r["model"] == model_name and r["method"] == method)
            rows[method] = {"step_s": step, "tokens_per_s": speed[0]["tokens_per_step"] / step,
                            "steps_timed": len(times[method]), "memory": memory, "state_mib": state}
        # Paired ratios: step i of a method against step i of the reference (same round); and
        # the ratio of median CPU times (user + system of the process, less sensitive to load).
        cpu = {m: [t for r in speed for t in r["cpu_s"][m]] for m in methods}
        for method in methods:
            for reference in ("full_adamw", "peft_lora"):
                if reference in times:
                    ratios = [a / b for a, b in zip(times[method], times[reference])]
                    rows[method][f"paired_vs_{reference}"] = statistics.median(ratios)
                    rows[method][f"cpu_vs_{reference}"] = statistics.median(cpu[method]) / statistics.median(cpu[reference])
        summary[model_name] = rows
    return summary


def _ratio(row: dict, reference: dict | None, key: str) -> str:
    if reference is None or row[key] is None or reference[key] is None:
        return "–"
    return f"{row[key] / reference[key]:.2f}"


def markdown(summary: dict, before: dict, after: dict, command: str) -> str:
    from _common import header

    lines = [
        header("End-to-end training: speed and memory", before, after).rstrip(),
        "",
        "CPU; fp32 weights except where the model says bf16 (there every `LoRAAdam` write mode is its default, "
        "`stochastic`). Only ratios from one run mean anything. No GPU was lent to the session that produced "
        "this file, so there is no GPU table.",
        "",
        f"Command: `{command}`",
        "",
        "* **speed**: all methods of a model in one process, one warm-up step each, then rounds of one "
        "step per method with the order rotated; median step time (forward, backward, `step`, `zero_grad`); "
        "tokens/s = batch × sequence / median step. *paired* = median over rounds of the ratio of the two "
        "methods' steps in the same round. *CPU time*: ratio of the median CPU time (user + system) per step, "
        "less sensitive than wall time to other jobs on the machine.",
        "* **RSS**: growth of the peak RSS over the first 3 training steps (`VmHWM` reset through "
        "`/proc/self/clear_refs` right before step 1, minus `VmRSS` then), one fresh process per method.",
        "* **tensors**: peak of live tensor bytes over the same 3 steps, relative to their start, from the "
        "allocator events of `torch.profiler` (allocator-level: what the tensors need, without the C "
        "allocator's retained free memory), one fresh process per method.",
        "",
    ]
    for model_name, rows in summary.items():
        spec = MODELS[model_name]
        full, peft = rows.get("full_adamw"), rows.get("peft_lora")
        lines += [
            f"## {spec['label']}, batch {spec['batch']}×{spec['seq']}",
            "",
            "| method | tokens/s | step (ms) | step / full AdamW (paired) | step / PEFT (paired) "
            "| CPU time / full AdamW | CPU time / PEFT | RSS growth (MiB) | RSS / PEFT | peak tensors (MiB) "
            "| tensors / PEFT | optimizer state (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in rows.items():
            flat = {"step_s": row["step_s"], "rss": row["memory"]["rss"][0], "tensors": row["memory"]["tensors"][0]}
            flat_full = None if full is None else {"step_s": full["step_s"]}
            flat_peft = None if peft is None else {"step_s": peft["step_s"], "rss": peft["memory"]["rss"][0],
                                                   "tensors": peft["memory"]["tensors"][0]}
            paired_full = f" ({row['paired_vs_full_adamw']:.2f})" if "paired_vs_full_adamw" in row else ""
            paired_peft = f" ({row['paired_vs_peft_lora']:.2f})" if "paired_vs_peft_lora" in row else ""
            cpu_full = f"{row['cpu_vs_full_adamw']:.2f}" if "cpu_vs_full_adamw" in row else "–"
            cpu_peft = f"{row['cpu_vs_peft_lora']:.2f}" if "cpu_vs_peft_lora" in row else "–"
            rss = "–" if flat["rss"] is None else f"{flat['rss']:.0f}"
            tensors = "–" if flat["tensors"] is None else f"{flat['tensors']:.0f}"
            lines.append(
                f"| {LABELS[method]} | {row['tokens_per_s']:.0f} | {row['step_s'] * 1e3:.0f} "
                f"| {_ratio(flat, flat_full, 'step_s')}{paired_full} | {_ratio(flat, flat_peft, 'step_s')}{paired_peft} "
                f"| {cpu_full} | {cpu_peft} "
                f"| {rss} | {_ratio(flat, flat_peft, 'rss')} | {tensors} | {_ratio(flat, flat_peft, 'tensors')} "
                f"| {row['state_mib']:.1f} |"
            )
        lines.append("")
        lines.append(f"Steps timed per method: {rows[next(iter(rows))]['steps_timed']}. Per-process memory "
                     "values (MiB): " + "; ".join(
                         f"{m}: RSS {r['memory']['rss'][1]}, tensors {r['memory']['tensors'][1]}" for m, r in rows.items()))
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict):
    """The figure: tokens/s, RSS growth and peak tensors per method, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 3, figsize=(15, 3.4 * len(summary)), squeeze=False)
    for row_axes, (model_name, rows) in zip(axes, summary.items()):
        labels = [LABELS[m] for m in rows]
        colors = [f"C{METHODS.index(m)}" for m in rows]
        panels = [
            ([r["tokens_per_s"] for r in rows.values()], "tokens / s (higher is better)"),
            ([r["memory"]["rss"][0] or 0 for r in rows.values()], "peak-RSS growth, MiB (lower is better)"),
            ([r["memory"]["tensors"][0] or 0 for r in rows.values()], "peak live tensors, MiB (lower is better)"),
        ]
        for ax, (values, xlabel) in zip(row_axes, panels):
            ax.barh(labels, values, color=colors)
            ax.set_xlabel(xlabel)
            ax.invert_yaxis()
        for ax in row_axes[1:]:
            ax.set_yticklabels([])
        row_axes[0].set_title(f"{MODELS[model_name]['label']}, batch {MODELS[model_name]['batch']}×"
                              f"{MODELS[model_name]['seq']}", loc="left")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: 3 speed rounds, one memory process each")
    parser.add_argument("--rounds", type=int, default=None, help="speed rounds per model (default 8; quick 3)")
    parser.add_argument("--memory-repeats", type=int, default=None,
                        help="fresh RSS processes per (model, method) (default 2; quick 1)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        kind, model_name, *rest = args.worker
        if kind == "memory":
            result = memory_worker(model_name, rest[0], rest[1])
        else:
            result = speed_worker(model_name, rest[0].split(","), int(rest[1]))
        print(json.dumps(result))
        return
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 8)
    repeats = args.memory_repeats if args.memory_repeats is not None else (1 if args.quick else 2)
    models = args.models.split(",")
    methods = args.methods.split(",")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown model(s)/method(s): {unknown}")
    from _common import RESULTS_DIR, machine_info, save_results

    before = machine_info()
    memory_runs: list[dict] = []
    speed_runs: list[dict] = []
    for model_name in models:
        for repeat in range(repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                for measure in ("rss", "tensors") if repeat == 0 else ("rss",):
                    result = _subprocess(args.threads, "memory", model_name, method, measure)
                    memory_runs.append(result)
                    print(f"memory {model_name:9s} {method:22s} {measure:8s} {result['memory_mib']:7.0f} MiB", flush=True)
        result = _subprocess(args.threads, "speed", model_name, ",".join(methods), str(rounds))
        speed_runs.append(result)
        for method in methods:
            print(f"speed  {model_name:9s} {method:22s} median step "
                  f"{statistics.median(result['step_s'][method]) * 1e3:7.0f} ms", flush=True)
    after = machine_info()
    # The workers' thread count (the driver does no torch work).
    before["torch_threads"] = after["torch_threads"] = speed_runs[0]["threads"]
    summary = summarize(memory_runs, speed_runs, models, methods)
    command = "python benchmarks/e2e.py " + " ".join(sys.argv[1:])
    print()
    save_results("e2e", markdown(summary, before, after, command.strip()) + "\n", plot(summary))
    (RESULTS_DIR / "e2e.json").write_text(json.dumps({"machine": [before, after], "memory": memory_runs,
                                                      "speed": speed_runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
