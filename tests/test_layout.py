"""The import directions of contracts.md, checked statically on every module of the packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bilevel", "fusion", "tasks", "experiments")
# package -> the toolkit packages it must never import
FORBIDDEN = {
    "bilevel": {"fusion", "tasks", "experiments"},
    "fusion": {"tasks", "bilevel", "experiments"},
    "tasks": {"bilevel", "experiments"},
    "experiments": set(),
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_import_directions(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "import directions of contracts.md violated:\n" + "\n".join(offenders)


def test_forbidden_detection_works(tmp_path: Path) -> None:
    """The checker itself must catch a violation (so the test above can fail)."""
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom tasks.seg import X\nimport bilevel.step as s\n")
    assert _imported_roots(module) >= {"tasks", "bilevel", "os"}


def test_library_code_never_calls_cuda() -> None:
    """Library code takes a device argument; `.cuda()` would break CPU-only users."""
    offenders = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                 if ".cuda()" in p.read_text(encoding="utf-8")]
    assert not offenders, f".cuda() found in {offenders}"
