"""Smoke runs of the benchmark scripts (slow: ``pytest -m slow``).

Benchmarks are not tests, but a script that no longer runs against the library is a defect
found too late (``benchmarks/precision.py`` once called the writers through an interface the
step engine had replaced). Each script runs here in a fresh interpreter with its short setting
(``--quick`` where it has one), its results redirected by ``LORA_OPTIM_RESULTS_DIR`` to a
temporary folder so the committed tables are never overwritten; the test checks that it exits
cleanly and writes its markdown table (the numbers of a smoke run mean nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

#: script -> text its result file must hold (rows and tables a smoke run must not lose)
EXPECTED = {
    "step": ["## Native kernels against inductor", "| lora (compiled) |", "| lora (stochastic, compiled) |",
             "| AdamW fused (compiled) |", "| AdamW foreach (compiled) |", "write, bf16 W, stochastic"],
}

#: script -> (arguments, the result file it writes, or None where a smoke run writes none)
RUNS = {
    "step": (["--quick", "--repeats", "2"], "step.md"),
    "e2e": (["--quick", "--models", "minilm", "--rounds", "1"], "e2e.md"),
    "precision": (["--quick"], "precision.md"),
    "svd_init": (["--quick"], "svd_init.md"),
    "moment_rules": (["--quick"], "moment_rules.md"),
    "ranks": (["--quick"], "ranks.md"),
    "adapter_export": (["--quick"], None),
    "communication": ([], "communication.md"),
    "communication_estimate": ([], "communication_estimate.md"),
    "llm": (["--quick", "--rounds", "1"], "llm.md"),
    "write_modes": (["--quick"], "write_modes.md"),
    "projection_study": (["--quick"], "projection_study.md"),
}


def _env(results: Path) -> dict[str, str]:
    """A script's environment: results redirected, and this checkout's ``lora_optim`` first on
    the path (a script's ``sys.path[0]`` is its own folder, so an installed ``lora_optim`` of
    another checkout would be imported otherwise)."""
    path = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, LORA_OPTIM_RESULTS_DIR=str(results), MPLBACKEND="Agg", PYTHONPATH=path)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_script_runs(script, tmp_path):
    arguments, result = RUNS[script]
    env = _env(tmp_path)
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *arguments], cwd=BENCHMARKS.parent,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "|---" in done.stdout, done.stdout[-2000:]  # a markdown table was printed
    if result is not None:
        text = (tmp_path / result).read_text(encoding="utf-8")
        assert text.startswith("# ")
        missing = [expected for expected in EXPECTED.get(script, []) if expected not in text]
        assert not missing, missing


def test_results_folder_can_be_redirected_and_the_checkouts_library_is_imported(tmp_path):
    """The redirection the smoke runs rely on (without it they would overwrite committed files),
    and the library they run: this checkout's, not an installed one of another checkout."""
    code = "import _common, lora_optim; print(_common.RESULTS_DIR); print(lora_optim.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, env=_env(tmp_path), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert Path(out[0]) == tmp_path
    assert Path(out[1]).resolve().parent.parent == BENCHMARKS.parent  # the library of this checkout
