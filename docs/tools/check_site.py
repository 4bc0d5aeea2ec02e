"""Read the built site in headless Chromium, as a reader would, and fail on what a reader would see.

``python docs/tools/check_site.py [site] [--screenshots DIR]`` after ``bash docs/build.sh``.
Every page of ``site/`` (the guides, each rendered notebook, every API page) is served from
127.0.0.1 and loaded in Chromium with the network cut off; for each page it fails on

* a request that leaves the local server (a CDN script, a web font): the site must work offline;
* a local request that fails (a missing script, stylesheet or image);
* raw TeX in the visible text (``\\(``, ``\\[``, ``$$``, ``$…\\command…$``) or a formula
  (MathML) that takes no space on the page;
* an image that did not load or is not visible (notebook plots included);
* raw markup in the visible text: an unconverted Markdown link or reference, a
  reStructuredText role, a docstring cross-reference left as ``<module.name>``;

and it checks that the search box finds a page. ``--screenshots DIR`` also saves a PNG of the top
of every page. Prints one line per page and a summary (pages, formulas, images, links of the
link check); exits 1 on any failure.

Needs the docs extra (``playwright``, a Python driver; it downloads nothing) and a Chromium
(Debian: ``apt-get install chromium``; or set ``CHROMIUM=/path/to/chrome``).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hooks"))
from link_check import check_site  # noqa: E402

# Raw TeX or markup in visible text (code, pre and formulas excluded).
RAW_PATTERNS = {
    "raw TeX \\( or \\[": re.compile(r"\\[(\[]"),
    "raw TeX $$": re.compile(r"\$\$"),
    "raw TeX $…$": re.compile(r"\$[^$\s][^$]*?\\[A-Za-z]+[^$]*?\$"),
    "Markdown link left as text": re.compile(r"\]\((?:[^)\s]+)\)"),
    "Markdown reference left as text": re.compile(r"\]\[[^\]\s]*\]"),
    "reST role left as text": re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|math):`"),
    "cross-reference target left as text": re.compile(r"<lora_optim\.[\w.]+>"),
}

# Run in the page: what a reader sees.
_PAGE_SCRIPT = """
() => {
  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "math", "MATH", "NOSCRIPT", "TEXTAREA"]);
  const roots = [...document.querySelectorAll(".md-content, .md-sidebar")];
  const texts = [];
  for (const root of roots) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
      acceptNode(node) {
        for (let el = node.parentElement; el && el !== root.parentElement; el = el.parentElement) {
          if (skip.has(el.tagName) || el.namespaceURI === "http://www.w3.org/1998/Math/MathML"
              || getComputedStyle(el).display === "none") {  // e.g. the notebooks' clipboard copies
            return NodeFilter.FILTER_REJECT;
          }
        }
        return NodeFilter.FILTER_ACCEPT;
      },
    });
    while (walker.nextNode()) texts.push(walker.currentNode.textContent);
  }
  const content = document.querySelector(".md-content");
  const maths = content ? [...content.querySelectorAll("math")] : [];
  const unrendered = maths.filter(m => {
    const box = m.getBoundingClientRect();
    return !(box.width > 0 && box.height > 0) && m.offsetParent !== null;
  }).length;
  const images = content ? [...content.querySelectorAll("img")] : [];
  const badImages = images.filter(img => {
    const box = img.getBoundingClientRect();
    return !(img.complete && img.naturalWidth > 0 && box.width > 0 && box.height > 0);
  }).map(img => (img.getAttribute("src") || "").slice(0, 80));
  return {text: texts.join(" "), maths: maths.length, unrendered, images: images.length, badImages};
}
"""


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)):
            return path
    raise SystemExit("check_site: no Chromium found (Debian: apt-get install chromium; or set CHROMIUM=...)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _pages(site: Path) -> list[str]:
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                  if not p.relative_to(site).as_posix().startswith("assets/"))


def check(site: Path, screenshots: Path | None) -> int:
    from playwright.sync_api import sync_playwright

    server, base = _serve(site)
    failures: list[str] = []
    totals = {"pages": 0, "formulas": 0, "images": 0}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            for page_path in _pages(site):
                problems: list[str] = []
                page = context.new_page()

                def offline(route, problems=problems):
                    if not route.request.url.startswith((base, "data:", "blob:", "about:")):
                        problems.append(f"network request {route.request.url}")
                        return route.abort()
                    return route.continue_()

                page.route("**/*", offline)
                page.on("requestfailed", lambda r, problems=problems: problems.append(
                    f"failed request {r.url}") if r.url.startswith(base) else None)
                page.on("response", lambda r, problems=problems: problems.append(
                    f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
                page.on("pageerror", lambda e, problems=problems: problems.append(f"script error {e}"))
                page.goto(base + page_path, wait_until="load")
                seen = page.evaluate(_PAGE_SCRIPT)
                for what, pattern in RAW_PATTERNS.items():
                    match = pattern.search(seen["text"])
                    if match:
                        start = max(match.start() - 40, 0)
                        problems.append(f"{what}: …{seen['text'][start:match.end() + 40]!r}…")
                if seen["unrendered"]:
                    problems.append(f"{seen['unrendered']} of {seen['maths']} formulas take no space")
                for src in seen["badImages"]:
                    problems.append(f"image not shown: {src}")
                if screenshots is not None:
                    name = page_path.replace("/index.html", "").replace("/", "_").replace(".html", "") or "index"
                    page.screenshot(path=str(screenshots / f"{name or 'index'}.png"))
                page.close()
                totals["pages"] += 1
                totals["formulas"] += seen["maths"]
                totals["images"] += seen["images"]
                status = "FAIL" if problems else "ok"
                print(f"{status:4s} {page_path}: {seen['maths']} formulas, {seen['images']} images")
                failures += [f"{page_path}: {p}" for p in problems]
            # Search runs in a web worker from the site's own index: it must find a page offline.
            page = context.new_page()
            page.goto(base + "index.html", wait_until="networkidle")
            page.click("input.md-search__input")
            page.keyboard.type("export_peft_adapter")
            try:
                page.wait_for_selector(".md-search-result__item", timeout=10_000)
                hits = page.locator(".md-search-result__item").count()
                print(f"ok   search 'export_peft_adapter': {hits} results")
            except Exception:
                failures.append("search: no result for 'export_peft_adapter'")
            browser.close()
    finally:
        server.shutdown()
    broken, links = check_site(site)
    failures += [f"broken link: {item}" for item in broken]
    for failure in failures:
        print("FAIL", failure)
    print(f"{totals['pages']} pages checked in Chromium, {totals['formulas']} formulas rendered, "
          f"{totals['images']} images shown, {links} internal links and anchors checked; "
          f"{len(failures)} problems")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None, help="save a PNG of every page here")
    args = parser.parse_args()
    if not (args.site / "index.html").is_file():
        raise SystemExit(f"check_site: no built site in {args.site} (run bash docs/build.sh first)")
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    return check(args.site.resolve(), args.screenshots)


if __name__ == "__main__":
    sys.exit(main())
