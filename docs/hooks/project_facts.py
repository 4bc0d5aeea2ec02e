"""The project's version, supported ranges and licence, read from the files that define them.

``pyproject.toml`` (version, ``requires-python``, the torch requirement, licence, the optional
``[project.urls]`` Repository) and ``constraints.txt`` (the torch build every install of this
repository and CI uses, hence the one tested). The site shows them on the landing page and in
the footer; nothing is written twice by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


@dataclass(frozen=True)
class ProjectFacts:
    """What a reader needs to know before installing."""

    version: str
    python: str
    """``requires-python``, e.g. ``>=3.10``."""
    torch: str
    """The torch requirement, e.g. ``>=2.13,<3``."""
    torch_tested: str
    """The torch version pinned by ``constraints.txt`` (CI's), or ``""``."""
    license: str
    repository: str
    """``[project.urls] Repository``, or ``""`` when the project names none."""

    def markdown(self) -> str:
        """One line of facts for the landing page."""
        def spaced(spec: str) -> str:  # ">=2.13,<3" -> "≥ 2.13, < 3"
            signs = {">=": "≥", "<=": "≤", "!=": "≠"}
            parts = sorted((part.strip() for part in spec.split(",")), key=lambda part: not part.startswith(">"))
            return ", ".join(re.sub(r"^([<>=!~]+)\s*", lambda m: signs.get(m[1], m[1]) + " ", part) for part in parts)

        tested = f" (tested: {self.torch_tested}, CPU build)" if self.torch_tested else ""
        parts = [f"**Version** {self.version}", f"**Python** {spaced(self.python)}",
                 f"**torch** {spaced(self.torch)}{tested}", f"**Licence** {self.license}",
                 "[Changelog](changelog.md)"]
        if self.repository:
            parts.append(f"[Repository]({self.repository})")
        return " · ".join(parts)


def _pyproject(root: Path) -> dict:
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        return tomllib.loads(text)["project"]
    from importlib.metadata import metadata  # the installed (editable) package's metadata

    meta = metadata("lora_optim")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    return {"version": meta["Version"], "requires-python": meta["Requires-Python"],
            "dependencies": [d for d in meta.get_all("Requires-Dist") or [] if "extra ==" not in d],
            "license": {"text": meta["License"]}, "urls": urls}


def _version(root: Path, project: dict) -> str:
    if "version" in project:
        return project["version"]
    init = (root / "lora_optim" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)[1]


def project_facts(root: Path) -> ProjectFacts:
    """The facts of the project checked out at ``root``."""
    project = _pyproject(root)
    torch = next(re.sub(r"^torch\s*", "", d) for d in project["dependencies"] if re.match(r"torch\b", d))
    pinned = re.search(r"^torch==(\S+)", (root / "constraints.txt").read_text(encoding="utf-8"), re.MULTILINE)
    license_ = project.get("license", {})
    return ProjectFacts(
        version=_version(root, project),
        python=project["requires-python"],
        torch=torch.strip(),
        torch_tested=pinned[1] if pinned else "",
        license=license_.get("text", "") if isinstance(license_, dict) else str(license_),
        repository=project.get("urls", {}).get("Repository", ""),
    )
