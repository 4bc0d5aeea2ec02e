"""The recipe of docs/causal-lm.md, run as written: TRL's ``SFTTrainer`` with ``LoRAAdam`` on a bf16
causal LM (a tiny Llama built from a config, random weights), the activation-side mode,
non-reentrant activation checkpointing, and the export of a PEFT adapter.

The page's second code block is read from the page and executed with ``model``, ``tokenizer``,
``dataset`` and ``output_dir`` given here (the page's first block loads them from the hub). The
run must train every adapted weight and nothing else, equal the same run without checkpointing
bit for bit, and export the exact change: PEFT's merge of the adapter into the original weights
gives the trained weights up to their stochastic rounding (under one bf16 ulp per write, unbiased).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parent.parent / "docs" / "causal-lm.md"
MARKER = "<!-- recipe: tests/test_causal_lm_recipe.py runs this block -->"


def _recipe() -> str:
    text = PAGE.read_text(encoding="utf-8")
    after = text.split(MARKER, 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def _setup():
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_optim.examples import minilm_task as mt

    tokenizer = mt.load_tokenizer()  # packaged with the MiniLM (no download); a BERT tokenizer does here
    tokenizer.eos_token = tokenizer.sep_token
    texts = mt.build_docstring_task(seed=0).train_texts[:48]
    dataset = Dataset.from_list([{"text": text} for text in texts])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model, tokenizer, dataset


def _run(recipe: str, tmp_path: Path, name: str) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    model, tokenizer, dataset = _setup()
    original = copy.deepcopy(model)
    namespace = {"model": model, "tokenizer": tokenizer, "dataset": dataset, "output_dir": str(tmp_path / name)}
    exec(compile(recipe, str(PAGE), "exec"), namespace)
    return namespace, model, original


def test_the_causal_lm_recipe_trains_checkpointed_and_exports_an_adapter(tmp_path):
    from peft import PeftModel

    recipe = _recipe()
    assert "gradient_checkpointing=True" in recipe and "optimizer.attach(model)" in recipe
    namespace, model, original = _run(recipe, tmp_path, "checkpointed")
    assert model.is_activation_checkpointing
    losses = [entry["loss"] for entry in namespace["trainer"].state.log_history if "loss" in entry]
    assert len(losses) == namespace["args"].max_steps and all(map(torch.isfinite, torch.tensor(losses)))

    targets = namespace["TARGETS"]
    for (name, p), p0 in zip(model.named_parameters(), original.parameters()):
        adapted = name.rsplit(".", 2)[-2] in targets
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, p0) != adapted, name  # every adapted weight moved, nothing else did

    # Checkpointing changes memory, not the training: the same run without it, bit for bit.
    _, plain, _ = _run(recipe.replace("gradient_checkpointing=True", "gradient_checkpointing=False"), tmp_path,
                       "not-checkpointed")
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name

    # The exported adapter is the exact fp32 change: merged by PEFT into the original weights (in
    # fp64), it gives the trained weights up to the stochastic rounding of their writes: an
    # unbiased error, smaller than the change itself.
    report = namespace["report"]
    assert {module.route for module in report.modules} == {"exact"} and len(report.modules) == 2 * len(targets)
    merged = PeftModel.from_pretrained(copy.deepcopy(original).double(), str(report.path)).merge_and_unload()
    errors, changes = [], []
    for (name, p), exact, start in zip(model.named_parameters(), merged.parameters(), original.parameters()):
        if name.rsplit(".", 2)[-2] not in targets:
            assert torch.equal(p.double(), exact), name
            continue
        error, change = p.double() - exact, exact - start.double()
        # Normalised sums of the errors, plain and along the change's sign: each ~N(0, 1) when
        # the errors are independent with zero mean; writes that were lost or shrunk would push
        # the second far below zero.
        scale = error.square().sum().sqrt()
        for weighting in (torch.ones_like(error), torch.sign(change)):
            assert abs((error * weighting).sum() / scale) < 5, name
        errors.append(error.flatten())
        changes.append(change.flatten())
    relative = (torch.cat(errors).norm() / torch.cat(changes).norm()).item()
    assert relative < 0.6, relative  # measured 0.3 (nearest rounding loses most of the change)
