"""Check every internal link and anchor of a built site (``site/``), notebooks included.

MkDocs validates the links it writes from Markdown, but not those inside rendered notebooks,
generated API pages, tables of contents or raw HTML. This reads the built ``*.html`` files and
checks, for every ``href``/``src`` that stays inside the site: that the file exists (a folder
means its ``index.html``) and that its ``#fragment`` is an ``id`` (or ``<a name>``) of the
target page. External URLs (``http:``, ``mailto:``, …) are not checked: the build has no network.

Run by the site hook after every build (a broken link is a warning, so the strict build fails),
or by hand: ``python docs/hooks/link_check.py site``.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Attributes that hold a URL, by tag.
_URL_ATTRIBUTES = {"a": "href", "img": "src", "link": "href", "script": "src", "source": "src", "iframe": "src"}


@dataclass(frozen=True)
class BrokenLink:
    """One link of a built page that leads nowhere."""

    page: str
    """The page holding the link, relative to the site folder."""
    target: str
    """The link as written in the page."""
    problem: str
    """What is missing: the file, or the anchor in it."""

    def __str__(self) -> str:
        return f"{self.page}: {self.target!r}: {self.problem}"


class _PageScan(HTMLParser):
    """The ids and the URL-valued attributes of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "a" and values.get("name"):
            self.ids.add(values["name"])
        attribute = _URL_ATTRIBUTES.get(tag)
        if attribute and attribute in values:
            if tag == "link" and values.get("rel") in ("canonical", "alternate"):
                return
            self.links.append(values[attribute] or "")

    handle_startendtag = handle_starttag


def _scan(path: Path) -> _PageScan:
    scan = _PageScan()
    scan.feed(path.read_text(encoding="utf-8"))
    return scan


def check_site(site_dir: str | Path) -> tuple[list[BrokenLink], int]:
    """Every broken internal link of the site in ``site_dir``, and how many links were checked."""
    site = Path(site_dir).resolve()
    pages = {p.relative_to(site).as_posix(): _scan(p) for p in sorted(site.rglob("*.html"))}
    broken: list[BrokenLink] = []
    checked = 0
    for page, scan in pages.items():
        for link in scan.links:
            if not link.strip():
                broken.append(BrokenLink(page, link, "empty URL"))
                continue
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # external: not checked (no network at build time)
            checked += 1
            path = unquote(parts.path)
            if not path:
                target = page
            else:
                base = posixpath.dirname(page)
                target = posixpath.normpath(posixpath.join(base, path)) if not path.startswith("/") \
                    else posixpath.normpath(path.lstrip("/"))
                if target.startswith(".."):
                    broken.append(BrokenLink(page, link, "leaves the site"))
                    continue
                if (site / target).is_dir():
                    target = posixpath.join(target, "index.html")
                if not (site / target).is_file():
                    broken.append(BrokenLink(page, link, f"no file {target}"))
                    continue
            fragment = unquote(parts.fragment)
            if fragment and target.endswith(".html"):
                ids = pages[target].ids if target in pages else _scan(site / target).ids
                if fragment not in ids:
                    broken.append(BrokenLink(page, link, f"no id {fragment!r} in {target}"))
    return broken, checked


def main(argv: list[str]) -> int:
    site_dir = argv[1] if len(argv) > 1 else "site"
    broken, checked = check_site(site_dir)
    for item in broken:
        print(item)
    print(f"{checked} internal links checked, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
