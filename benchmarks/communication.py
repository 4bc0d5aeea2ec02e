"""Bytes communicated per training step on 2 ranks, read from the process group's traffic.

The packaged MiniLM (``lora_optim.examples.minilm_task``) is trained on 2 CPU processes (gloo),
wrapped in ``DistributedDataParallel`` or sharded by FSDP2 (``fully_shard`` on every encoder
layer and the root), for each method: full AdamW, HF PEFT LoRA (r = 8 on query/key/value/dense,
AdamW on the adapters), and ``LoRAAdam`` at r = 8 on the same weights in the plain mode, the
activation-side mode and the per-layer mode. The classification head trains densely everywhere.

The count is not a formula: ``torch.profiler`` records every collective gloo runs (``gloo:*``
events, with the shape and dtype of what each rank hands over), during one training step
(forward, backward, ``step``) after two warm-up steps; the table sums the payload per rank by
collective. gloo has no reduce-scatter of its own: FSDP2's reduce-scatter of the gradients runs
as an all-reduce of the whole unsharded gradient there (NCCL moves a world-size-th of it).

Run ``python benchmarks/communication.py``; it writes ``benchmarks/results/communication.md``.
Its figures do not depend on the machine's load (they count bytes, not seconds).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, machine_info, markdown_table, save_results  # noqa: E402

TARGETS = ("query", "key", "value", "dense")
RANK, ALPHA, LR = 8, 16.0, 1e-4
BATCH, SEQ = 4, 32
METHODS = ("full AdamW", "PEFT LoRA", "lora_optim plain", "lora_optim activation-side", "lora_optim per-layer")
WRAPPERS = ("DDP", "FSDP2")


def _setup(method: str, wrapper: str):
    """``(model, optimizer, note)`` for one method under one wrapper; the model is wrapped."""
    from lora_optim import LoRAAdam
    from lora_optim.examples import minilm_task as mt

    model = mt.build_classifier(6, seed=0, dropout=0.0)
    note = ""
    if method == "full AdamW":
        trainable = list(model.parameters())
    elif method == "PEFT LoRA":
        from peft import LoraConfig, get_peft_model

        model.encoder = get_peft_model(model.encoder, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                 target_modules=list(TARGETS)))
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [m.weight for n, m in model.encoder.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
        for p in weights + list(model.head.parameters()):
            p.requires_grad_(True)
        trainable = None

    if wrapper == "FSDP2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.modules():
            if type(layer).__name__.endswith("Layer") and hasattr(layer, "attention"):
                fully_shard(layer)
        fully_shard(model)
    if method == "full AdamW" or method == "PEFT LoRA":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        return (nn.parallel.DistributedDataParallel(model) if wrapper == "DDP" else model), optimizer, note

    weights = [m.weight for n, m in model.encoder.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    optimizer = LoRAAdam([{"params": weights, "rank": RANK, "alpha": ALPHA},
                          {"params": list(model.head.parameters()), "rank": None}], lr=LR)
    if method == "lora_optim activation-side":
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = optimizer.attach(model)  # before DDP wraps the model
        if handle.fallback:
            note = f"{len(handle.fallback)} weights keep the G path ({next(iter(handle.fallback.values()))})"
        del caught
    elif method == "lora_optim per-layer":
        optimizer.enable_per_layer()  # raises in a process group: reported as refused
    return (nn.parallel.DistributedDataParallel(model) if wrapper == "DDP" else model), optimizer, note


def _batches(rank: int, steps: int):
    import itertools

    from lora_optim.examples import minilm_task as mt

    task = mt.build_docstring_task(seed=0)
    encodings = mt.tokenize(task.train_texts, mt.load_tokenizer(), max_length=SEQ)
    batches = mt.iterate_batches(encodings, task.train_labels, BATCH, seed=rank, num_epochs=None, trim_padding=False)
    return list(itertools.islice(batches, steps))


def _payload(prof) -> dict[str, int]:
    """Bytes handed to gloo per collective kind, summed over the profiled events of this rank."""
    totals: dict[str, int] = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("gloo:"):
            continue
        shapes, dtypes = event.input_shapes or [], getattr(event, "input_dtypes", None) or []
        for shape, dtype in zip(shapes, dtypes):
            if not shape:
                continue
            numel = 1
            for size in shape:
                numel *= size
            itemsize = torch.empty((), dtype=getattr(torch, dtype.replace("c10::", "").lower(), torch.float32)).element_size() \
                if dtype else 4
            totals[event.name.removeprefix("gloo:")] += numel * itemsize
    return dict(totals)


def worker(rank: int, world: int, out: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from lora_optim.examples import minilm_task as mt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    batches = _batches(rank, 3)
    results = {}
    try:
        for wrapper in WRAPPERS:
            for method in METHODS:
                key = f"{wrapper}|{method}"
                try:
                    model, optimizer, note = _setup(method, wrapper)
                except RuntimeError as error:
                    results[key] = {"refused": str(error).split(":")[0]}
                    continue
                for step, batch in enumerate(batches):
                    if step < 2:
                        mt.cross_entropy_loss(model, batch).backward()
                        optimizer.step()
                        optimizer.zero_grad()
                        continue
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                        mt.cross_entropy_loss(model, batch).backward()
                        optimizer.step()
                    optimizer.zero_grad()
                results[key] = {"bytes": _payload(prof), "note": note}
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _table(results: dict) -> str:
    kinds = sorted({kind for r in results.values() for kind in r.get("bytes", {})})
    rows = []
    for wrapper in WRAPPERS:
        reference = results.get(f"{wrapper}|full AdamW", {}).get("bytes")
        reference_total = sum(reference.values()) if reference else None
        for method in METHODS:
            result = results[f"{wrapper}|{method}"]
            if "refused" in result:
                rows.append([wrapper, method, *["–"] * len(kinds), "refused", "", result["refused"]])
                continue
            by_kind = result["bytes"]
            total = sum(by_kind.values())
            rows.append([wrapper, method, *[f"{by_kind.get(kind, 0) / 2**20:.2f}" for kind in kinds],
                         f"{total / 2**20:.2f}", f"{total / reference_total:.3f}" if reference_total else "",
                         result.get("note", "")])
    return markdown_table(["wrapper", "method", *[f"{kind} MiB" for kind in kinds], "total MiB", "÷ full AdamW", "note"],
                          rows)


def main() -> None:
    before = machine_info()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(2, out), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(2)]
    after = machine_info()
    text = header("Bytes communicated per training step, MiniLM on 2 ranks", before, after)
    text += (
        f"Payload handed to gloo per rank during one step (forward, backward, `step`) after two warm-up steps, "
        f"batch {BATCH}×{SEQ} per rank, r = {RANK} on query/key/value/dense (36 matrices), fp32; from "
        "`torch.profiler`'s `gloo:*` events (rank 0; rank 1 is listed below where it differs). gloo runs "
        "FSDP2's reduce-scatter as an all-reduce of the whole gradient. Command: `python benchmarks/communication.py`.\n\n"
        + _table(ranks[0]) + "\n"
    )
    differing = [key for key in ranks[0] if ranks[0][key] != ranks[1].get(key)]
    if differing:
        text += "\nRank 1:\n\n" + _table(ranks[1]) + "\n"
    save_results("communication", text, None)


if __name__ == "__main__":
    main()
