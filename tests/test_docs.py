"""Every markdown file the code or the docs cite exists in the repository; every cited § is a heading.

A user reading ``see docs/method.md §3`` in a docstring must be able to open that file and find §3. Citations
are found in every ``.py`` file of the four packages (any ``<name>.md`` mention) and in README.md and
docs/*.md (link targets ``[text](<path>.md)``). A bare name resolves against the citing file's folder, the
repository root and ``docs/``; a target outside the repository (``../shared/...``) never counts as found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bilevel", "fusion", "tasks", "experiments")
# Markdown files the code *writes* (evaluate.py, tables.py, ablate.py), not citations.
OUTPUT_NAMES = frozenset({"table.md", "tables.md", "ablation.md"})

_CODE_CITATION = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)(?!\w)(?P<sections>(?:,?\s*§\s*[0-9][0-9.a-z]*)*)")
_LINK = re.compile(r"\]\(\s*([^)\s#]+\.md)(?:#[^)\s]*)?\s*\)")
_SECTION = re.compile(r"§\s*([0-9][0-9.a-z]*)")


@dataclass(frozen=True)
class Citation:
    source: Path
    line: int
    target: str
    sections: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}"
        return f"{where}: {self.target}" + "".join(f" §{s}" for s in self.sections)


def find_citations(path: Path) -> list[Citation]:
    """The markdown citations in one file: any ``*.md`` mention in Python, link targets in markdown."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if path.suffix == ".py":
            for m in _CODE_CITATION.finditer(line):
                name = m.group(1)
                if Path(name).name in OUTPUT_NAMES:
                    continue
                sections = tuple(s.rstrip(".") for s in _SECTION.findall(m.group("sections")))
                out.append(Citation(path, number, name, sections))
        else:
            out.extend(Citation(path, number, m.group(1)) for m in _LINK.finditer(line))
    return out


def resolve(citation: Citation, root: Path) -> Path | None:
    """The cited file inside ``root``, or None."""
    root = root.resolve()
    for base in (citation.source.parent, root, root / "docs"):
        candidate = (base / citation.target).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def _has_section(markdown: Path, section: str) -> bool:
    """True when a heading of ``markdown`` is numbered ``section`` (``## 3.``, ``### 3.1``, ``### 2b.``)."""
    pattern = re.compile(rf"^#+\s+§?{re.escape(section)}(?:[.\s:)]|$)")
    return any(pattern.match(line) for line in markdown.read_text(encoding="utf-8").splitlines())


def problems(citations: list[Citation], root: Path) -> list[str]:
    """One line per citation whose file is missing, or whose cited § is not a heading of that file."""
    out = []
    for c in citations:
        target = resolve(c, root)
        if target is None:
            out.append(f"{c}: no such file in the repository")
            continue
        out.extend(f"{c}: {target.relative_to(root.resolve())} has no heading §{s}"
                   for s in c.sections if not _has_section(target, s))
    return out


def _sources(root: Path) -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    files += [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [p for p in files if p.is_file()]


def test_every_cited_markdown_file_exists() -> None:
    cited = [c for path in _sources(ROOT) for c in find_citations(path)]
    assert cited, "no citations found at all: the scanner is broken"
    bad = problems(cited, ROOT)
    assert not bad, "citations of missing markdown files or sections:\n" + "\n".join(bad)


def test_docs_folder_has_the_user_guides() -> None:
    """The files the README and the docstrings point users to."""
    expected = {"method.md", "methods.md", "runner.md", "metrics.md", "data.md", "tasks.md", "results.md",
                "benchmarks.md", "contracts.md"}
    assert expected <= {p.name for p in (ROOT / "docs").glob("*.md")}


def test_output_names_are_really_written_by_the_code() -> None:
    """The names skipped as outputs must be files the code writes, so the skip cannot hide a citation."""
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "experiments").rglob("*.py"))
    for name in OUTPUT_NAMES:
        assert f'"{name}"' in code or f"'{name}'" in code, name


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "method.md").write_text("# Method\n\n## 1. Problem\n\n### 2b. gn\n", encoding="utf-8")
    readme = "see [method](docs/method.md) and [gone](docs/gone.md#x)\n"
    (root / "README.md").write_text(readme, encoding="utf-8")
    outside = tmp_path / "shared" / "docs"
    outside.mkdir(parents=True)
    (outside / "notes.md").write_text("# notes\n", encoding="utf-8")   # exists, but outside the repository
    (root / "pkg").mkdir()
    (root / "pkg" / "m.py").write_text(
        '"""Formulas: method.md §1 and docs/method.md §2b; also method.md §7 and missing_notes.md.\n'
        "Layouts: ../shared/docs/notes.md. Writes table.md and results/vifb/tables.md.\n"
        '"""\n', encoding="utf-8")
    return root


def test_scanner_finds_and_rejects_bad_citations(fake_repo: Path) -> None:
    """Self-test: the checker must fail on a missing file, a missing §, and a path outside the repository."""
    cited = find_citations(fake_repo / "pkg" / "m.py") + find_citations(fake_repo / "README.md")
    assert [(c.target, c.sections) for c in cited] == [
        ("method.md", ("1",)), ("docs/method.md", ("2b",)), ("method.md", ("7",)), ("missing_notes.md", ()),
        ("../shared/docs/notes.md", ()), ("docs/method.md", ()), ("docs/gone.md", ())]
    bad = problems(cited, fake_repo)
    assert len(bad) == 4, bad
    assert any("has no heading §7" in b for b in bad)
    assert any("missing_notes.md: no such file" in b for b in bad)
    assert any("../shared/docs/notes.md: no such file" in b for b in bad)
    assert any("docs/gone.md: no such file" in b for b in bad)
