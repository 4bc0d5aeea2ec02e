"""One training run on the eight-class MiniLM task, and a resumable store of run results.

Shared by the research scripts that compare projections on the real task
(``benchmarks/projection_study.py``). A run is described by a :class:`RunSpec` (method, rank,
alpha, lr, seed, projection options, steps, batch); :func:`train` trains it and returns a
plain dict of what was measured; :class:`ResultStore` keeps those dicts in a JSON file, written
after every run, so that an interrupted study loses at most the run in progress and a rerun
skips what is done.

The setup (the brief of issue 19, as PEFT does): the packaged pretrained all-MiniLM-L6-v2 with a
mean-pooled linear head (:mod:`lora_optim.examples.minilm_task`), fp32 weights, dropout 0; the
36 encoder Linear weights low-rank, the head dense (plain AdamW math, same lr), embeddings,
LayerNorms and biases frozen; no weight decay, betas (0.9, 0.999). Each seed sets the head's
init, the batch order and the optimizer's seed (factor inits, draws); every method sees the same
batches for a seed. PEFT LoRA (``method="peft"``) trains the same parameters with its adapters
and fused AdamW.

Measured per run: held-out accuracy and mean loss (576 held-out docstrings), the mean training
loss of the last 10 minibatches and every minibatch's loss, the optimizer state bytes
(:func:`lora_optim.optimizer_state_bytes`), the exact relative change of every low-rank weight
in a step, ``‖W_t − W_{t−1}‖_F / ‖W_{t−1}‖_F`` (from a copy of the weights before the step), its
maximum and median over the 36 matrices, at steps 1–20 and every 10th step after
(``change_steps``, ``change_max``, ``change_median``); the divergence guard's own estimate of
the largest one at every step (``guard_max``, :mod:`lora_optim.divergence`), on which its
threshold is calibrated; and at the end ``‖W_T − W_0‖_F / ‖W_0‖_F`` of each matrix
(``displacement``).

The ``LoRAAdam`` runs use the activation-side mode (``opt.attach(model)``): the same steps as the
plain mode (tested equal to float rounding), 20% faster on this model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RunSpec", "spec", "TaskData", "load_task", "build", "train", "ResultStore"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run. ``method`` is a registered projection name or ``"peft"``; ``options`` holds the
    projection's options as sorted ``(name, value)`` pairs; ``alpha=None`` is the library's
    default (``alpha = rank``, ``s = 1``)."""

    method: str
    lr: float
    seed: int
    rank: int = 8
    alpha: float | None = None
    options: tuple[tuple[str, Any], ...] = ()
    steps: int = 200
    batch: int = 16
    #: ``"plain"``: the learning rate acts as in the library before issue 19 (``s = alpha/r`` for
    #: every projection); ``"matched"``: with the per-projection scale of ``update_scale``.
    update_scale: str = "plain"

    def key(self) -> str:
        """A stable text key of the run (the store's index)."""
        options = ",".join(f"{name}={value}" for name, value in self.options)
        scale = "" if self.update_scale == "plain" else f"|update_scale={self.update_scale}"
        return (f"{self.method}|r={self.rank}|alpha={self.alpha}|lr={self.lr:.6g}|seed={self.seed}|"
                f"steps={self.steps}|batch={self.batch}|{options}{scale}")

    def as_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values."""
        spec = dataclasses.asdict(self)
        spec["options"] = dict(self.options)
        return spec


def spec(method: str, lr: float, seed: int, **kwargs: Any) -> RunSpec:
    """A :class:`RunSpec` whose projection options are given as keywords (``resample_every=10``)."""
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    own = {k: v for k, v in kwargs.items() if k in fields}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in fields))
    return RunSpec(method, float(lr), int(seed), options=options, **own)


@dataclasses.dataclass
class TaskData:
    """The tokenised eight-class task."""

    task: Any
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]


def load_task(max_length: int = 64) -> TaskData:
    """:func:`~lora_optim.examples.minilm_task.build_eight_class_task`, tokenised to ``max_length``."""
    from lora_optim.examples import minilm_task as mt

    mt.silence_third_party_notices()
    task = mt.build_eight_class_task(seed=0)
    tokenizer = mt.load_tokenizer()
    return TaskData(task, mt.tokenize(task.train_texts, tokenizer, max_length=max_length),
                    mt.tokenize(task.test_texts, tokenizer, max_length=max_length))


def build(run: RunSpec, num_labels: int) -> tuple[nn.Module, torch.optim.Optimizer, list[nn.Parameter]]:
    """``(model, optimizer, low-rank weights)`` of one run (module docstring)."""
    from lora_optim import LoRAAdam
    from lora_optim.examples import minilm_task as mt

    model = mt.build_classifier(num_labels, seed=run.seed)
    model.requires_grad_(False)
    head = list(model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    if run.method == "peft":
        from peft import LoraConfig, get_peft_model

        alpha = run.rank if run.alpha is None else run.alpha
        config = LoraConfig(r=run.rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                            target_modules=list(mt.LORA_TARGET_MODULES))
        with torch.random.fork_rng(devices=[]):  # PEFT draws lora_A from the global RNG
            torch.manual_seed(run.seed)
            model.encoder = get_peft_model(model.encoder, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=run.lr, weight_decay=0.0, fused=True), []
    weights = [module.weight for module in model.encoder.modules() if isinstance(module, nn.Linear)]
    for weight in weights:
        weight.requires_grad_(True)
    from lora_optim.option_table import COMMON_OPTIONS

    scale = {"update_scale": run.update_scale} if "update_scale" in COMMON_OPTIONS else {}
    if not scale and run.update_scale != "plain":
        raise ValueError(f"update_scale={run.update_scale!r} needs a library with the update_scale option")
    optimizer = LoRAAdam([{"params": weights, "rank": run.rank, "alpha": run.alpha},
                          {"params": head, "rank": None}],
                         lr=run.lr, projection=run.method, seed=run.seed, weight_decay=0.0, **scale,
                         **dict(run.options))
    optimizer.attach(model)  # the activation-side mode: the same steps, without forming G (faster)
    return model, optimizer, weights


def _relative_changes(weights: list[torch.Tensor], before: list[torch.Tensor]) -> list[float]:
    differences = torch._foreach_sub(weights, before)
    changes = torch.stack(torch._foreach_norm(differences))
    sizes = torch.stack(torch._foreach_norm(before))
    return (changes / sizes).tolist()


def train(run: RunSpec, data: TaskData) -> dict[str, Any]:
    """Train one run; returns the spec and what was measured (module docstring)."""
    from lora_optim import optimizer_state_bytes
    from lora_optim.examples import minilm_task as mt

    model, optimizer, weights = build(run, data.task.num_labels)
    batches = mt.iterate_batches(data.train, data.task.train_labels, run.batch, seed=run.seed, num_epochs=None)
    losses: list[float] = []
    change_steps: list[int] = []  # steps (1-based) of the exact trace: 1..20, then every 10th
    change_max: list[float] = []
    change_median: list[float] = []
    guard_max: list[float] = []  # the divergence guard's own estimate (lora_optim.divergence), max over matrices
    warnings_seen: list[str] = []
    initial = [w.detach().clone() for w in weights]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in itertools.islice(batches, run.steps):
            loss = mt.cross_entropy_loss(model, batch)
            loss.backward()
            exact = weights and (len(losses) < 20 or len(losses) % 10 == 9)
            before = [w.detach().clone() for w in weights] if exact else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if exact:
                changes = _relative_changes([w.detach() for w in weights], before)
                change_steps.append(len(losses))
                change_max.append(max(changes))
                change_median.append(statistics.median(changes))
            if weights:
                report = optimizer.step_size_report()
                guard_max.append(max(entry.last for entry in report.values()) if report else float("nan"))
            for warning in caught:
                warnings_seen.append(f"step {len(losses)}: {warning.category.__name__}: {warning.message}")
            caught.clear()
    seconds = time.perf_counter() - start
    displacement = _relative_changes([w.detach() for w in weights], initial) if weights else []
    accuracy, held_out_loss = mt.evaluate(model, data.test, data.task.test_labels)
    finite = [x for x in losses[-10:] if math.isfinite(x)]
    return {
        "key": run.key(),
        "spec": run.as_dict(),
        "accuracy": accuracy,
        "held_out_loss": held_out_loss,
        "train_loss_last10": statistics.fmean(finite) if len(finite) == 10 else float("nan"),
        "losses": losses,
        "state_bytes": optimizer_state_bytes(optimizer),
        "change_steps": change_steps,
        "change_max": change_max,
        "change_median": change_median,
        "guard_max": guard_max,
        "displacement": displacement,
        "warnings": warnings_seen[:20],
        "seconds": seconds,
        "load_avg": os.getloadavg(),
    }


class ResultStore:
    """Run results in a JSON file ``{"runs": [...]}``, rewritten (atomically) after each run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for result in json.loads(self.path.read_text())["runs"]:
                self.runs[result["key"]] = result

    def __contains__(self, run: RunSpec) -> bool:
        return run.key() in self.runs

    def get(self, run: RunSpec) -> dict[str, Any] | None:
        """The stored result of ``run``, or ``None``."""
        return self.runs.get(run.key())

    def add(self, result: Mapping[str, Any]) -> None:
        """Store a result and rewrite the file."""
        self.runs[result["key"]] = dict(result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"runs": list(self.runs.values())}, indent=None) + "\n")
        os.replace(temporary, self.path)

    def results(self, runs: Iterable[RunSpec]) -> list[dict[str, Any]]:
        """The stored results of ``runs`` that exist, in order."""
        return [self.runs[run.key()] for run in runs if run.key() in self.runs]
