"""What each method communicates per training step, per matrix and for a 7B model on 8 GPUs.

An estimate from the shapes, not a measurement (``benchmarks/communication.py`` measures the
MiniLM on 2 ranks): for each method, the payload each rank hands to its collectives per step,
counted the way NCCL's ring algorithms move data (an all-reduce of ``n`` values sends and
receives ``2·(k−1)/k·n`` per rank over ``k`` ranks; an all-gather or a reduce-scatter
``(k−1)/k·n``). The model is Llama-2-7B's shape: 32 layers of 4 attention projections
(4096×4096) and 3 MLP projections (4096×11008 and 11008×4096), plus 131M embedding and 131M
output parameters and 0.3M norm weights, in bf16 (2 bytes); LoRA-style methods at r = 16 on
all seven projections, the embeddings and the output layer frozen.

Rows:

* AdamW (DDP): all-reduce of every gradient.
* AdamW (FSDP/FSDP2): all-gather of the weights for the forward and again for the backward,
  reduce-scatter of the gradients.
* GaLore (DDP): DDP all-reduces the full gradients (its projection happens in the optimizer).
* PEFT LoRA (DDP): all-reduce of the adapters' gradients ``r·(out+in)``.
* PEFT LoRA (FSDP2): all-gather of the frozen weights (forward and backward) and the adapters,
  reduce-scatter of the adapters' gradients.
* lora_optim, G path (DDP): DDP all-reduces ``G`` (as GaLore).
* lora_optim, G path (FSDP2): weights all-gathered twice, ``G`` reduce-scattered, plus the
  optimizer's all-reduce of the partial ``g_B`` (``r·in``).
* lora_optim, activation-side (DDP): all-reduce of ``g_A`` and ``g_B`` (``r·(out+in)``).
* lora_optim, activation-side (FSDP2): weights all-gathered twice (FSDP2 still needs them),
  all-gather of ``A`` (``out·r``) per matrix, all-reduce of ``r·(out+in)``; no gradient of ``W``.

Run ``python benchmarks/communication_estimate.py`` (``--ranks``, ``--rank``); it prints the
tables and writes ``benchmarks/results/communication_estimate.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, save_results  # noqa: E402

LAYERS = 32
MATRICES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]  # (out, in) per layer
EMBEDDING = 32000 * 4096
OUTPUT = 32000 * 4096
NORMS = 65 * 4096
BYTES = 2  # bf16


def all_reduce(values: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * values


def gather_or_scatter(values: float, ranks: int) -> float:
    return (ranks - 1) / ranks * values


def per_matrix(out: int, inn: int, rank: int, ranks: int) -> dict[str, float]:
    """Values each rank sends per step for one ``out×in`` matrix, by method (weights in the
    model's dtype; the factor gradients in fp32 would double the last two rows)."""
    full, low = out * inn, rank * (out + inn)
    return {
        "AdamW (DDP)": all_reduce(full, ranks),
        "AdamW (FSDP2)": 2 * gather_or_scatter(full, ranks) + gather_or_scatter(full, ranks),
        "GaLore (DDP)": all_reduce(full, ranks),
        "PEFT LoRA (DDP)": all_reduce(low, ranks),
        "PEFT LoRA (FSDP2)": 2 * gather_or_scatter(full + low, ranks) + gather_or_scatter(low, ranks),
        "lora_optim, G path (DDP)": all_reduce(full, ranks),
        "lora_optim, G path (FSDP2)": 2 * gather_or_scatter(full, ranks) + gather_or_scatter(full, ranks)
        + all_reduce(rank * inn, ranks),
        "lora_optim, activation-side (DDP)": all_reduce(low, ranks),
        "lora_optim, activation-side (FSDP2)": 2 * gather_or_scatter(full, ranks) + gather_or_scatter(out * rank, ranks)
        + all_reduce(low, ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    args = parser.parse_args()
    ranks, rank = args.ranks, args.rank

    example = per_matrix(4096, 4096, rank, ranks)
    rows = [[method, f"{values * BYTES / 2**20:.2f}", f"{values / example['AdamW (DDP)']:.4f}"]
            for method, values in example.items()]
    text = "# Communication per training step: an estimate from the shapes\n\n"
    text += (f"Command: `python benchmarks/communication_estimate.py --ranks {ranks} --rank {rank}`. Per rank, "
             f"ring algorithms over {ranks} ranks, bf16 values; not a measurement.\n\n"
             f"## One 4096×4096 matrix, r = {rank}\n\n"
             + markdown_table(["method", "MiB per step", "÷ AdamW (DDP)"], rows) + "\n")

    totals: dict[str, float] = {}
    for out, inn in MATRICES:
        for method, values in per_matrix(out, inn, rank, ranks).items():
            totals[method] = totals.get(method, 0.0) + LAYERS * values
    frozen = EMBEDDING + OUTPUT
    dense = NORMS  # trained by every method (LoRA-style methods train norms densely too)
    for method in totals:
        if method.startswith(("AdamW", "GaLore")):
            extra = all_reduce(frozen + dense, ranks) if "DDP" in method else 3 * gather_or_scatter(frozen + dense, ranks)
        elif "FSDP2" in method:
            extra = 2 * gather_or_scatter(frozen + dense, ranks) + gather_or_scatter(dense, ranks)
        else:
            extra = all_reduce(dense, ranks)
        totals[method] += extra
    reference = totals["AdamW (DDP)"]
    rows = [[method, f"{values * BYTES / 2**30:.2f}", f"{values / reference:.4f}"] for method, values in totals.items()]
    text += (f"\n## Llama-2-7B shape on {ranks} ranks, r = {rank} on the 7 projections of every layer\n\n"
             + markdown_table(["method", "GiB per step per rank", "÷ AdamW (DDP)"], rows) + "\n\n"
             "With FSDP2 the weights' all-gathers dominate whatever the optimizer does; with DDP the "
             "activation-side mode communicates what PEFT LoRA does, and the G path what AdamW does.\n")
    save_results("communication_estimate", text)


if __name__ == "__main__":
    main()
