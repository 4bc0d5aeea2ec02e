"""``python -m lora_optim.demo``: fine-tune the packaged MiniLM with every method and compare.

The task is the packaged one of :mod:`lora_optim.examples.minilm_task`: *which stdlib package
does this docstring come from* (6 classes, 600 train / 150 held-out docstrings), on the
pretrained all-MiniLM-L6-v2 encoder (22.7M parameters) with a mean-pooled linear head. Each
method trains its own copy of the same model for ``--steps`` steps (default 50, batch 16,
``max_length`` 64) on the *same* batches in the same order, from the same head init (int
seeds). The runs are interleaved step by step (method 1 step t, method 2 step t, ..., then
t+1), so every method sees the same machine load, which matters on a shared machine.
Progress goes to stderr (tqdm); stdout receives the markdown table and, under it, where the runs'
PEFT adapters were saved.

Methods (the :data:`METHODS` table; add a row to add a method):

========  =====================================================================  ========
name      what trains                                                            lr
========  =====================================================================  ========
lora      ``LoRAAdam(projection="lora")``: rank-r factors of the 36 encoder        1e-3
          Linear weights (query/key/value/dense), ``alpha = 2r``; head dense
random    ``LoRAAdam(projection="random")``, Gaussian factors redrawn every        3e-4
          step (``resample_every=1``, library-default moment rule)
additive  ``LoRAAdam(projection="additive")``: ``ΔW_ij = A_{i,j mod r} +           1e-4
          B_{i mod r,j}``
peft      HF PEFT LoRA (``r``, ``lora_alpha = 2r``, no dropout) on the same 36       1e-3
          Linear layers, fused ``torch.optim.AdamW`` on adapters + head
adamw     full fine-tuning, fused ``torch.optim.AdamW`` on every parameter        3e-4
========  =====================================================================  ========

Fairness: for the four LoRA-style methods exactly the same parameters train, namely the
low-rank update of the 36 Linear weights and, densely (plain AdamW math), the classification
head (``LoRAAdam`` groups ``[{"params": linear weights, "rank": r}, {"params": head,
"rank": None}]``; PEFT's head sits outside the wrapped encoder and is in its AdamW). Embeddings,
LayerNorms and Linear biases are frozen (``requires_grad=False``) for all of them, as PEFT does
by default (``bias="none"``). Full AdamW trains everything. Every method uses ``weight_decay=0``,
``betas=(0.9, 0.999)``, ``eps=1e-8``, the same lr for its head as for the rest, dropout 0.

Learning rates (the column above) come from one quick sweep with ``--steps 50 --eval-split
validation --threads 1`` (train on 500 training docstrings, score on the other 100; the test
set is never used for it): lr ∈ {1e-4, 3e-4, 1e-3, 3e-3} for the LoRA-style methods, extended
to {1e-5, 3e-5} for ``additive`` and to {3e-5, 1e-3} for ``adamw`` because their best value was
at an end of the first grid. The lr with the best validation accuracy won, ties going to the
lower training loss (lora, peft: 3e-4 and 1e-3 tie at 0.82 / 0.83, 1e-3 trains further; adamw:
1e-4 and 3e-4 tie at 0.89). One seed and 100 validation docstrings (±3.5 points standard error)
make this a coarse choice. The full sweep table is in ``docs/choosing.md``. Persistent LoRA
factors (lora, peft) want ~3-10x the full fine-tuning lr (1e-3 against AdamW's tied 3e-4 /
1e-4); ``random`` redrawn every step diverges above 1e-3 and does best at 3e-4; ``additive``,
which moves every entry of ``W`` by ``≈ s·(|dA|+|dB|) = 4·lr`` per step, wants ~1e-4.
Rerun a sweep with e.g.::

    python -m lora_optim.demo --eval-split validation --lr lora=1e-4,3e-4,1e-3,3e-3

Columns of the table:

* ``train loss``: mean cross-entropy after training on a *fixed* set of 128 training examples
  (not the last noisy minibatch);
* ``held-out acc``: accuracy on the 150 held-out docstrings (``--eval-split validation``: on the
  100 validation docstrings);
* ``PEFT-reloaded acc``: for the LoRAAdam methods, the same accuracy of the base model with the
  run's change exported as a PEFT adapter (:func:`lora_optim.export_peft_adapter`) and loaded
  back by ``peft.PeftModel.from_pretrained``; ``lora`` and ``additive`` export their exact factors
  (rank ``r`` and ``2r``), ``random`` (whose change sums every draw) a rank-``r`` SVD of
  ``W − W₀``, so its column shows what that truncation costs. The adapters are written to
  ``--adapter-dir`` (default: a new temporary directory) and listed under the table, with the
  share of ``‖ΔW‖²`` they keep;
* ``opt state``: :func:`lora_optim.optimizer_state_bytes` of the optimizer (LoRAAdam: factors,
  their moments and the head's moments; PEFT: AdamW moments of adapters + head; AdamW: moments
  of everything);
* ``adapters``: extra trainable tensors *in the model* (PEFT's ``lora_A``/``lora_B``; LoRAAdam
  keeps its factors in the optimizer state instead, so they are counted in ``opt state``);
* ``step``: median wall time of a whole training step (forward, backward, optimizer) over the
  steps after a warm-up of 5; ``opt.step``: median of the optimizer call alone.

Options: ``--steps``, ``--methods``, ``--seed``, ``--rank``, ``--lr NAME=V[,V...]`` (a run per
value), ``--eval-split``, ``--threads``, ``--adapter-dir`` / ``--no-adapters``, ``--quick`` (3
steps on a small subset, for smoke tests).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lora_optim.interop import export_peft_adapter
from lora_optim.memory import optimizer_state_bytes
from lora_optim.optimizer import LoRAAdam

__all__ = [
    "Method",
    "METHODS",
    "DemoConfig",
    "RunResult",
    "run_demo",
    "format_table",
    "format_adapters",
    "build_parser",
    "main",
]

#: Held-out docstrings of the training split used as validation by ``--eval-split validation``.
VALIDATION_SIZE = 100


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings shared by every method of one demo run.

    Attributes:
        steps: optimizer steps per method.
        batch_size: training examples per step.
        max_length: tokens per docstring (truncated / padded).
        rank: factor rank ``r`` of the LoRA-style methods (``alpha = 2r``).
        seed: int seed of the data order, the head init and the optimizers' draws.
        task_seed: seed of the train / held-out split (:func:`build_docstring_task`); kept
            apart from ``seed`` so that runs with several seeds score on the same docstrings.
        warmup: steps left out of the median step times.
        eval_split: ``"test"`` (the held-out docstrings) or ``"validation"`` (the last
            :data:`VALIDATION_SIZE` training docstrings, not trained on).
        train_subset: train on the first this-many training examples only (``None``: all).
        eval_subset: score on the first this-many evaluation examples only (``None``: all).
        loss_examples: size of the fixed training subset the final loss is measured on.
        adapter_dir: where to export the LoRAAdam runs as PEFT adapters (one subdirectory per
            run) and score them reloaded by PEFT; ``None``: no export.
    """

    steps: int = 50
    batch_size: int = 16
    max_length: int = 64
    rank: int = 8
    seed: int = 0
    task_seed: int = 0
    warmup: int = 5
    eval_split: str = "test"
    train_subset: int | None = None
    eval_subset: int | None = None
    loss_examples: int = 128
    adapter_dir: str | None = None


Builder = Callable[[nn.Module, float, DemoConfig], torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the demo: how to turn a fresh classifier into (trainable model, optimizer).

    Attributes:
        name: the ``--methods`` name.
        lr: default learning rate (from the sweep in the module docstring).
        build: ``build(model, lr, config) -> optimizer``; may freeze parameters or wrap
            ``model.encoder`` in place.
        description: one line for ``--help``.
    """

    name: str
    lr: float
    build: Builder
    description: str


# --------------------------------------------------------------------------- builders


def _freeze_all_but_linear_weights_and_head(model: nn.Module) -> None:
    """Leave trainable only the encoder's Linear weights and the head (what LoRA trains)."""
    from lora_optim.examples import minilm_task as mt

    keep = set(mt.linear_weight_names(model, trainable_only=False)) | {
        name for name, _ in model.named_parameters() if name.startswith("head.")
    }
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def lora_optim_builder(projection: str, **projection_options: Any) -> Builder:
    """A builder for :class:`~lora_optim.LoRAAdam` with ``projection`` and its options.

    Groups: ``[{"params": 36 Linear weights, "rank": r, "alpha": 2r}, {"params": head,
    "rank": None}]`` (plain AdamW math on the head); everything else frozen.
    """

    def build(model: nn.Module, lr: float, config: DemoConfig) -> torch.optim.Optimizer:
        from lora_optim.examples import minilm_task as mt

        _freeze_all_but_linear_weights_and_head(model)
        groups = mt.make_param_groups(model, rank=config.rank, alpha=2 * config.rank)
        return LoRAAdam(groups, lr=lr, projection=projection, weight_decay=0.0, seed=config.seed,
                        **projection_options)

    return build


def _build_peft(model: nn.Module, lr: float, config: DemoConfig) -> torch.optim.Optimizer:
    """HF PEFT LoRA on the encoder's Linear layers; the head (outside the encoder) stays trainable."""
    from peft import LoraConfig, get_peft_model

    from lora_optim.examples import minilm_task as mt

    peft_config = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0, bias="none",
                             target_modules=list(mt.LORA_TARGET_MODULES))
    # PEFT draws lora_A (kaiming) from the global RNG: seed it from the int seed, locally.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model.encoder = get_peft_model(model.encoder, peft_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=True)


def _build_adamw(model: nn.Module, lr: float, config: DemoConfig) -> torch.optim.Optimizer:
    """Full fine-tuning: every parameter, fused AdamW."""
    model.requires_grad_(True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


#: The demo's methods, by name, in table order.
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("lora", 1e-3, lora_optim_builder("lora"), "LoRAAdam, persistent factors (PEFT init)"),
        Method("random", 3e-4, lora_optim_builder("random"),
               "LoRAAdam, Gaussian factors redrawn every step"),
        Method("additive", 1e-4, lora_optim_builder("additive"),
               "LoRAAdam, dW_ij = A[i, j mod r] + B[i mod r, j]"),
        Method("peft", 1e-3, _build_peft, "HF PEFT LoRA + fused AdamW on adapters and head"),
        Method("adamw", 3e-4, _build_adamw, "full fine-tuning, fused AdamW"),
    )
}


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class RunResult:
    """Measurements of one (method, lr) run."""

    method: str
    lr: float
    train_loss: float
    accuracy: float
    state_bytes: int
    adapter_bytes: int
    step_seconds: float
    optimizer_step_seconds: float
    minibatch_losses: list[float]
    #: The exported PEFT adapter (LoRAAdam runs with ``adapter_dir``): its directory, the accuracy
    #: of the base model with it loaded by PEFT, its routes and the smallest share of ‖ΔW‖² kept.
    adapter_path: str | None = None
    adapter_accuracy: float | None = None
    adapter_routes: str | None = None
    adapter_kept: float | None = None


@dataclasses.dataclass
class _Run:
    method: Method
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict[str, torch.Tensor]]
    losses: list[float] = dataclasses.field(default_factory=list)
    step_times: list[float] = dataclasses.field(default_factory=list)
    optimizer_times: list[float] = dataclasses.field(default_factory=list)


def _subset(encodings: Mapping[str, torch.Tensor], labels: Sequence[int], start: int, stop: int | None):
    return {k: v[start:stop] for k, v in encodings.items()}, list(labels[start:stop])


def _adapter_bytes(model: nn.Module) -> int:
    """Bytes of trainable tensors the method added to the model (PEFT's adapters)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)


def _mean_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    from lora_optim.examples import minilm_task as mt

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = sum(mt.cross_entropy_loss(model, b).item() * len(b["labels"]) for b in batches)
    finally:
        model.train(was_training)
    return total / sum(len(b["labels"]) for b in batches)


def run_demo(
    config: DemoConfig,
    runs: Sequence[tuple[str | Method, float]],
    *,
    progress: bool = True,
) -> list[RunResult]:
    """Train one copy of the classifier per ``(method, lr)`` in ``runs``, interleaved.

    ``method`` is a name in :data:`METHODS` or a :class:`Method` (e.g. a benchmark's variant).
    Every run gets the same batches (``iterate_batches(seed=config.seed)``) and the same initial
    model (one :func:`~lora_optim.examples.minilm_task.build_classifier` deep-copied).

    Returns:
        One :class:`RunResult` per entry of ``runs``, in order.
    """
    from tqdm.auto import tqdm

    from lora_optim.examples import minilm_task as mt

    methods = []
    for method, lr in runs:
        if not isinstance(method, Method):
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
            method = METHODS[method]
        methods.append((method, float(lr)))
    if config.eval_split not in ("test", "validation"):
        raise ValueError(f"eval_split must be 'test' or 'validation', got {config.eval_split!r}")
    task = mt.build_docstring_task(seed=config.task_seed)
    tokenizer = mt.load_tokenizer()
    train = mt.tokenize(task.train_texts, tokenizer, config.max_length)
    train_labels: list[int] = list(task.train_labels)
    if config.eval_split == "validation":
        evaluation = _subset(train, train_labels, len(train_labels) - VALIDATION_SIZE, None)
        train, train_labels = _subset(train, train_labels, 0, len(train_labels) - VALIDATION_SIZE)
    else:
        evaluation = (mt.tokenize(task.test_texts, tokenizer, config.max_length), list(task.test_labels))
    if config.eval_subset is not None:
        evaluation = _subset(*evaluation, 0, config.eval_subset)
    if config.train_subset is not None:
        train, train_labels = _subset(train, train_labels, 0, config.train_subset)
    loss_batches = list(mt.iterate_batches(*_subset(train, train_labels, 0, config.loss_examples), 32,
                                           shuffle=False, drop_last=False))

    base = mt.build_classifier(task.num_labels, seed=config.seed)
    active: list[_Run] = []
    for method, lr in methods:
        model = copy.deepcopy(base)
        optimizer = method.build(model, lr, config)
        batches = mt.iterate_batches(train, train_labels, config.batch_size, seed=config.seed, num_epochs=None)
        active.append(_Run(method, lr, model, optimizer, batches))
    if config.adapter_dir is None:
        del base  # else kept: PEFT reloads the adapters onto it, and random's export is an SVD of W − W₀

    bar = tqdm(range(config.steps), desc=f"training {len(active)} runs", file=sys.stderr, disable=not progress)
    for _ in bar:
        for run in active:
            batch = next(run.batches)
            start = time.perf_counter()
            loss = mt.cross_entropy_loss(run.model, batch)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            before_step = time.perf_counter()
            run.optimizer.step()
            end = time.perf_counter()
            run.losses.append(loss.item())
            run.step_times.append(end - start)
            run.optimizer_times.append(end - before_step)
        bar.set_postfix({f"{r.method.name}@{r.lr:g}": f"{r.losses[-1]:.3f}" for r in active[:4]})

    results = []
    for run in tqdm(active, desc="evaluating", file=sys.stderr, disable=not progress):
        timed = slice(min(config.warmup, max(config.steps - 1, 0)), None)
        results.append(RunResult(
            method=run.method.name,
            lr=run.lr,
            train_loss=_mean_loss(run.model, loss_batches),
            accuracy=mt.evaluate_accuracy(run.model, *evaluation),
            state_bytes=optimizer_state_bytes(run.optimizer),
            adapter_bytes=_adapter_bytes(run.model),
            step_seconds=statistics.median(run.step_times[timed]) if run.step_times else float("nan"),
            optimizer_step_seconds=(statistics.median(run.optimizer_times[timed])
                                    if run.optimizer_times else float("nan")),
            minibatch_losses=run.losses,
        ))
        if config.adapter_dir is not None and isinstance(run.optimizer, LoRAAdam):
            name = run.method.name if sum(r.method.name == run.method.name for r in active) == 1 \
                else f"{run.method.name}-lr{run.lr:g}"
            _export_and_score(results[-1], run, base, Path(config.adapter_dir) / name, evaluation)
    return results


def _export_and_score(result: RunResult, run: _Run, base: nn.Module, path: Path, evaluation) -> None:
    """Export ``run`` as a PEFT adapter (against ``base`` where an SVD of ``W − W₀`` is needed) and
    score the base model with the adapter loaded back by PEFT."""
    import warnings

    from peft import PeftModel

    from lora_optim.examples import minilm_task as mt

    report = export_peft_adapter(run.model, run.optimizer, path, base=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about the base model's config
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    result.adapter_path = str(path)
    result.adapter_accuracy = mt.evaluate_accuracy(reloaded, *evaluation)
    routes = sorted({f"{module.route} rank {module.rank}" for module in report.modules})
    result.adapter_routes = ", ".join(routes)
    result.adapter_kept = report.min_kept


def format_table(results: Sequence[RunResult], eval_split: str = "test") -> str:
    """The markdown table of ``results`` (one row per run)."""
    acc = "held-out acc" if eval_split == "test" else "validation acc"
    lines = [
        f"| method | lr | train loss | {acc} | PEFT-reloaded acc | opt state (MiB) | adapters (MiB) | step (s) "
        "| opt.step (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        reloaded = "-" if r.adapter_accuracy is None else f"{r.adapter_accuracy:.3f}"
        lines.append(
            f"| {r.method} | {r.lr:g} | {r.train_loss:.3f} | {r.accuracy:.3f} | {reloaded} "
            f"| {r.state_bytes / 2**20:.2f} | {r.adapter_bytes / 2**20:.2f} | {r.step_seconds:.3f} "
            f"| {1e3 * r.optimizer_step_seconds:.1f} |"
        )
    return "\n".join(lines)


def format_adapters(results: Sequence[RunResult]) -> str:
    """The lines under the table that say where each run's PEFT adapter was saved ("" if none)."""
    exported = [r for r in results if r.adapter_path is not None]
    if not exported:
        return ""
    lines = ["PEFT adapters (load with peft.PeftModel.from_pretrained(base_model, path)):"]
    for r in exported:
        lines.append(f"- {r.method} (lr {r.lr:g}): {r.adapter_path} ({r.adapter_routes}; keeps "
                     f"{r.adapter_kept:.3f} of ||dW||^2 at worst; PEFT-reloaded acc {r.adapter_accuracy:.3f}, "
                     f"trained {r.accuracy:.3f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _parse_lrs(items: Sequence[str]) -> dict[str, list[float]]:
    lrs: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in METHODS:
            raise ValueError(f"--lr expects NAME=V[,V...] with NAME in {sorted(METHODS)}, got {item!r}")
        try:
            lrs[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--lr: learning rates must be numbers, got {item!r}") from None
        if not lrs[name] or any(not v > 0 for v in lrs[name]):
            raise ValueError(f"--lr: learning rates must be positive numbers, got {item!r}")
    return lrs


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_optim.demo",
        description="Fine-tune the packaged MiniLM on a small real text task with each method and print "
                    "a markdown table (stdout): train loss, held-out accuracy, optimizer state, time per step.",
    )
    methods = ", ".join(f"{m.name} ({m.description}; lr {m.lr:g})" for m in METHODS.values())
    parser.add_argument("--steps", type=int, default=None, help="training steps per method (default 50; --quick: 3)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {methods}")
    parser.add_argument("--seed", type=int, default=0, help="int seed: data order, head init, factor draws")
    parser.add_argument("--rank", type=int, default=8, help="rank of the LoRA-style methods (alpha = 2*rank)")
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=V[,V...]",
                        help="learning rate(s) of a method; several values give one run each (a sweep)")
    parser.add_argument("--eval-split", choices=("test", "validation"), default="test",
                        help="score on the held-out test docstrings, or on 100 held-back training ones (for sweeps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--adapter-dir", default=None,
                        help="directory for the LoRAAdam runs' PEFT adapters (default: a new temporary directory)")
    parser.add_argument("--no-adapters", action="store_true",
                        help="do not export the LoRAAdam runs as PEFT adapters (no PEFT-reloaded accuracy)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 steps, batch 8, max_length 32, small data subsets")
    return parser


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _machine_line() -> str:
    return (f"# {_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), load average {_load()}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from command-line arguments; print the markdown table to stdout."""
    from lora_optim.examples.minilm_task import silence_third_party_notices

    silence_third_party_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        parser.error(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    try:
        lrs = _parse_lrs(args.lr)
    except ValueError as error:
        parser.error(str(error))
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.quick:
        config = DemoConfig(steps=3 if args.steps is None else args.steps, batch_size=8, max_length=32,
                            rank=args.rank, seed=args.seed, warmup=1, eval_split=args.eval_split,
                            train_subset=64, eval_subset=16, loss_examples=16)
    else:
        config = DemoConfig(steps=50 if args.steps is None else args.steps, rank=args.rank, seed=args.seed,
                            eval_split=args.eval_split)
    if config.steps < 1:
        parser.error(f"--steps must be >= 1, got {config.steps}")
    if not args.no_adapters:
        adapter_dir = args.adapter_dir or tempfile.mkdtemp(prefix="lora_optim_demo_adapters_")
        config = dataclasses.replace(config, adapter_dir=adapter_dir)
    runs = [(name, lr) for name in names for lr in lrs.get(name, [METHODS[name].lr])]
    sys.stderr.write(_machine_line())
    start = time.perf_counter()
    results = run_demo(config, runs)
    sys.stderr.write(f"# {config.steps} steps x {len(runs)} runs in {time.perf_counter() - start:.0f} s, "
                     f"load average {_load()}\n")
    sys.stdout.write(format_table(results, config.eval_split) + "\n")
    adapters = format_adapters(results)
    if adapters:
        sys.stdout.write("\n" + adapters + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
