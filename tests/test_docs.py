"""Every `docs/methods/PAGE.md §N` the code cites is a heading of that page (the method pages are the project's own
specification; a citation that resolves nowhere is a broken promise)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/methods/([a-z_0-9]+)\.md(?:\s*§\s*([0-9]+(?:\.[0-9]+)*))?")


def headings(page: Path) -> set[str]:
    """Section numbers of a page: '## 2.4 Title' -> '2.4'."""
    return {m.group(1) for m in re.finditer(r"^#+\s+([0-9]+(?:\.[0-9]+)*)\b", page.read_text(), re.M)}


def test_every_citation_resolves():
    sources = [p for d in ("rlxf", "experiments", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    cited, missing = 0, []
    for path in sources:
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            page = ROOT / "docs" / "methods" / f"{m.group(1)}.md"
            cited += 1
            if not page.is_file():
                missing.append(f"{path.relative_to(ROOT)}: no page {page.name}")
            elif m.group(2) and m.group(2) not in headings(page):
                missing.append(f"{path.relative_to(ROOT)}: {page.name} has no section §{m.group(2)}")
    assert cited > 50, "the code cites the method pages"
    assert not missing, "\n".join(missing)


def test_one_page_per_method():
    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    assert {"adaptive_segment_reward", "rlaif", "seq2seq_rm", "reward_collapse"} <= pages
