"""TeX in the built pages becomes MathML at build time, so formulas render with no network.

Browsers render MathML natively (Chromium ≥ 109, Firefox, Safari); nothing is loaded by the
reader's browser and nothing is fetched by the build. ``latex2mathml`` (pure Python) converts.

Where TeX is found:

* Markdown pages and docstrings: ``pymdownx.arithmatex`` (generic mode) writes
  ``<span class="arithmatex">\\(…\\)</span>`` and ``<div class="arithmatex">\\[…\\]</div>``.
* Notebooks: mkdocs-jupyter keeps Jupyter's ``$…$`` and ``$$…$$`` as text inside the rendered
  Markdown cells (``jp-RenderedMarkdown``); code and outputs are left alone.
* Tables of contents: a heading's TeX reaches the title as ``\\(…\\)`` or ``$…$`` text.

Each formula keeps its TeX source as a MathML annotation (copy-paste, screen readers). A formula
that ``latex2mathml`` cannot convert, or converts with a command left over as text (an unknown
macro), is reported through :func:`convert_tex`'s ``report`` callback; the site hook logs it as
a warning, which fails the strict build.
"""

from __future__ import annotations

import html
import re
from typing import Callable

from latex2mathml.converter import convert as _latex_to_mathml

#: Commands latex2mathml does not know, rewritten to ones it does (same rendering in TeX).
TEX_REWRITES = {
    r"\arg": r"\operatorname{arg}",
}
_REWRITE = re.compile("|".join(re.escape(k) + r"(?![A-Za-z])" for k in TEX_REWRITES))
# A backslash command left in the visible text of the MathML: latex2mathml did not know it.
_LEFTOVER_COMMAND = re.compile(r"\\[A-Za-z]+")
_TAG = re.compile(r"<[^>]+>")
_ANNOTATION = re.compile(r"<annotation\b.*?</annotation>", re.S)

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>', re.S)
_NOTEBOOK_MARKDOWN_CELL = re.compile(r'<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown[^"]*"[^>]*>')
_DIV = re.compile(r"<(/?)div\b[^>]*>")
# Jupyter's delimiters: $$…$$ (display) before $…$ (inline); an escaped \$ is a dollar sign.
_DOLLAR_MATH = re.compile(r"(?<!\\)\$\$(?P<display>.+?)(?<!\\)\$\$|(?<![\\$])\$(?P<inline>[^$]+?)(?<!\\)\$", re.S)
_DISPLAY_DOLLARS = re.compile(r"(?<!\\)\$\$(?P<tex>.+?)(?<!\\)\$\$", re.S)
_PAREN_MATH = re.compile(r"\\\((?P<inline>.+?)\\\)|\\\[(?P<display>.+?)\\\]", re.S)
# Tags whose text is never TeX.
_VERBATIM = re.compile(r"<(pre|code|script|style|annotation)\b.*?</\1>", re.S)

Report = Callable[[str, str], None]


def convert_tex(tex: str, display: bool, report: Report) -> str:
    """MathML for one formula (``tex`` unescaped), with its TeX as an annotation.

    ``report(tex, problem)`` is called when the formula cannot be converted faithfully; the TeX
    is then shown as code, never as raw delimiters.
    """
    source = tex.strip()
    try:
        mathml = _latex_to_mathml(_REWRITE.sub(lambda m: TEX_REWRITES[m[0]], source),
                                  display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises its own and plain exceptions on bad TeX
        report(source, f"{type(error).__name__}: {error}")
        return f"<code>{html.escape(source)}</code>"
    leftover = _LEFTOVER_COMMAND.findall(html.unescape(_TAG.sub("", mathml)))
    if leftover:
        report(source, f"unknown command(s) {', '.join(sorted(set(leftover)))}")
    # <math …><mrow>…</mrow></math>  ->  <math …><semantics><mrow>…</mrow><annotation …/></semantics></math>
    head, _, rest = mathml.partition(">")
    body = rest[: rest.rfind("</math>")]
    annotation = f'<annotation encoding="application/x-tex">{html.escape(source)}</annotation>'
    mathml = f"{head}><semantics>{body}{annotation}</semantics></math>"
    # A span (styled as a block): valid wherever the formula stands, a paragraph included.
    return f'<span class="math-display">{mathml}</span>' if display else mathml


def _outside_verbatim(text: str, convert: Callable[[str], str]) -> str:
    """Apply ``convert`` to the parts of the HTML ``text`` outside code, pre and scripts."""
    parts, last = [], 0
    for match in _VERBATIM.finditer(text):
        parts.append(convert(text[last:match.start()]))
        parts.append(match[0])
        last = match.end()
    parts.append(convert(text[last:]))
    return "".join(parts)


def render_arithmatex(page_html: str, report: Report) -> str:
    """Every arithmatex span and div of ``page_html`` as MathML."""
    return _ARITHMATEX.sub(
        lambda m: convert_tex(html.unescape(m["tex"]), m["open"] == "\\[", report), page_html)


def render_display_dollars(page_html: str, report: Report) -> str:
    """``$$…$$`` left as text outside code (a docstring's math block that Markdown did not see as
    a block, e.g. inside a list item) as display MathML."""
    def convert(text: str) -> str:
        return _DISPLAY_DOLLARS.sub(lambda m: convert_tex(html.unescape(m["tex"]), True, report), text)

    return _outside_verbatim(page_html, convert)


def _dollar_math(text: str, report: Report) -> str:
    def replace(match: re.Match[str]) -> str:
        display = match["display"] is not None
        tex = match["display"] if display else match["inline"]
        return convert_tex(html.unescape(tex), display, report)

    return _DOLLAR_MATH.sub(replace, text)


def render_notebook_markdown(page_html: str, report: Report) -> str:
    """``$…$`` and ``$$…$$`` inside the rendered Markdown cells of a notebook page as MathML."""
    out, index = [], 0
    for cell in _NOTEBOOK_MARKDOWN_CELL.finditer(page_html):
        if cell.start() < index:  # nested in a cell already converted
            continue
        depth, end = 1, len(page_html)
        for div in _DIV.finditer(page_html, cell.end()):
            depth += -1 if div[1] else 1
            if depth == 0:
                end = div.start()
                break
        out.append(page_html[index:cell.end()])
        out.append(_outside_verbatim(page_html[cell.end():end], lambda t: _dollar_math(t, report)))
        index = end
    out.append(page_html[index:])
    return "".join(out)


def render_title(title: str, report: Report) -> str:
    """A table-of-contents title with its ``\\(…\\)`` or ``$…$`` TeX as MathML."""
    def replace(match: re.Match[str]) -> str:
        display = match["display"] is not None
        return convert_tex(html.unescape(match["display"] if display else match["inline"]), False, report)

    title = _PAREN_MATH.sub(replace, title)
    return _DOLLAR_MATH.sub(replace, title)
