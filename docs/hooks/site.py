"""MkDocs hooks that put the generated parts of the site together (``hooks:`` in mkdocs.yml).

* API pages: every nav entry ``api/<dotted.module>.md`` without a file behind it is generated
  as ``::: <dotted.module>``, so documenting a new module is one line in ``mkdocs.yml``. The
  API nav has two groups: a section whose title starts with "Internal" holds modules that are
  not part of the public API (their pages say so); a module that defines a name of
  ``lora_optim.__all__`` must not be in it, no module may be listed twice, and every public
  module of ``lora_optim`` that defines ``__all__`` must have a page (each a warning: the strict
  build fails). ``api/index.md`` gets a table of every name in ``lora_optim.__all__``.
* Notebooks: ``notebooks/*.ipynb`` (outside ``docs/``) are added to the site as they are
  committed (with outputs; mkdocs-jupyter renders them without executing anything). Their
  table of contents gets the ids their headings really have, their repository-relative links
  (``../docs/x.md``) become site links, and mkdocs-jupyter's MathJax loader is removed.
* Math: TeX becomes MathML at build time (``math_render.py``); no script renders it.
* Repository links: a page's link to ``../benchmarks/results/NAME.md``,
  ``../notebooks/NAME.ipynb`` or ``../CHANGELOG.md`` (right when reading the Markdown in the
  repository) is pointed at the page the site makes of it.
* Benchmarks: one page per ``benchmarks/results/NAME.md`` (``benchmarks/NAME.md``, added to
  the nav after ``benchmarks.md``), and the marker ``<!-- benchmark-summary -->`` becomes a
  table with one line per result file: what, its headline (from ``benchmarks/headlines.yml``;
  every number of a headline must appear in its result file), machine and load.
* Shared text: ``<!-- include: PATH#NAME -->`` in a page is replaced by the part of the
  repository file PATH between ``<!-- section: NAME -->`` and ``<!-- /section: NAME -->``, with
  its links made relative to the page. The landing page takes the README's shared sections
  this way, so the two cannot drift apart.
* Project facts: ``<!-- project-facts -->`` becomes a line with the version, the Python and
  torch ranges (``pyproject.toml``), the tested torch (``constraints.txt``) and the licence;
  the version is also in every page's footer. ``CHANGELOG.md`` is the page ``changelog.md``.
* Links: after the build every internal link and anchor of the built HTML is checked
  (``link_check.py``); each broken one is a warning, so the strict build fails.
"""

from __future__ import annotations

import html
import importlib
import inspect
import logging
import pkgutil
import posixpath
import re
import sys
from pathlib import Path

import yaml
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from griffe_rst import to_markdown  # noqa: E402
from link_check import check_site  # noqa: E402
from math_render import render_arithmatex, render_display_dollars, render_notebook_markdown, render_title  # noqa: E402
from project_facts import project_facts  # noqa: E402

log = logging.getLogger("mkdocs.hooks.site")
_API_PAGE = re.compile(r"^api/(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.md$")
BENCHMARK_SUMMARY_MARKER = "<!-- benchmark-summary -->"
PROJECT_FACTS_MARKER = "<!-- project-facts -->"
RESULTS = ROOT / "benchmarks" / "results"
HEADLINES = ROOT / "benchmarks" / "headlines.yml"
CHANGELOG = ROOT / "CHANGELOG.md"
# A Markdown link or image target that is a relative path (not a URL, an anchor or absolute).
_LOCAL_LINK = re.compile(r"(\]\()(?![a-z][a-z0-9+.-]*:|/|#)([^)\s]+)\)")
_INCLUDE = re.compile(r"<!-- include: (?P<path>[^#\s]+)#(?P<name>[\w-]+) -->")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

# Filled by on_config: the API nav's modules, and which of them are internal.
_api_modules: list[str] = []
_internal_modules: set[str] = set()


# --- configuration: nav, footer -------------------------------------------------------------

def _nav_entries(nav: object, section: str = "") -> list[tuple[str, str]]:
    """``(path, title of the innermost section)`` for every page of a nav tree."""
    if isinstance(nav, str):
        return [(nav, section)]
    if isinstance(nav, dict):
        found = []
        for title, value in nav.items():
            found += _nav_entries(value, title if isinstance(value, list) else section)
        return found
    if isinstance(nav, list):
        return [entry for item in nav for entry in _nav_entries(item, section)]
    return []


def _result_title(report: Path) -> str:
    """The first heading of a result file, as plain text (no code spans)."""
    match = re.search(r"^# (.+)$", report.read_text(encoding="utf-8"), re.MULTILINE)
    return match[1].replace("`", "").strip() if match else report.stem


def _add_benchmark_pages(nav: list) -> None:
    """Put one nav entry per result file in the section that holds ``benchmarks.md``."""
    for item in nav:
        if isinstance(item, dict):
            for value in item.values():
                if isinstance(value, list):
                    children = [c for entry in value for c in (entry.values() if isinstance(entry, dict) else [entry])]
                    if "benchmarks.md" in children:
                        value += [{_result_title(r): f"benchmarks/{r.stem}.md"}
                                  for r in sorted(RESULTS.glob("*.md"))]
                        return
                    _add_benchmark_pages(value)


def on_config(config):
    facts = project_facts(ROOT)
    config.copyright = f"lora_optim {facts.version} · {facts.license} licence"
    if facts.repository and not config.repo_url:
        config.repo_url = facts.repository
    _add_benchmark_pages(config.nav or [])
    _api_modules.clear()
    _internal_modules.clear()
    for path, section in _nav_entries(config.nav or []):
        match = _API_PAGE.match(path)
        if match:
            _api_modules.append(match["module"])
            if section.lower().startswith("internal"):
                _internal_modules.add(match["module"])
    return config


# --- files: API pages, notebooks, benchmark pages, changelog ---------------------------------

def _api_page(module: str, internal: bool) -> str:
    note = ('!!! note "Internal module"\n    Not part of the public API: documented for contributors; '
            "it may change in any release without notice.\n\n") if internal else ""
    return (f"# `{module}`\n\n{note}::: {module}\n    options:\n      show_root_heading: false\n"
            "      show_root_toc_entry: false\n")


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
    # md_in_html: the wrapper's class lets the stylesheet keep names on one line.
    return '<div class="public-names" markdown>\n\n' + "\n".join(rows) + "\n\n</div>"


def _public_modules() -> list[str]:
    """Modules of ``lora_optim`` with no ``_``-prefixed part that define ``__all__``."""
    package = importlib.import_module("lora_optim")
    found = ["lora_optim"]
    for info in pkgutil.walk_packages(package.__path__, "lora_optim."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return [name for name in found if hasattr(importlib.import_module(name), "__all__")]


def _check_api_nav() -> None:
    seen: set[str] = set()
    for module in _api_modules:
        if module in seen:
            log.warning(f"API reference: {module} is listed twice in mkdocs.yml")
        seen.add(module)
    package = importlib.import_module("lora_optim")
    for name in package.__all__:
        module = getattr(getattr(package, name), "__module__", "lora_optim")
        if module in _internal_modules:
            log.warning(f"API reference: {module} defines lora_optim.{name} (public) but is listed "
                        "under the internal modules in mkdocs.yml")
    for module in sorted(set(_public_modules()) - seen - {"lora_optim"}):
        log.warning(f"public module {module} has no API page: add '- {module}: api/{module}.md' "
                    "to the API reference in mkdocs.yml")


def _benchmark_page(report: Path) -> str:
    page_uri = f"benchmarks/{report.stem}.md"
    text = report.read_text(encoding="utf-8").strip()
    if not text.lstrip().startswith("#"):
        text = f"# `{report.stem}`\n\n{text}"
    # Links inside the report are relative to benchmarks/results/; the page is elsewhere.
    prefix = posixpath.relpath("benchmarks/results", posixpath.dirname(page_uri))
    text = _LOCAL_LINK.sub(lambda m: f"{m[1]}{prefix}/{m[2]})", text)
    parts = [f"<!-- from benchmarks/results/{report.name} -->\n\n{text}\n"]
    plot = report.with_suffix(".png")
    if plot.exists() and plot.name not in text:
        parts.append(f"![{report.stem}]({prefix}/{plot.name})\n")
    parts.append(f"*Source: `benchmarks/results/{report.name}`, written by `python benchmarks/{report.stem}.py`. "
                 "All result files: [Benchmarks](../benchmarks.md).*\n")
    return "\n".join(parts)


@event_priority(100)  # before mkdocs-jupyter looks at the files
def on_files(files: Files, config) -> Files:
    for module in _api_modules:
        path = f"api/{module}.md"
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=_api_page(module, module in _internal_modules)))
    _check_api_nav()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        src = f"notebooks/{notebook.name}"
        if files.get_file_from_path(src) is None:
            files.append(File(src, str(ROOT), config.site_dir, config.use_directory_urls))
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File(f"benchmarks/results/{plot.name}", str(ROOT), config.site_dir, config.use_directory_urls))
    for report in sorted(RESULTS.glob("*.md")):
        files.append(File.generated(config, f"benchmarks/{report.stem}.md", content=_benchmark_page(report)))
    if CHANGELOG.exists():
        files.append(File.generated(config, "changelog.md",
                                    content=_rebase_links(CHANGELOG.read_text(encoding="utf-8"),
                                                          "CHANGELOG.md", "changelog.md")))
    return files


# --- Markdown: includes, repository links, generated tables ----------------------------------

def _rebase_links(text: str, source: str, page_uri: str) -> str:
    """Relative links of ``text`` (a part of the repository file ``source``) made relative to
    the docs page ``page_uri``; the repository links are then mapped by :func:`_site_link`."""
    page_dir = posixpath.dirname(posixpath.join("docs", page_uri))

    def rebase(match: re.Match[str]) -> str:
        target, _, fragment = match[2].partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
        rebased = posixpath.relpath(repo_path, page_dir)
        return f"{match[1]}{rebased}{'#' + fragment if fragment else ''})"

    return _LOCAL_LINK.sub(rebase, text)


def _section(path: str, name: str) -> str | None:
    source = ROOT / path
    if not source.is_file():
        return None
    match = re.search(rf"<!-- section: {re.escape(name)} -->\n(.*?)<!-- /section: {re.escape(name)} -->",
                      source.read_text(encoding="utf-8"), re.S)
    return match[1].strip() + "\n" if match else None


def _include_sections(markdown: str, page_uri: str) -> str:
    def include(match: re.Match[str]) -> str:
        text = _section(match["path"], match["name"])
        if text is None:
            log.warning(f"{page_uri}: {match[0]} found no section '{match['name']}' in {match['path']} "
                        f"(it needs <!-- section: {match['name']} --> ... <!-- /section: {match['name']} -->)")
            return ""
        return _rebase_links(text, match["path"], page_uri)

    return _INCLUDE.sub(include, markdown)


_REPO_LINK = re.compile(
    r"(\]\()((?:\.\./)+(?:benchmarks/results/[^)\s#]+\.md|notebooks/[^)\s#]+\.ipynb|CHANGELOG\.md))((?:#[^)\s]*)?\))")


def _site_path(repo_path: str) -> str | None:
    """The docs-relative source of the site page that shows the repository file ``repo_path``."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    if repo_path.startswith("benchmarks/results/") and repo_path.endswith(".md"):
        return f"benchmarks/{posixpath.basename(repo_path)}"
    if repo_path.startswith("notebooks/") and repo_path.endswith(".ipynb"):
        return repo_path
    if repo_path == "CHANGELOG.md":
        return "changelog.md"
    return None


def _site_link(target: str, page_uri: str) -> str | None:
    """Page-relative site link for a repository-relative ``target`` of the page ``page_uri``."""
    repo_path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    site_path = _site_path(repo_path)
    if site_path is None:
        return None
    return posixpath.relpath(site_path, posixpath.dirname(page_uri) or ".")


def _headlines() -> dict[str, str]:
    if not HEADLINES.exists():
        return {}
    return {str(key): str(value) for key, value in (yaml.safe_load(HEADLINES.read_text(encoding="utf-8")) or {}).items()}


def _machine_and_load(text: str) -> tuple[str, str]:
    """The machine (processor and CPU count) and the 1-minute load average at the start, as the
    result file records them (``Machine: …; load average (1/5/15 min) (0.29, …) at start``)."""
    machine = re.search(r"Machine: ([^;\n]+)", text)
    load = re.search(r"load average(?: \(1/5/15 min\))?[^\d\n]*?(\d+(?:\.\d+)?)", text)
    name = "—"
    if machine:
        name = re.split(r",\s*torch\b", machine[1])[0].replace("(R)", "").strip().rstrip(".")
    return name, (load[1] if load else "—")


def _benchmark_summary(page_uri: str) -> str:
    reports = sorted(RESULTS.glob("*.md"))
    if not reports:
        return "*No benchmark results are committed yet.*\n"
    headlines = _headlines()
    for name in sorted(set(headlines) - {r.stem for r in reports}):
        log.warning(f"benchmarks/headlines.yml: '{name}' has no benchmarks/results/{name}.md")
    rows = ["| result | headline | machine | load at start |", "|---|---|---|---:|"]
    for report in reports:
        text = report.read_text(encoding="utf-8")
        headline = headlines.get(report.stem)
        if headline is None:
            log.warning(f"benchmarks/headlines.yml has no line for benchmarks/results/{report.name}: add "
                        f"'{report.stem}: \"<the figure a reader should take away, numbers from the file>\"'")
            headline = "—"
        missing = [n for n in _NUMBER.findall(headline) if n not in text]
        if missing:
            log.warning(f"benchmarks/headlines.yml, {report.stem}: {', '.join(missing)} not in "
                        f"benchmarks/results/{report.name} (a re-run changed it? update the headline)")
        machine, load = _machine_and_load(text)
        link = posixpath.relpath(f"benchmarks/{report.stem}.md", posixpath.dirname(page_uri) or ".")
        rows.append(f"| [{_result_title(report)}]({link}) | {headline} | {machine} | {load} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    markdown = _include_sections(markdown, src)
    markdown = _REPO_LINK.sub(lambda m: f"{m[1]}{_site_link(m[2], src) or m[2]}{m[3]}", markdown)
    if src == "api/index.md":
        markdown = markdown.replace("<!-- public-names -->", _public_names_table())
    if BENCHMARK_SUMMARY_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_SUMMARY_MARKER, _benchmark_summary(src))
    if PROJECT_FACTS_MARKER in markdown:
        markdown = markdown.replace(PROJECT_FACTS_MARKER, project_facts(ROOT).markdown())
    return markdown


# --- HTML: math, notebooks ---------------------------------------------------------------------

_MATHJAX_LOADER = re.compile(r'<script src="">\s*</script>\s*<!-- MathJax configuration -->.*?'
                             r"<!-- End of mathjax configuration -->", re.S)
_HEADING = re.compile(r'<h(?P<level>[1-6])[^>]*\bid="(?P<id>[^"]+)"[^>]*>(?P<inner>.*?)</h(?P=level)>', re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)
_HREF = re.compile(r'(<a\b[^>]*\bhref=")([^"#:]+\.(?:md|ipynb))(#[^"]*)?(")')


def _toc_items(items) -> list:
    found = []
    for item in items:
        found.append(item)
        found += _toc_items(item.children)
    return found


def _notebook_page(content: str, page, files) -> str:
    content = _MATHJAX_LOADER.sub("", content)
    # mkdocs-jupyter makes the ToC from the Markdown with inline code dropped (from the titles
    # and the ids); the rendered headings keep it. Take ids and titles from the headings.
    items = _toc_items(page.toc)
    headings = [(m["id"], _ANCHOR_LINK.sub("", m["inner"])) for m in _HEADING.finditer(content)]
    if len(items) == len(headings):
        for item, (heading_id, inner) in zip(items, headings):
            item.id, item.title = heading_id, inner
    else:
        log.warning(f"{page.file.src_uri}: {len(items)} table-of-contents entries for {len(headings)} headings")
    title = next((inner for m in _HEADING.finditer(content) if m["level"] == "1"
                  for inner in [_ANCHOR_LINK.sub("", m["inner"])]), None)
    if title is not None:
        page.title = html.unescape(re.sub(r"<[^>]+>", "", title)).strip()

    def site_link(match: re.Match[str]) -> str:
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match[2]))
        site_path = _site_path(repo_path)
        target = files.get_file_from_path(site_path) if site_path else None
        if target is None:
            log.warning(f"{page.file.src_uri}: link {match[2]} is not a page of the site "
                        "(notebook links are relative to notebooks/ in the repository, e.g. ../docs/algorithm.md)")
            return match[0]
        return f"{match[1]}{target.url_relative_to(page.file)}{match[3] or ''}{match[4]}"

    return _HREF.sub(site_link, content)


def on_page_content(content: str, page, config, files) -> str:
    def report(tex: str, problem: str) -> None:
        log.warning(f"{page.file.src_uri}: formula {tex!r}: {problem}")

    if page.file.src_uri.endswith(".ipynb"):
        content = _notebook_page(content, page, files)
        content = render_notebook_markdown(content, report)
    content = render_arithmatex(content, report)
    content = render_display_dollars(content, report)
    for item in _toc_items(page.toc):
        item.title = render_title(item.title, report)
    return content


# --- after the build: links ----------------------------------------------------------------------

def on_post_build(config) -> None:
    broken, checked = check_site(config.site_dir)
    for item in broken:
        log.warning(f"broken link: {item}")
    log.info(f"link check: {checked} internal links and anchors, {len(broken)} broken")
