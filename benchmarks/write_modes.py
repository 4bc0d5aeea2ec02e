"""bf16 write modes on a real task: held-out accuracy and loss over seeds, against fp32 weights and
PEFT LoRA on the same bf16 model, with each mode's bytes kept and ops per matrix.

Task: the packaged pretrained MiniLM on the eight-class docstring task
(:func:`lora_optim.examples.minilm_task.build_eight_class_task`: 576 train, 576 held-out),
``--steps`` steps (default 200) of batch 32 × 64 tokens, rank 8, alpha 16 on every encoder
Linear, the classification head trained densely in fp32 (its input cast to fp32), embeddings,
LayerNorms and biases frozen (PEFT's setting). The encoder is bf16 except in the fp32 row.

Methods: ``fp32`` (fp32 encoder, :class:`lora_optim.LoRAAdam`, ``nearest`` writes: exact up to
fp32 rounding), ``stochastic`` (the bf16 default), ``compensated``, ``nearest`` (bf16 encoder,
``LoRAAdam`` with that write mode), and ``peft`` (PEFT LoRA on the bf16 encoder with fp32
adapters, fused AdamW). The ``LoRAAdam`` runs use the activation-side mode (``opt.attach``: the
writes are the same in every mode). Each seed sets the head's init, the batch order and the
optimizer's seed; every method sees the same batches for a seed.

Costs of each write mode, measured here: *bytes kept* per element of ``W`` (the mode's own state,
from :meth:`WeightWriter.init_state <lora_optim.precision.WeightWriter.init_state>` on a
4096×4096 bf16 weight) and *ops per matrix* on an accelerator's code path (aten ops of one step
of 64 bf16 matrices, counted by :class:`lora_optim.dispatch_count.DispatchCounter` with
:func:`lora_optim.kernels.paths.accelerator_paths`).

Learning rates: 1e-3 (the library's default) and 2e-4, where updates are smaller and rounding
matters more. Run ``python benchmarks/write_modes.py`` (``--quick``: 10 steps, one seed); results go to
``benchmarks/results/write_modes.md`` and ``write_modes.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, header, machine_info, markdown_table, mean_std, save_results  # noqa: E402

METHODS = ("fp32", "stochastic", "compensated", "nearest", "peft")
LABELS = {
    "fp32": "fp32 weights (LoRAAdam, exact writes)",
    "stochastic": "bf16, `stochastic` (default)",
    "compensated": "bf16, `compensated`",
    "nearest": "bf16, `nearest`",
    "peft": "PEFT LoRA, bf16 base, fp32 adapters",
}
RANK, ALPHA, BATCH, SEQ, LR = 8, 16.0, 32, 64, 1e-3


def _head_in_fp32(model: nn.Module) -> None:
    """The head trains in fp32 for every method: cast it, and its input, to fp32."""
    model.head.float()
    model.head.register_forward_pre_hook(lambda module, args: tuple(a.float() for a in args))


def build(method: str, seed: int, num_labels: int, lr: float):
    """``(model, optimizer)`` of one run (module docstring)."""
    from lora_optim import LoRAAdam
    from lora_optim.examples import minilm_task as mt

    dtype = torch.float32 if method == "fp32" else torch.bfloat16
    model = mt.build_classifier(num_labels, seed=seed, dtype=dtype)
    _head_in_fp32(model)
    model.requires_grad_(False)
    head = list(model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        model.encoder = get_peft_model(model.encoder, LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(mt.LORA_TARGET_MODULES)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=lr, fused=True)
    weights = [module.weight for module in model.encoder.modules() if isinstance(module, nn.Linear)]
    for weight in weights:
        weight.requires_grad_(True)
    precision = None if method in ("fp32", "stochastic") else method
    optimizer = LoRAAdam([{"params": weights, "rank": RANK, "alpha": ALPHA, "precision": precision},
                          {"params": head, "rank": None}], lr=lr, seed=seed)
    optimizer.attach(model)
    return model, optimizer


def run(method: str, seed: int, steps: int, lr: float, task, train, test) -> dict:
    """Train one method for one seed; held-out accuracy and loss at the end."""
    from lora_optim.examples import minilm_task as mt

    model, optimizer = build(method, seed, task.num_labels, lr)
    batches = mt.iterate_batches(train, task.train_labels, BATCH, seed=seed, num_epochs=None)
    start = time.perf_counter()
    losses = []
    for batch in itertools.islice(batches, steps):
        loss = mt.cross_entropy_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    accuracy, held_out_loss = mt.evaluate(model, test, task.test_labels)
    return {"method": method, "seed": seed, "lr": lr, "steps": steps, "accuracy": accuracy,
            "held_out_loss": held_out_loss,
            "train_loss_last10": statistics.fmean(losses[-10:]), "seconds": seconds}


def write_mode_costs() -> dict[str, dict[str, float]]:
    """Bytes kept per element of a 4096² bf16 weight, and aten ops per matrix of one accelerator-path
    step of 64 bf16 matrices (lora, r 4), for each write mode."""
    from lora_optim import LoRAAdam
    from lora_optim.dispatch_count import DispatchCounter
    from lora_optim.kernels import use_native
    from lora_optim.kernels.paths import accelerator_paths
    from lora_optim.precision import get_writer

    costs = {}
    weight = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    for mode in ("stochastic", "compensated", "nearest"):
        state = get_writer(mode).init_state(weight, seed=0)
        kept = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        generator = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(48 if i % 2 else 64, 40, generator=generator).bfloat16()) for i in range(64)]
        optimizer = LoRAAdam(params, rank=4, alpha=8, precision=mode)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).bfloat16()
        with use_native(False), accelerator_paths():
            optimizer.step()
            with DispatchCounter() as counter:
                optimizer.step()
        costs[mode] = {"bytes_per_element": kept / weight.numel(), "bytes_per_matrix": kept, "ops_per_matrix": counter.total / len(params),
                       "launches_per_matrix": counter.launches / len(params)}
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, one seed, one learning rate")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 200)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--lrs", default=f"{LR:g},2e-4",
                        help=f"comma-separated learning rates, each run for every method (default {LR:g},2e-4)")
    parser.add_argument("--reuse", action="store_true",
                        help="take runs of the same method, seed, lr and steps from the results' JSON instead "
                             "of training them again (the runs are deterministic on one machine)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 200)
    seeds = range(args.seeds or (1 if args.quick else 3))
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s): {unknown}")
    from lora_optim.examples import minilm_task as mt

    before = machine_info()
    task = mt.build_eight_class_task(seed=0)
    tokenizer = mt.load_tokenizer()
    train = mt.tokenize(task.train_texts, tokenizer, max_length=SEQ)
    test = mt.tokenize(task.test_texts, tokenizer, max_length=SEQ)
    lrs = [float(lr) for lr in args.lrs.split(",")]
    if args.quick and args.lrs == parser.get_default("lrs"):
        lrs = lrs[:1]
    saved = RESULTS_DIR / "write_modes.json"
    earlier = json.loads(saved.read_text())["results"] if args.reuse and saved.exists() else []
    results = []
    for lr in lrs:
        for seed in seeds:  # seeds outermost: a partial run still compares every method
            for method in methods:
                key = (method, seed, lr, steps)
                reused = [r for r in earlier if (r["method"], r["seed"], r["lr"], r["steps"]) == key]
                result = reused[0] if reused else run(method, seed, steps, lr, task, train, test)
                results.append(result)
                print(f"lr {lr:g} {method:12s} seed {seed}: held-out accuracy {result['accuracy']:.3f}, loss "
                      f"{result['held_out_loss']:.3f}" + (" (reused)" if reused else f" ({result['seconds']:.0f} s)"),
                      flush=True)
    costs = write_mode_costs()
    after = machine_info()
    tables = []
    for lr in lrs:
        tables += [f"## lr {lr:g}", "", _table(methods, [r for r in results if r["lr"] == lr], costs)]
    command = "python benchmarks/write_modes.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        header("bf16 write modes on a real task", before, after).rstrip(),
        "",
        f"Command: `{command.strip()}`. MiniLM, eight-class docstring task ({len(task.train_texts)} train, "
        f"{len(task.test_texts)} held-out), {steps} steps of batch {BATCH}×{SEQ}, r = {RANK}, alpha = {ALPHA:g}, "
        f"{len(seeds)} seed(s) (mean ± sample std over seeds; one run's held-out accuracy has a "
        f"standard error of ±{100 * (0.25 / len(task.test_texts)) ** 0.5:.1f} points at most). Bytes kept: the "
        "write mode's own state per element of a bf16 `W` (2 = +100% of the weight). Ops: aten ops per matrix "
        "of one accelerator-path step of 64 bf16 matrices, launching ops in parentheses."
        + (" Runs found in the previous results' JSON were reused (`--reuse`); the machine line is this "
           "invocation's." if args.reuse else ""),
        "",
        *tables,
    ])
    save_results("write_modes", text + "\n")
    saved.write_text(json.dumps({"machine": [before, after], "steps": steps, "results": results, "costs": costs},
                                indent=1) + "\n")


def _table(methods: list[str], results: list[dict], costs: dict) -> str:
    """One learning rate's table: a row per method."""
    rows = []
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        kept = ops = "–"  # fp32 weights are written exactly; PEFT writes no weight
        if method in costs:
            cost = costs[method]
            per_element = cost["bytes_per_element"]
            # A mode that keeps only counters (stochastic: a 0-dim int64) keeps bytes per matrix, not per element.
            kept = (f"{per_element:g}" if per_element >= 0.01 or not per_element
                    else f"0 ({cost.get('bytes_per_matrix', 0):.0f} B per matrix)")
            ops = f"{cost['ops_per_matrix']:.1f} ({cost['launches_per_matrix']:.1f})"
        rows.append([LABELS[method], mean_std([100 * r["accuracy"] for r in runs], 1),
                     mean_std([r["held_out_loss"] for r in runs], 3), mean_std([r["train_loss_last10"] for r in runs], 3),
                     kept, ops, ", ".join(f"{100 * r['accuracy']:.1f}" for r in runs)])
    return markdown_table(["weights, write mode", "held-out accuracy (%)", "held-out loss", "train loss (last 10)",
                           "bytes kept per element", "ops per matrix", "per seed (%)"], rows)


if __name__ == "__main__":
    main()
