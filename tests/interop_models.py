"""Small models with every layer type PEFT's LoRA adapts, for the adapter export/import tests."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from grad_modes import rel as relative  # noqa: F401  (‖a − b‖ / ‖b‖, for the tests that import it from here)
from lora_optim import LoRAAdam


class Small(nn.Module):
    """Embedding -> Linear -> LayerNorm -> head, plus a convolution on an image input."""

    def __init__(self, width: int = 6, conv: str = "2d", kernel: int = 3, vocabulary: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocabulary, width)
        self.lin = nn.Linear(width, width + 1)
        self.norm = nn.LayerNorm(width + 1)
        self.head = nn.Linear(width + 1, 3)
        if conv == "1d":
            self.conv = nn.Conv1d(2, 4, kernel, padding=kernel // 2)
        else:
            self.conv = nn.Conv2d(2, 4, kernel, padding=kernel // 2)
        self.conv_kind = conv

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        text = self.head(self.norm(torch.tanh(self.lin(self.emb(ids))))).mean(1)
        pixels = self.conv(image).flatten(2).mean(2)[:, :3]
        return text + pixels


def make_small(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> Small:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Small(**kwargs)
    return model.to(dtype)


def inputs(model: Small, rows: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = model.lin.weight.dtype
    ids = torch.randint(0, model.emb.num_embeddings, (rows, 5), generator=gen)
    shape = (rows, 2, 9) if model.conv_kind == "1d" else (rows, 2, 5, 5)
    return ids, torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


#: The weights trained through factors.
LOW_RANK = ("emb.weight", "lin.weight", "conv.weight")


def optimizer_for(model: Small, *, rank: int = 2, alpha: float = 3.0, dense: tuple[str, ...] = ("head.weight",
                  "head.bias", "lin.bias"), lr: float = 2e-2, **options) -> LoRAAdam:
    """Low-rank group: the embedding, Linear and convolution weights; dense group: ``dense``."""
    named = dict(model.named_parameters())
    low_rank = [named[name] for name in LOW_RANK]
    for name, p in named.items():
        p.requires_grad_(name in LOW_RANK or name in dense)  # the LayerNorm and the conv bias stay frozen
    groups = [{"params": low_rank, "rank": rank, "alpha": alpha, **options}]
    if dense:
        groups.append({"params": [named[name] for name in dense], "rank": None})
    return LoRAAdam(groups, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def train(model: Small, optimizer: LoRAAdam, steps: int = 3, seed: int = 2) -> None:
    for step in range(steps):
        ids, image = inputs(model, seed=seed + step)
        model(ids, image).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def load_with_peft(base: nn.Module, path) -> nn.Module:
    """``PeftModel.from_pretrained`` on a copy of ``base``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about the model's config and its own dtype casts
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    loaded.eval()
    return loaded

