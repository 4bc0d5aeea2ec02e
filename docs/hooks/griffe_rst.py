"""Griffe extension: render the library's reStructuredText-flavoured docstrings as Markdown.

The docstrings are Google style (``Args:``, ``Returns:``) with a few reST constructs that
Markdown would show literally. This rewrites them before mkdocstrings renders the page:

* ``.. math::`` blocks become ``$$ … $$`` and ``:math:`x``` becomes ``$x$`` (arithmatex);
* cross-reference roles (``:class:`~lora_optim.LoRAAdam```, ``:func:`tokenize```, …) become
  optional autorefs: a link when the target is rendered somewhere in the site, plain code
  otherwise (so an unresolvable target never fails the strict build);
* literal blocks introduced by ``::`` become fenced Python code;
* definition lists whose term is a ````code```` span become Markdown definition lists;
* an attribute without a docstring takes the ``#:`` comment lines just above it (the Sphinx
  convention the library uses for module constants and class attributes);
* a class's ``Attributes:`` section (dataclasses, named tuples) is given to the attributes it
  lists as their docstrings and removed, so each field is documented once, where it is listed
  as a member (when an entry names no member, the section stays as it is).

* a docs page named by its repository path (``docs/interop.md``, in a code span or not) becomes
  a link to that page of the site, titled with the page's heading (an autoref to its anchor).

``double backticks`` need no change: they are a Markdown code span already.
Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import griffe
from markdown.extensions.toc import slugify

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const|math):`(?P<target>[^`]+)`")
_DIRECTIVE_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")
_EXPLICIT_TITLE = re.compile(r"^(?P<title>[^<]+?)\s*<(?P<target>[^<>]+)>$")
_ATTRIBUTES_HEADER = re.compile(r"^(?P<indent>[ \t]*)Attributes:[ \t]*$")
_TERM = re.compile(r"^(?P<indent>[ \t]*)``[^`]+``[ \t]*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_after(lines: list[str], start: int, indent: int) -> int:
    """Index just past the indented block (deeper than ``indent``) that begins at ``start``,
    blank lines inside it included, trailing blank lines excluded."""
    end = start
    index = start
    while index < len(lines):
        line = lines[index]
        if line.strip():
            if _indent_of(line) <= indent:
                break
            end = index + 1
        index += 1
    return end


def _dedent(block: list[str], indent: str) -> list[str]:
    widths = [_indent_of(line) for line in block if line.strip()]
    cut = min(widths) if widths else 0
    return [indent + line[cut:] if line.strip() else "" for line in block]


def _skip_blank(lines: list[str], index: int) -> int:
    while index < len(lines) and not lines[index].strip():
        index += 1
    return index


def convert_blocks(text: str) -> str:
    """``.. math::`` directives and ``::`` literal blocks to their Markdown forms."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        math = _DIRECTIVE_MATH.match(line)
        if math:
            indent = math["indent"]
            start = _skip_blank(lines, index + 1)
            end = _block_after(lines, start, len(indent)) if start < len(lines) else start
            body = ([indent + math["inline"]] if math["inline"].strip() else []) + _dedent(lines[start:end], indent)
            out += [indent + "$$", *body, indent + "$$"]
            index = end
            continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            indent = _indent_of(line)
            start = _skip_blank(lines, index + 1)
            if start < len(lines) and _indent_of(lines[start]) > indent:
                end = _block_after(lines, start, indent)
                lead = stripped[:-2].rstrip()
                if lead.strip():
                    out += [lead + ":", ""]
                pad = " " * indent
                out += [pad + "```python", *_dedent(lines[start:end], pad), pad + "```"]
                index = end
                continue
        out.append(line)
        index += 1
    return "\n".join(out)


def convert_definition_lists(text: str) -> str:
    """````term```` followed directly by an indented block becomes ``term`` / ``:   block``."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        term = _TERM.match(line)
        nxt = lines[index + 1] if index + 1 < len(lines) else ""
        if term and nxt.strip() and _indent_of(nxt) > len(term["indent"]):
            indent = term["indent"]
            end = _block_after(lines, index + 1, len(indent))
            body = _dedent(lines[index + 1 : end], "")
            if out and out[-1].strip():
                out.append("")
            out.append(line)
            out.append(f"{indent}:   {body[0]}")
            out += [f"{indent}    {b}" if b else "" for b in body[1:]]
            out.append("")
            index = end
            continue
        out.append(line)
        index += 1
    return "\n".join(out)


def _autoref(identifier: str, title: str) -> str:
    return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'


def convert_roles(text: str, scope: Any | None = None) -> str:
    """``:role:`target``` to inline math (``:math:``) or an optional cross-reference."""

    def replace(match: re.Match[str]) -> str:
        role, target = match["role"], match["target"].strip()
        if role == "math":
            return f"${target}$"
        explicit = _EXPLICIT_TITLE.match(target)  # :attr:`title <target>`
        if explicit:
            title, target = explicit["title"], explicit["target"].strip().lstrip("~.")
        else:
            short = target.startswith("~")
            target = target.lstrip("~.")
            title = target.rsplit(".", 1)[-1] if short else target
        if role in ("func", "meth") and not explicit:
            title += "()"
        identifier = _resolve(target, scope)
        if identifier is None:
            return f"`{title}`"
        return _autoref(identifier, title)

    return _ROLE.sub(replace, text)


def _resolve(target: str, scope: Any | None) -> str | None:
    """Full path of ``target`` as seen from ``scope`` (a griffe object), if it can be found."""
    if scope is None:
        return target
    head, _, rest = target.partition(".")
    for candidate in (target, head):
        try:
            resolved = scope.resolve(candidate)
        except Exception:  # griffe raises NameResolutionError (and others for odd names)
            continue
        if candidate == target:
            return resolved
        return f"{resolved}.{rest}" if rest else resolved
    return target if "." in target else None


_DOCS_DIR = Path(__file__).resolve().parents[1]
_DOCS_PAGE = re.compile(r"(?<![\w/.])(?P<tick>``)?docs/(?P<page>[\w-]+)\.md(?P=tick)?(?P<fragment>#[\w-]+)?")


def _page_heading(page: str) -> tuple[str, str] | None:
    """The first heading of ``docs/<page>.md`` and its anchor (as the ``toc`` extension slugs it)."""
    path = _DOCS_DIR / f"{page}.md"
    if not path.is_file():
        return None
    match = re.search(r"^# (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        return None
    title = match[1].strip()
    return title, slugify(title.replace("`", ""), "-")


def convert_docs_links(text: str) -> str:
    """``docs/<page>.md`` (a repository path) to a link to that page of the site."""
    def replace(match: re.Match[str]) -> str:
        heading = _page_heading(match["page"])
        if heading is None:
            return match[0]
        title, anchor = heading
        return f"[{title}][{match['fragment'][1:] if match['fragment'] else anchor}]"

    return _DOCS_PAGE.sub(replace, text)


def to_markdown(text: str, scope: Any | None = None) -> str:
    """All conversions, in the order they need (blocks use indentation, roles do not)."""
    text = convert_blocks(text)
    text = convert_definition_lists(text)
    text = convert_docs_links(text)
    return convert_roles(text, scope)


def _doc_comment(obj: Any) -> str | None:
    """The ``#:`` comment lines directly above attribute ``obj`` in its source file."""
    try:
        lines = obj.lines_collection[obj.filepath]
    except Exception:  # no source (compiled module, alias to elsewhere)
        return None
    index = (obj.lineno or 0) - 2  # lineno is 1-based; start at the line above
    found: list[str] = []
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(found) or None


def _without_attributes_section(text: str) -> str:
    lines = text.split("\n")
    for index, line in enumerate(lines):
        header = _ATTRIBUTES_HEADER.match(line)
        if header:
            end = _block_after(lines, index + 1, len(header["indent"]))
            return "\n".join(lines[:index] + lines[end:]).rstrip() + "\n"
    return text


def _attributes_to_members(cls: Any) -> None:
    """Move the entries of ``cls``'s ``Attributes:`` section to its attribute members."""
    if "Attributes:" not in cls.docstring.value:
        return
    sections = cls.docstring.parse("google")
    entries = [item for section in sections if section.kind.value == "attributes" for item in section.value]
    members = cls.members
    if not entries or any(e.name not in members or not getattr(members[e.name], "is_attribute", False)
                          for e in entries):
        return
    for entry in entries:
        member = members[entry.name]
        if member.docstring is None and entry.description:
            member.docstring = griffe.Docstring(entry.description, parent=member)
    cls.docstring.value = _without_attributes_section(cls.docstring.value)


class RestructuredTextToMarkdown(griffe.Extension):
    """Rewrite every docstring of a loaded package with :func:`to_markdown`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        self._walk(pkg, seen)

    def _walk(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen or getattr(obj, "is_alias", False):
            return
        seen.add(id(obj))
        if obj.docstring is None and getattr(obj, "is_attribute", False):
            comment = _doc_comment(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, parent=obj)
        if obj.docstring is not None and getattr(obj, "is_class", False):
            _attributes_to_members(obj)
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value, obj)
        for member in obj.members.values():
            self._walk(member, seen)
