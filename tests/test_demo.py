"""Smoke test of ``python -m lora_optim.demo``: ``main(["--quick"])`` in-process.

``--quick`` trains every method for 3 steps of batch 8 × 32 tokens on 64 training docstrings and
scores on 16 held-out ones, so this checks the wiring (every method builds, steps, is measured
and gets its table row; stdout holds the markdown table and nothing else), not the numbers.
"""

from __future__ import annotations

import io
import math
import sys

import pytest

from lora_optim import demo


@pytest.fixture(scope="module")
def quick_output() -> tuple[int, str]:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:  # module scope: capsys is per test
        patch.setattr(sys, "stdout", out)
        code = demo.main(["--quick"])
    return code, out.getvalue()


def _rows(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_stdout_is_exactly_the_markdown_table(quick_output):
    code, out = quick_output
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("| method | lr | train loss | held-out acc |"), lines[0]
    assert set(lines[1]) <= set("|-: "), lines[1]
    assert all(line.startswith("|") and line.endswith("|") for line in lines), out
    assert len(lines) == 2 + len(demo.METHODS)


def test_table_has_a_row_per_method_with_finite_numbers(quick_output):
    _, out = quick_output
    rows = _rows(out)
    assert list(rows) == list(demo.METHODS)
    for name, cells in rows.items():
        numbers = [float(c) for c in cells]
        assert all(math.isfinite(x) for x in numbers), (name, cells)
        lr, loss, acc, state_mib, adapter_mib, step_s, opt_ms = numbers
        assert lr == pytest.approx(demo.METHODS[name].lr)
        assert 0.0 <= acc <= 1.0 and loss > 0.0 and step_s > 0.0 and state_mib > 0.0
    # The memory column means what it says: full AdamW keeps two moments of all 22.7M params
    # (~173 MiB), LoRAAdam a few MiB of factors and moments, PEFT keeps its adapters in the model.
    assert float(rows["adamw"][3]) > 20 * float(rows["lora"][3])
    assert float(rows["peft"][4]) > 0.0 and float(rows["lora"][4]) == 0.0


def test_bad_arguments_are_rejected():
    for argv in (["--methods", "nope"], ["--lr", "lora=-1"], ["--lr", "nope=1e-3"], ["--rank", "0"]):
        with pytest.raises(SystemExit):
            demo.main(argv)
