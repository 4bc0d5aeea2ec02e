"""MkDocs hooks that put the generated parts of the site together (``hooks:`` in mkdocs.yml).

* API pages: every nav entry ``api/<dotted.module>.md`` without a file behind it is generated
  as ``::: <dotted.module>``, so documenting a new module is one line in ``mkdocs.yml``.
  ``api/index.md`` gets a table of every name in ``lora_optim.__all__`` linking to its page
  (the strict build fails if a public name's module has no page), and every public module of
  ``lora_optim`` that defines ``__all__`` must have a page (else a warning: the strict build
  fails).
* Notebooks: ``notebooks/*.ipynb`` (outside ``docs/``) are added to the site as they are
  committed (with outputs; mkdocs-jupyter renders them without executing anything).
* Repository links: a page's link to ``../benchmarks/results/NAME.md`` or
  ``../notebooks/NAME.ipynb`` (right when reading the Markdown in the repository) is pointed at
  the Benchmarks page or the rendered notebook.
* Benchmarks: the marker ``<!-- benchmark-results -->`` in ``benchmarks.md`` is replaced by
  every ``benchmarks/results/*.md`` found at build time, each followed by its ``.png`` plot.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from griffe_rst import to_markdown  # noqa: E402

log = logging.getLogger("mkdocs.hooks.site")
_API_PAGE = re.compile(r"^api/(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.md$")
BENCHMARK_MARKER = "<!-- benchmark-results -->"
RESULTS = ROOT / "benchmarks" / "results"
# A Markdown link or image target that is a relative path (not a URL, an anchor or absolute).
_LOCAL_LINK = re.compile(r"(\]\()(?![a-z][a-z0-9+.-]*:|/|#)([^)\s]+)\)")


def _nav_paths(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_paths(value)]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_paths(item)]
    return []


def _api_page(module: str) -> str:
    return f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n      show_root_toc_entry: false\n"


def _public_names_table() -> str:
    package = importlib.import_module("lora_optim")
    rows = ["| name | what it is |", "| --- | --- |"]
    for name in package.__all__:
        obj = getattr(package, name)
        module = getattr(obj, "__module__", None) or "lora_optim"
        doc = inspect.getdoc(obj) or ""
        summary = to_markdown(doc.split("\n\n")[0].replace("\n", " ")) if doc else ""
        summary = summary.replace("|", "\\|")
        rows.append(f"| [`{name}`][{module}.{name}] | {summary} |")
    return "\n".join(rows)


def _public_modules() -> list[str]:
    """Modules of ``lora_optim`` with no ``_``-prefixed part that define ``__all__``."""
    package = importlib.import_module("lora_optim")
    found = ["lora_optim"]
    for info in pkgutil.walk_packages(package.__path__, "lora_optim."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return [name for name in found if hasattr(importlib.import_module(name), "__all__")]


@event_priority(100)  # before mkdocs-jupyter looks at the files
def on_files(files: Files, config) -> Files:
    documented = set()
    for path in _nav_paths(config.nav or []):
        match = _API_PAGE.match(path)
        if match:
            documented.add(match["module"])
            if files.get_file_from_path(path) is None:
                files.append(File.generated(config, path, content=_api_page(match["module"])))
    # The package's own names are on api/index.md; every other public module needs a page.
    for module in sorted(set(_public_modules()) - documented - {"lora_optim"}):
        log.warning(f"public module {module} has no API page: add '- {module}: api/{module}.md' "
                    "to the API reference in mkdocs.yml")
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        src = f"notebooks/{notebook.name}"
        if files.get_file_from_path(src) is None:
            files.append(File(src, str(ROOT), config.site_dir, config.use_directory_urls))
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File(f"benchmarks/results/{plot.name}", str(ROOT), config.site_dir, config.use_directory_urls))
    return files


def _benchmark_sections(page_uri: str) -> str:
    reports = sorted(RESULTS.glob("*.md"))
    if not reports:
        return "*No benchmark results are committed yet.*\n"
    parts = []
    for report in reports:
        text = report.read_text(encoding="utf-8").strip()
        # Demote the report's headings so they sit under this page's title.
        text = re.sub(r"^(#+) ", lambda m: "#" + m[1] + " ", text, flags=re.MULTILINE)
        if not text.lstrip().startswith("#"):
            text = f"## `{report.stem}`\n\n{text}"
        # Links inside the report are relative to benchmarks/results/; the page is elsewhere.
        prefix = posixpath.relpath("benchmarks/results", posixpath.dirname(page_uri) or ".")
        text = _LOCAL_LINK.sub(lambda m: f"{m[1]}{prefix}/{m[2]})", text)
        parts.append(f"<!-- from benchmarks/results/{report.name} -->\n\n{text}\n")
        plot = report.with_suffix(".png")
        if plot.exists() and plot.name not in text:
            parts.append(f"![{report.stem}]({prefix}/{plot.name})\n")
        parts.append(f"*Source: `benchmarks/results/{report.name}`, written by `python benchmarks/{report.stem}.py`.*\n")
    return "\n".join(parts)


_REPO_LINK = re.compile(r"(\]\()((?:\.\./)+(?:benchmarks/results/[^)\s#]+\.md|notebooks/[^)\s#]+\.ipynb))((?:#[^)\s]*)?\))")


def _site_link(target: str, page_uri: str) -> str | None:
    """Page-relative site link for a repository-relative ``target`` of the page ``page_uri``."""
    repo_path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    if repo_path.startswith("benchmarks/results/"):
        site_path = "benchmarks.md"
    elif repo_path.startswith("notebooks/"):
        site_path = repo_path
    else:
        return None
    return posixpath.relpath(site_path, posixpath.dirname(page_uri) or ".")


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _REPO_LINK.sub(
        lambda m: f"{m[1]}{_site_link(m[2], page.file.src_uri) or m[2]}"
                  f"{m[3] if m[2].endswith('.ipynb') else ')'}", markdown)
    if page.file.src_uri == "api/index.md":
        markdown = markdown.replace("<!-- public-names -->", _public_names_table())
    if BENCHMARK_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_MARKER, _benchmark_sections(page.file.src_uri))
    return markdown
