"""The project documents itself: every `docs/<page>.md §<n>` cited in code, configs and the
README exists with that section, every citation key is expanded in docs/references.md, and
nothing points to a file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    *sorted(
        p
        for folder in ("src", "tests", "configs", "workflow", "benchmarks", "docs")
        for p in (REPO / folder).rglob("*")
        if p.suffix in {".py", ".md", ".yaml", ".smk", ".sh"} and p.is_file()
    ),
    REPO / "README.md",
    REPO / "Snakefile",
    REPO / "Makefile",
]
DOC_REF = re.compile(r"docs/([a-z_-]+\.md)(?: §(\d+(?:\.\d+)?))?")
KEY = re.compile(r"(?<=[\s(])\[([A-Z][A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)\]")
OUTSIDE = re.compile(r"shared[/]reference|[.][.]/shared|DESIGN[.]md|ECOSYSTEM[.]md|contracts[.]md")
"""Files of the sessions that built the project, which the repository does not contain."""
OTHER_SESSIONS_DOCS = {"global_loss.md", "statistics.md", "placement.md"}
"""Pages the index links to that other branches add (checked once they exist)."""


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def sections(page: Path) -> set[str]:
    """Section numbers of a docs page: "## 6. ..." -> "6", "### 6.3 ..." -> "6.3"."""
    return set(re.findall(r"(?m)^#{2,3} (\d+(?:\.\d+)?)\.? ", text(page)))


def test_cited_doc_sections_exist() -> None:
    missing = []
    for path in SOURCES:
        for page, section in DOC_REF.findall(text(path)):
            doc = REPO / "docs" / page
            if not doc.is_file():
                if page not in OTHER_SESSIONS_DOCS:
                    missing.append(f"{path.relative_to(REPO)}: docs/{page}")
            elif section and section not in sections(doc):
                missing.append(f"{path.relative_to(REPO)}: docs/{page} §{section}")
    assert not missing, missing


def test_every_citation_key_is_expanded() -> None:
    defined = set(re.findall(r"(?m)^\| \[([A-Za-z0-9-]+)\] \|", text(REPO / "docs/references.md")))
    assert {"V2", "V3", "LF", "MCore", "Switch", "GShard", "DSMoE", "V3-code"} <= defined
    used = {
        key
        for path in SOURCES
        for key in KEY.findall(text(path))
        if key not in {"None", "False", "True"}
    }
    assert used - defined == set(), f"keys without an entry in docs/references.md: {used - defined}"


def test_nothing_points_outside_the_repository() -> None:
    offenders = [str(p.relative_to(REPO)) for p in SOURCES if OUTSIDE.search(text(p))]
    assert not offenders, offenders
