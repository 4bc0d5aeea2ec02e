#!/usr/bin/env bash
# Build the documentation site strictly (any warning fails): `bash docs/build.sh`.
# Needs the docs extra: pip install -c constraints.txt -e ".[docs]". Output: site/.
# Nothing is fetched and no notebook is executed (they are committed with their outputs;
# `python -m pytest --nbmake notebooks/` re-executes them). Formulas are rendered to MathML here,
# and every internal link and anchor of the built HTML is checked (a broken one fails the build).
# Then, to read every page in headless Chromium: python docs/tools/check_site.py site
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1  # Material's banner about MkDocs 2.0 / Zensical; not about this site
# The project's virtualenv if there is one (as .ci/run makes it), else the python on PATH.
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
"$PYTHON" -m mkdocs build --strict --clean "$@"
