"""The notebooks are committed as a reader should see them (the docs site renders these outputs).

No progress-bar frames, no local paths, no third-party notices: ``docs/tools/clean_notebooks.py``
leaves every committed notebook unchanged (run it after re-executing one). The cleaner itself
keeps lora_optim's own warnings and every figure a cell printed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _cleaner():
    spec = importlib.util.spec_from_file_location("clean_notebooks", ROOT / "docs" / "tools" / "clean_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    cleaner = _cleaner()
    text = path.read_text(encoding="utf-8")
    assert cleaner.notebook_json(cleaner.clean_notebook(json.loads(text))) == text, (
        f"{path.name} has progress bars, local paths or third-party notices in its outputs: "
        "run python docs/tools/clean_notebooks.py")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_plot_is_committed(path):
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code" and "plt.show()" in "".join(cell["source"]):
            assert any("image/png" in o.get("data", {}) for o in cell["outputs"]), (
                f"{path.name}: a cell that shows a plot has no image output")


def _stream(name, text):
    return {"name": name, "output_type": "stream", "text": text.splitlines(keepends=True)}


def test_cleaner_drops_noise_and_keeps_results_and_our_warnings():
    cleaner = _cleaner()
    ours = ("/home/someone/src/lora_optim/lora_optim/nonfinite.py:80: NonFiniteGradientWarning: "
            "a gradient held a NaN\n  warnings.warn(\n")
    notebook = {"cells": [{"cell_type": "code", "source": [], "outputs": [
        _stream("stderr", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.\n"),
        _stream("stderr", "\rseed 0:   0%|          | 0/25 [00:00<?, ?it/s]"),
        _stream("stderr", "\rseed 0: 100%|██████████| 25/25 [00:07<00:00,  3.27it/s]"),
        _stream("stderr", "\n"),
        _stream("stderr", "/work/x/.venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: "
                          "FutureWarning: `is_gradient_checkpointing` is deprecated\n  warnings.warn(\n"),
        _stream("stderr", ours),
        _stream("stdout", "held-out accuracy 0.847\n"),
        {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": ["<Figure>"]}, "metadata": {}},
    ]}]}
    outputs = cleaner.clean_notebook(notebook)["cells"][0]["outputs"]
    assert outputs[0] == _stream("stderr", "lora_optim/nonfinite.py:80: NonFiniteGradientWarning: a gradient held "
                                           "a NaN\n  warnings.warn(\n")
    assert outputs[1] == _stream("stdout", "held-out accuracy 0.847\n")
    assert outputs[2]["output_type"] == "display_data"
    assert len(outputs) == 3
