"""Strip the noise from the committed outputs of the notebooks, keeping what they measured.

``python docs/tools/clean_notebooks.py`` rewrites ``notebooks/*.ipynb`` in place (run it after
re-executing a notebook); ``--check`` only reports, and exits 1 if a notebook would change
(``tests/test_notebook_outputs.py`` asserts the committed notebooks are clean). In the text a
cell printed (stdout, stderr):

* progress bars are removed: every tqdm frame (``\\r``-separated redraws) and the final bar line
  (their figures, where they matter, are printed by the notebooks themselves);
* third-party notices are removed: a warning raised inside ``site-packages`` (with the source
  line Python prints under it) and the lines of :data:`THIRD_PARTY_LINES`;
* absolute paths into the repository are made relative (``/home/me/lora_optim/lora_optim/x.py``
  becomes ``lora_optim/x.py``), so no local path is committed;

and a stream output left empty is dropped; the per-cell execution timestamps nbconvert records
(``metadata.execution``) are removed. Warnings of lora_optim itself stay. Nothing else (code,
images, tables, execution counts) is touched; the JSON is written as Jupyter writes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Lines printed by third-party packages that are not about the notebook (matched anywhere).
THIRD_PARTY_LINES = (
    re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# tqdm's bar: "desc:  40%|████      | 2/5 [00:01<00:02,  1.2it/s]" (the desc is optional).
_PROGRESS_BAR = re.compile(r"^.*\d+%\|.*\|\s*\d+(?:\.\d+)?[kMG]?/\d+(?:\.\d+)?[kMG]?\s*\[.*\]\s*$")
# "/abs/path/site-packages/pkg/mod.py:123: SomeWarning: message"
_THIRD_PARTY_WARNING = re.compile(r"^\S*[/\\]site-packages[/\\]\S+:\d+: \w*Warning\b")
# An absolute path ending in one of the repository's top-level folders.
_REPO_PATH = re.compile(r"(?<![\w.])(?:/[^\s/:'\"]+)+/(?=(?:lora_optim|notebooks|benchmarks|tests|docs)/)")


def _final_text(text: str) -> str:
    """``text`` as a terminal shows it: each line's last ``\\r``-separated redraw."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean_stream_text(text: str) -> str:
    """The text of one stream output with progress bars and third-party notices removed."""
    kept: list[str] = []
    lines = _final_text(text).split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if _THIRD_PARTY_WARNING.match(line):
            index += 1
            while index < len(lines) and lines[index].startswith("  "):  # the source line shown
                index += 1
            continue
        if _PROGRESS_BAR.match(line) or any(p.search(line) for p in THIRD_PARTY_LINES):
            index += 1
            continue
        kept.append(_REPO_PATH.sub("", line))
        index += 1
    cleaned = "\n".join(kept)
    return "" if not cleaned.strip() else cleaned


def _merged_streams(outputs: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for output in outputs:
        if (output.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1]["name"] == output["name"]):
            merged[-1]["text"] = "".join(merged[-1]["text"]) + "".join(output["text"])
        else:
            merged.append(copy.deepcopy(output))
    return merged


def clean_notebook(notebook: dict) -> dict:
    """A copy of ``notebook`` with every code cell's stream outputs cleaned."""
    cleaned = copy.deepcopy(notebook)
    for cell in cleaned.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        outputs = []
        for output in _merged_streams(cell.get("outputs", [])):
            if output.get("output_type") == "stream":
                text = clean_stream_text("".join(output["text"]))
                if not text:
                    continue
                output["text"] = text.splitlines(keepends=True)
            outputs.append(output)
        cell["outputs"] = outputs
    return cleaned


def notebook_json(notebook: dict) -> str:
    """The file text Jupyter writes for ``notebook`` (one-space indent, UTF-8, final newline)."""
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not clean")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    unclean = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        cleaned = notebook_json(clean_notebook(json.loads(text)))
        if cleaned != text:
            unclean.append(path)
            if not args.check:
                path.write_text(cleaned, encoding="utf-8")
    verb = "not clean" if args.check else "cleaned"
    for path in unclean:
        print(f"{verb}: {path}")
    return 1 if args.check and unclean else 0


if __name__ == "__main__":
    sys.exit(main())
