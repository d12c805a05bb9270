"""docs/method.md is the reference the code cites: every `§X` / `§X.n` citation in the repository resolves to one of
its headings, its slot tables are what the memory's bookkeeping computes, and README / architecture link it.

Anchor convention (stated at the top of docs/method.md): a section is a heading ``## X. Title`` (X in A–J), a numbered
item a heading ``### X.n Title`` (also the resolutions ``### I.n``; one lettered item, ``### F.7b``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cf.memory import MemoryConfig, simulate_slots

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SCANNED = ("cf", "data", "callbacks", "configs", "bench", "tests", "docs", "notebooks", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".ipynb", ".txt", ".toml", ".cfg", ".sh"}
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}

CITATION = re.compile(r"§([A-J](?:\.\d+[a-z]?)?)\b")
SECTION_HEADING = re.compile(r"^## ([A-J])\. \S")
ITEM_HEADING = re.compile(r"^### ([A-J]\.\d+[a-z]?) \S")
SLOT_ROW = re.compile(
    r"^(?P<options>released|default|toy-B)/(?P<schedule>always|never|uniform-(?P<interval>\d+))\s+"
    r"(?P<chunk>\d+)\s+(?P<first>\d+)(?:–(?P<last>\d+))?\s+\[(?P<slots>[^\]]*)\]"
)
MEMORY_CONFIGS = {
    "released": MemoryConfig.released_code(),
    "default": MemoryConfig(),
    "toy-B": MemoryConfig.released_code(sink=1, slow=2, fast=2, frames_per_chunk=1, rope_length=5),
}


def _method_lines() -> list[str]:
    """The lines of docs/method.md outside fenced code blocks."""
    lines, fenced = [], False
    for line in METHOD.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _anchors() -> list[str]:
    anchors = []
    for line in _method_lines():
        match = SECTION_HEADING.match(line) or ITEM_HEADING.match(line)
        if match:
            anchors.append(match.group(1))
    return anchors


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                      and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts) and p.stat().st_size < 2_000_000]
    return [f for f in files if f.resolve() != METHOD.resolve()]


def _citations() -> list[tuple[str, int, str]]:
    """(file relative to the repository, line number, cited anchor) for every citation outside docs/method.md."""
    found = []
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            found += [(str(path.relative_to(ROOT)), number, m.group(1)) for m in CITATION.finditer(line)]
    return found


def test_method_has_every_section_and_unique_anchors():
    anchors = _anchors()
    sections = [a for a in anchors if "." not in a]
    assert sections == list("ABCDEFGHIJ"), f"docs/method.md needs the sections A–J in order, found {sections}"
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicates, f"docs/method.md has duplicate headings for {duplicates}"
    assert [f"I.{n}" for n in range(1, 31)] == [a for a in anchors if a.startswith("I.")], \
        "§I must list the resolutions I.1 … I.30, in order, one heading each"


def test_every_citation_in_the_repository_resolves():
    citations = _citations()
    assert any(path.startswith("cf/") for path, _, _ in citations), "no § citation found under cf/: scan is broken"
    anchors = set(_anchors())
    missing = [f"{path}:{line}: §{anchor}" for path, line, anchor in citations if anchor not in anchors]
    assert not missing, ("these citations have no heading '## X.' / '### X.n' in docs/method.md; add the section "
                         "or fix the citation:\n" + "\n".join(missing))


def test_citation_pattern_reads_the_forms_used_in_code():
    text = "see §C.5/§J.2, §I.17–18, §I.1-I.6, §F.7b, §D and §3.4; not §Appendix"
    assert CITATION.findall(text) == ["C.5", "J.2", "I.17", "I.1", "F.7b", "D"]


def _slot_rows() -> list[re.Match]:
    text = METHOD.read_text(encoding="utf-8")
    return [m for m in map(SLOT_ROW.match, text.splitlines()) if m]


def test_slot_tables_match_the_memory_bookkeeping():
    rows = _slot_rows()
    assert {m["options"] for m in rows} == set(MEMORY_CONFIGS), "expected slot rows for released, default and toy-B"
    assert len(rows) >= 15
    for row in rows:
        cfg = MEMORY_CONFIGS[row["options"]]
        n = cfg.frames_per_chunk
        chunk = int(row["chunk"])
        if row["schedule"] == "always":  # the rule fires on every candidate chunk (the stride thins candidates)
            schedule = lambda c, stride=cfg.consolidation_stride_chunks: c % stride == 0  # noqa: E731
        elif row["schedule"] == "never":
            schedule = lambda c: False  # noqa: E731
        else:
            interval = int(row["interval"])
            schedule = lambda c, interval=interval: (c * n) % interval == 0  # noqa: E731
        first, last = int(row["first"]), int(row["last"] or row["first"])
        assert (first, last) == (chunk * n, chunk * n + n - 1), f"frames column of {row.group(0)!r}"
        regions = [part.split() for part in row["slots"].split("|")]
        assert [len(r) for r in regions] == [cfg.sink, cfg.slow, cfg.fast], f"region sizes of {row.group(0)!r}"
        written = [-1 if token == "·" else int(token) for region in regions for token in region]
        expected = simulate_slots(cfg, (chunk + 1) * n, schedule)[chunk]
        assert written == expected, f"{row.group(0)!r}: simulate_slots gives {expected}"


@pytest.mark.parametrize("path, link", [("README.md", "](docs/method.md)"),
                                        ("docs/architecture.md", "](method.md)")])
def test_method_reference_is_linked(path, link):
    assert link in (ROOT / path).read_text(encoding="utf-8"), f"{path} must link docs/method.md ({link!r})"
