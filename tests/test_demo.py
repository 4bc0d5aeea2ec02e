"""Smoke test of ``python -m lora_optim.demo``: ``main(["--quick", "--adapter-dir", DIR])`` in-process.

``--quick`` trains every method for 3 steps of batch 8 × 32 tokens on 64 training docstrings and
scores on 16 held-out ones, so this checks the wiring (every method builds, steps, is measured
and gets its table row; the LoRAAdam runs are exported as PEFT adapters and scored reloaded by
PEFT; stdout holds the markdown table and the adapters' paths and nothing else), not the numbers.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest

from lora_optim import demo

#: The methods trained by LoRAAdam, whose adapters the demo exports.
LORA_OPTIM_METHODS = ("lora", "random", "additive")


@pytest.fixture(scope="module")
def quick_output(tmp_path_factory) -> tuple[int, str, Path]:
    out = io.StringIO()
    adapters = tmp_path_factory.mktemp("demo_adapters")
    with pytest.MonkeyPatch.context() as patch:  # module scope: capsys is per test
        patch.setattr(sys, "stdout", out)
        code = demo.main(["--quick", "--adapter-dir", str(adapters)])
    return code, out.getvalue(), adapters


def _table(out: str) -> list[str]:
    return out.strip().split("\n\n")[0].splitlines()


def _rows(table: list[str]) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}


def test_stdout_is_the_markdown_table_then_the_adapters(quick_output):
    code, out, adapters = quick_output
    assert code == 0
    table = _table(out)
    assert table[0].startswith("| method | lr | train loss | held-out acc | PEFT-reloaded acc |"), table[0]
    assert set(table[1]) <= set("|-: "), table[1]
    assert all(line.startswith("|") and line.endswith("|") for line in table), out
    assert len(table) == 2 + len(demo.METHODS)
    listing = out.strip().split("\n\n")[1].splitlines()
    assert listing[0].startswith("PEFT adapters")
    assert [line.split()[1] for line in listing[1:]] == list(LORA_OPTIM_METHODS)
    for method in LORA_OPTIM_METHODS:
        assert str(adapters / method) in out
        assert (adapters / method / "adapter_config.json").is_file()
        assert (adapters / method / "adapter_model.safetensors").is_file()


def test_table_has_a_row_per_method_with_finite_numbers(quick_output):
    _, out, _ = quick_output
    rows = _rows(_table(out))
    assert list(rows) == list(demo.METHODS)
    for name, cells in rows.items():
        reloaded = cells.pop(3)
        numbers = [float(c) for c in cells]
        assert all(math.isfinite(x) for x in numbers), (name, cells)
        lr, loss, acc, state_mib, adapter_mib, step_s, opt_ms = numbers
        assert lr == pytest.approx(demo.METHODS[name].lr)
        assert 0.0 <= acc <= 1.0 and loss > 0.0 and step_s > 0.0 and state_mib > 0.0
        if name in LORA_OPTIM_METHODS:
            assert 0.0 <= float(reloaded) <= 1.0
        else:
            assert reloaded == "-"
    # The exact adapters reproduce the trained model, so its accuracy (columns: lr, loss, acc, reloaded, ...).
    fresh = _rows(_table(out))
    for name in ("lora", "additive"):
        assert fresh[name][3] == fresh[name][2], (name, fresh[name])
    # The memory column means what it says: full AdamW keeps two moments of all 22.7M params
    # (~173 MiB), LoRAAdam a few MiB of factors and moments, PEFT keeps its adapters in the model.
    assert float(rows["adamw"][3]) > 20 * float(rows["lora"][3])
    assert float(rows["peft"][4]) > 0.0 and float(rows["lora"][4]) == 0.0


def test_bad_arguments_are_rejected():
    for argv in (["--methods", "nope"], ["--lr", "lora=-1"], ["--lr", "nope=1e-3"], ["--rank", "0"]):
        with pytest.raises(SystemExit):
            demo.main(argv)
