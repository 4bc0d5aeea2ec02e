// MathJax settings: pymdownx.arithmatex (generic mode) writes \( \) and \[ \]; the rendered
// notebooks (mkdocs-jupyter) keep Jupyter's $ and $$. Only the page and its table of contents are
// typeset (not the navigation or the search box), and never code (MathJax skips <pre>, <code>).
// Loaded by the reader's browser; the build itself fetches nothing.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  startup: {
    elements: [".md-content", ".md-sidebar--secondary"],
  },
};

// Material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise(Array.from(document.querySelectorAll(".md-content, .md-sidebar--secondary")));
    }
  });
}
