"""The README is a short front door and every docs page is reachable from it, links resolving."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _links(page: Path) -> list[str]:
    return [m for m in LINK.findall(page.read_text()) if "://" not in m]


def test_readme_is_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 6 * 1024, f"README.md is {size} bytes"


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in block] == [["make", "serve"], ["make", "test"]]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    pages = set((ROOT / "docs").glob("*.md"))
    assert not {p.name for p in pages if p.resolve() not in linked}


def test_links_resolve() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in _links(page):
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {link} (no file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {link} (no heading)")
    assert not broken, broken


FIGURE = re.compile(r"docs/figures/[\w{},.*/-]+")


def _expand(pattern: str) -> list[str]:
    """A cited path with its ``{a,b}`` alternatives spelled out (one group at a time).

    >>> _expand("docs/figures/x-{a,b}-{1,2}.json")
    ['docs/figures/x-a-1.json', 'docs/figures/x-a-2.json', 'docs/figures/x-b-1.json', 'docs/figures/x-b-2.json']
    """
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",")
            for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_expand_spells_out_every_alternative() -> None:
    assert _expand("docs/figures/x-{a,b}-{1,2}.json") == [
        "docs/figures/x-a-1.json", "docs/figures/x-a-2.json", "docs/figures/x-b-1.json", "docs/figures/x-b-2.json"]
    assert _expand("docs/figures/plain.json") == ["docs/figures/plain.json"]


def test_cited_figures_exist() -> None:
    """Every figure file the docs cite (``docs/figures/...``, braces and globs spelled out) is there."""
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cited in FIGURE.findall(page.read_text()):
            for path in _expand(cited.rstrip(".,")):
                if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                    missing.append(f"{page.name}: {path}")
    assert not missing, missing
