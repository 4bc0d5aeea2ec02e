"""Causal-LM fine-tuning in the LLM regime: bf16 weights, small batches, with and without
activation checkpointing; training memory and step time, side by side with PEFT LoRA.

The model is a Llama built from a ``LlamaConfig`` with random weights (memory and time do not
depend on the values): 12 layers, hidden 768, MLP 2048, 12 heads, vocabulary 32,000, untied
output layer: 134M parameters, built directly in bf16 (``torch.set_default_dtype``, so no fp32
copy sets the peak). Every method adapts the seven projections of every layer (``q, k, v, o,
gate, up, down``: 85M parameters) at r = 16, alpha = 32, and trains nothing else; the batch is
random tokens, the loss the model's own next-token cross entropy.

Methods:

* ``peft``: HF PEFT LoRA (``lora_dropout=0``; PEFT keeps the adapters in fp32 and casts each
  adapted layer's input to fp32), fused AdamW on the adapters;
* ``plain`` / ``per_layer`` / ``activation``: :class:`lora_optim.LoRAAdam` in the plain mode
  (``G`` in ``p.grad``), the per-layer mode (``opt.enable_per_layer()``) and the activation-side
  mode (``opt.attach(model)``), each with every bf16 write mode: ``stochastic`` (the default),
  ``compensated`` (a Kahan buffer of the weights' size) and ``nearest``.

Activation checkpointing is Hugging Face's ``gradient_checkpointing_enable`` with
``use_reentrant=False`` (one checkpoint per decoder layer).

Per process (a fresh one for every measurement):

* **memory**: training memory = the growth of the peak over what the loaded base model holds,
  through the method's set-up (PEFT's adapters, the optimizer) and 3 training steps. *RSS*: the
  peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``) minus the RSS after loading, the
  least of ``--memory-repeats`` processes (the C allocator's retained memory swings from run to
  run, ``../shared/DESIGN.md``); *tensors*: the peak of live tensor bytes from the allocator
  events of ``torch.profiler`` over the same span (what the tensors need; it does not swing).
* **speed**: all methods of one checkpointing setting in one process, each on its own copy of
  the model; one warm-up step each, then rounds of one step per method with the order rotated;
  median step time (forward, backward, ``step``, ``zero_grad``), and the median over rounds of
  each method's step over PEFT's in the same round.

The 7B table is computed from bytes per parameter for Llama-2-7B's shapes (no run): what the
optimizer and the mode keep or make besides the weights and the common activations, and the
adapted layers' saved inputs, which differ (PEFT saves an fp32 copy of the input of every adapted
layer; the G path and the activation-side mode save the bf16 input once per distinct input).

Run ``python benchmarks/llm.py`` (``--quick`` for a smoke run); results go to
``benchmarks/results/llm.md`` and ``llm.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WRITE_MODES = ("stochastic", "compensated", "nearest")
MODES = ("plain", "per_layer", "activation")
METHODS = ("peft",) + tuple(f"{mode}/{write}" for mode in MODES for write in WRITE_MODES)
MODE_LABELS = {"plain": "lora_optim plain (G path)", "per_layer": "lora_optim per-layer",
               "activation": "lora_optim activation-side"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR = 16, 32.0, 1e-4
MEMORY_STEPS = 3
#: The measured model (see the module docstring) and a tiny one for smoke runs.
SIZES = {
    "134m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}


def label(method: str) -> str:
    """A table label for a method name."""
    if method == "peft":
        return "PEFT LoRA r16 + AdamW"
    mode, write = method.split("/")
    return f"{MODE_LABELS[mode]}, {write}" + (" (default)" if write == "stochastic" else "")


# ---------------------------------------------------------------------------------- worker


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:  # 5: reset VmHWM (Linux >= 4.0)
        clear_refs.write("5")


def build_model(size: str, checkpointing: bool):
    """A random-weight Llama of ``SIZES[size]`` in bf16, in training mode, without a KV cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_batches(size: str, batch: int, seq: int, steps: int):
    """``steps`` batches of random tokens (seeded), the labels the inputs themselves."""
    import torch

    generator = torch.Generator().manual_seed(1)
    vocab = SIZES[size]["vocab_size"]
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(steps)]


def setup_method(method: str, model):
    """``(model, optimizer)`` for ``method``; the model is changed in place (frozen, PEFT-wrapped)."""
    import torch
    from torch import nn

    from lora_optim import LoRAAdam

    if method == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(TARGETS)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=LR, fused=True)
    mode, write = method.split("/")
    model.requires_grad_(False)
    weights = [module.weight for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = LoRAAdam(weights, lr=LR, rank=RANK, alpha=ALPHA, precision=write)
    if mode == "per_layer":
        optimizer.enable_per_layer()
    elif mode == "activation":
        optimizer.attach(model)
    return model, optimizer


def train_step(model, optimizer, tokens) -> float:
    """Forward, backward, ``step``, ``zero_grad``; the loss."""
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def memory_worker(size: str, method: str, measure: str, batch: int, seq: int, checkpointing: bool) -> dict:
    """Training memory of ``method`` in this fresh process (module docstring): ``measure`` is
    ``"rss"`` or ``"tensors"``."""
    batches = make_batches(size, batch, seq, MEMORY_STEPS)
    model = build_model(size, checkpointing)
    gc.collect()
    if measure == "rss":
        _reset_peak_rss()
        rss_before = _status_mib("VmRSS")
        model, optimizer = setup_method(method, model)
        losses = [train_step(model, optimizer, tokens) for tokens in batches]
        memory = _status_mib("VmHWM") - rss_before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, optimizer = setup_method(method, model)
            losses = [train_step(model, optimizer, tokens) for tokens in batches]
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        memory = peak / 2**20
    return {"method": method, "measure": measure, "checkpointing": checkpointing, "memory_mib": memory,
            "losses": losses}


def speed_worker(size: str, methods: list[str], rounds: int, batch: int, seq: int, checkpointing: bool) -> dict:
    """Step times of every method in this one process (module docstring)."""
    import torch

    batches = make_batches(size, batch, seq, rounds + 1)
    setups = {method: setup_method(method, build_model(size, checkpointing)) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(rounds + 1):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            model, optimizer = setups[method]
            start = time.perf_counter()
            train_step(model, optimizer, batches[round_index])
            if round_index:
                times[method].append(time.perf_counter() - start)
    return {"checkpointing": checkpointing, "step_s": times, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- 7B estimate

#: Llama-2-7B: hidden, MLP, layers, vocabulary.
LLAMA7B = dict(hidden=4096, mlp=11008, layers=32, vocab=32000)


def estimate_7b(rank: int = RANK, batch: int = 4, seq: int = 512) -> list[list[str]]:
    """Rows of the 7B table (GiB): weights, optimizer state, the mode's gradients or buffers, the
    adapted layers' saved inputs at ``batch × seq`` tokens without checkpointing, and the total."""
    h, m, layers, vocab = LLAMA7B["hidden"], LLAMA7B["mlp"], LLAMA7B["layers"], LLAMA7B["vocab"]
    shapes = [(h, h)] * 4 + [(m, h), (m, h), (h, m)]  # q k v o, gate up (out×in), down
    adapted = layers * sum(o * i for o, i in shapes)
    weights = adapted + 2 * vocab * h + layers * 2 * h + h  # + embeddings, output, norms
    factor_numbers = layers * sum(rank * (o + i) for o, i in shapes)
    largest_matrix = max(o * i for o, i in shapes)
    tokens = batch * seq
    # Saved inputs of the adapted layers, per token and layer: PEFT casts each adapted layer's
    # input to fp32 (q, k, v, o, gate, up: h each; down: m); the others save each distinct bf16
    # input once (attention input, o's input, MLP input: h each; down's input: m).
    peft_inputs = layers * tokens * 4 * (6 * h + m)
    bf16_inputs = layers * tokens * 2 * (3 * h + m)
    gib = 2.0**30
    rows = []

    def row(name: str, state: float, transient: float, inputs: float, note: str) -> None:
        total = 2 * weights + state + transient + inputs
        rows.append([name, f"{2 * weights / gib:.2f}", f"{state / gib:.2f}", f"{transient / gib:.2f}",
                     f"{inputs / gib:.2f}", f"{total / gib:.2f}", note])

    # PEFT: fp32 adapters with their gradients and two moments.
    row("PEFT LoRA (fp32 adapters, AdamW)", 12 * factor_numbers, 4 * factor_numbers, peft_inputs,
        "adapters, their gradients and moments in fp32")
    # lora_optim: fp32 factors and two moments; the step's factor gradients and copies (3 × factors).
    for mode, transient, note in (
        ("plain", 2 * adapted, "every G (bf16) until the step"),
        ("per-layer", 2 * largest_matrix, "one layer's G (bf16) at a time"),
        ("activation-side", 0, "no G"),
    ):
        for write, kept in (("stochastic", 0), ("compensated", 2 * adapted)):
            row(f"lora_optim {mode}, {write}", 12 * factor_numbers + kept, transient + 12 * factor_numbers,
                bf16_inputs, note + ("; Kahan buffer of every adapted W" if kept else ""))
    return rows


# ---------------------------------------------------------------------------------- driver


def _subprocess(threads: int | None, *worker_args: str) -> dict:
    command = [sys.executable, __file__, "--worker", *worker_args]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker_args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_table(runs: list[dict], methods: list[str], checkpointing: bool) -> tuple[list[list[str]], dict]:
    rows, summary = [], {}
    for method in methods:
        rss = [r["memory_mib"] for r in runs if r["method"] == method and r["measure"] == "rss"
               and r["checkpointing"] == checkpointing]
        tensors = [r["memory_mib"] for r in runs if r["method"] == method and r["measure"] == "tensors"
                   and r["checkpointing"] == checkpointing]
        if not rss:
            continue
        summary[method] = {"rss": min(rss), "rss_runs": rss, "tensors": min(tensors) if tensors else None}
    peft = summary.get("peft")
    for method, values in summary.items():
        rss_ratio = f"{values['rss'] / peft['rss']:.2f}" if peft else "–"
        tensors = "–" if values["tensors"] is None else f"{values['tensors']:.0f}"
        tensor_ratio = (f"{values['tensors'] / peft['tensors']:.2f}"
                        if peft and values["tensors"] is not None and peft["tensors"] else "–")
        rows.append([label(method), f"{values['rss']:.0f}", rss_ratio, tensors, tensor_ratio,
                     ", ".join(f"{v:.0f}" for v in values["rss_runs"])])
    return rows, summary


def _speed_table(run: dict, methods: list[str]) -> tuple[list[list[str]], dict]:
    times = run["step_s"]
    rows, summary = [], {}
    for method in methods:
        step = statistics.median(times[method])
        paired = (statistics.median(a / b for a, b in zip(times[method], times["peft"]))
                  if "peft" in times else None)
        summary[method] = {"step_s": step, "paired_vs_peft": paired}
        rows.append([label(method), f"{step * 1e3:.0f}", "–" if paired is None else f"{paired:.2f}"])
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny model, four methods, RSS from one process each")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--rounds", type=int, default=None, help="speed rounds (default 6; quick 1)")
    parser.add_argument("--memory-repeats", type=int, default=None,
                        help="RSS processes per method and setting (default 3; quick 1)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process")
    parser.add_argument("--memory-from", default=None, metavar="JSON",
                        help="take the memory runs from an earlier run's llm.json (same methods and shape) and "
                             "measure only the speed; the file's header then gives both runs' machine and load")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        kind, size, *rest = args.worker
        batch, seq, checkpointing = int(rest[-3]), int(rest[-2]), rest[-1] == "1"
        if kind == "memory":
            result = memory_worker(size, rest[0], rest[1], batch, seq, checkpointing)
        else:
            result = speed_worker(size, rest[0].split(","), int(rest[1]), batch, seq, checkpointing)
        print(json.dumps(result))
        return
    from _common import RESULTS_DIR, header, machine_info, markdown_table, save_results

    size = "tiny" if args.quick else "134m"
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 6)
    repeats = args.memory_repeats if args.memory_repeats is not None else (1 if args.quick else 3)
    methods = args.methods.split(",")
    if args.quick and args.methods == parser.get_default("methods"):
        methods = ["peft", "plain/stochastic", "per_layer/stochastic", "activation/stochastic"]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s): {unknown}")
    shape = [str(args.batch), str(args.seq)]
    before = machine_info()
    memory_runs: list[dict] = []
    speed_runs: list[dict] = []
    memory_machine = None
    if args.memory_from:
        earlier = json.loads(Path(args.memory_from).read_text())
        memory_runs = earlier["memory"]
        memory_machine = earlier["machine"]
        missing = sorted(set(methods) - {run["method"] for run in memory_runs})
        if missing:
            parser.error(f"{args.memory_from} has no memory runs of {missing}")
        repeats = sum(1 for run in memory_runs
                      if run["method"] == methods[0] and not run["checkpointing"] and run["measure"] == "rss")
    for checkpointing in ("0", "1"):
        for repeat in range(0 if args.memory_from else repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                for measure in ("rss", "tensors") if repeat == 0 and not args.quick else ("rss",):
                    result = _subprocess(args.threads, "memory", size, method, measure, *shape, checkpointing)
                    memory_runs.append(result)
                    print(f"memory ckpt={checkpointing} {method:24s} {measure:8s} {result['memory_mib']:8.0f} MiB",
                          flush=True)
        result = _subprocess(args.threads, "speed", size, ",".join(methods), str(rounds), *shape, checkpointing)
        speed_runs.append(result)
        for method in methods:
            print(f"speed  ckpt={checkpointing} {method:24s} {statistics.median(result['step_s'][method]) * 1e3:8.0f} ms",
                  flush=True)
    after = machine_info()
    before["torch_threads"] = after["torch_threads"] = speed_runs[0]["threads"]
    command = "python benchmarks/llm.py " + " ".join(sys.argv[1:])
    lines = [
        header("Causal-LM fine-tuning in the LLM regime: bf16 weights, batch "
               f"{args.batch}×{args.seq}", before, after).rstrip(),
        "",
        f"Command: `{command.strip()}`. Model: {'a tiny Llama (smoke run)' if args.quick else 'a 134M Llama'} "
        f"from a `LlamaConfig`, random weights, bf16; r = {RANK}, alpha = {ALPHA:g} on q, k, v, o, gate, up, down "
        "of every layer; CPU only (no GPU was lent to the session that produced this file). Memory: the least "
        f"of {repeats} fresh processes for RSS, one for tensors; growth over the loaded model through the "
        "set-up and 3 steps (see the script's docstring). Speed: one process per checkpointing setting, "
        f"{rounds} rotated rounds after a warm-up; ÷ PEFT is the median over rounds of the paired ratio.",
        "",
    ]
    if memory_machine is not None:
        lines[-1:-1] = ["", f"The memory runs come from an earlier run (`--memory-from`; RSS and tensor sizes do not "
                        f"depend on the machine's load): load average {tuple(memory_machine[0]['load_avg'])} at "
                        f"its start, {tuple(memory_machine[1]['load_avg'])} at its end; the speed runs and the "
                        "load above are this run's."]
    summary: dict = {}
    for checkpointing in (False, True):
        memory_rows, memory_summary = _memory_table(memory_runs, methods, checkpointing)
        run = next(r for r in speed_runs if r["checkpointing"] == checkpointing)
        speed_rows, speed_summary = _speed_table(run, methods)
        setting = "with activation checkpointing" if checkpointing else "without activation checkpointing"
        summary[setting] = {m: {**memory_summary.get(m, {}), **speed_summary.get(m, {})} for m in methods}
        lines += [f"## {setting[0].upper() + setting[1:]}", "", "Training memory (MiB):", "",
                  markdown_table(["method", "RSS growth", "÷ PEFT", "peak tensors", "÷ PEFT", "RSS runs"],
                                 memory_rows),
                  "Step time:", "", markdown_table(["method", "step (ms)", "÷ PEFT (paired)"], speed_rows)]
    lines += [
        "## Llama-2-7B, estimated from bytes per parameter",
        "",
        f"bf16 weights (6.74B parameters), r = {RANK} on the seven projections of every layer; batch 4×512 "
        "without checkpointing for the saved inputs. *State*: what the optimizer keeps between steps; "
        "*transient*: gradients and the step's copies at the peak; *saved inputs*: the adapted layers' inputs "
        "kept for the backward (the rest of the activations is the same for every method, and checkpointing "
        "removes these too). GiB.",
        "",
        markdown_table(["method", "weights", "state", "transient", "saved inputs", "total", "what"], estimate_7b()),
    ]
    save_results("llm", "\n".join(lines) + "\n")
    (RESULTS_DIR / "llm.json").write_text(json.dumps({"machine": [before, after], "memory": memory_runs,
                                                      "speed": speed_runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
