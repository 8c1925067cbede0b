"""The import directions of docs/contracts.md, no import circles and no ``sys.path`` tricks, checked statically on
every module of the packages."""

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
# The one leaf every package may import: the registries' shared error (it imports nothing of the toolkit).
SHARED_LEAF = "bilevel.registry"


def _imported_roots(path: Path) -> set[str]:
    """Top-level packages ``path`` imports anywhere (function-level imports included), the shared leaf aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names if alias.name != SHARED_LEAF)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != SHARED_LEAF:
            roots.add(node.module.split(".")[0])
    return roots


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the toolkit modules it imports (anywhere in the file: lazy imports count too)."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the module pkg.sub when that is a module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_no_import_circles() -> None:
    """No module of the toolkit reaches itself through imports, lazy (function-level) imports included."""
    cycles = _cycles(_import_graph(ROOT, PACKAGES))
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_circle_detection_works(tmp_path: Path) -> None:
    """The checker finds a lazy circle (a → b at module level, b → a inside a function) and a relative one."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert _cycles(_import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"]]


def test_no_sys_path_insert_outside_tests() -> None:
    """Scripts run through the installed package (``pip install -e .``), never by editing ``sys.path``."""
    offenders = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                 if any(call in p.read_text(encoding="utf-8") for call in ("sys.path.insert", "sys.path.append"))]
    assert not offenders, f"sys.path edited in {offenders}"


def test_console_scripts_point_at_callables() -> None:
    """``pip install -e .`` puts the five commands on PATH; each must name an importable callable."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert set(scripts) == {"fusion-run", "fusion-fuse", "fusion-evaluate", "fusion-tables", "fusion-bench",
                            "fusion-ablate", "fusion-import-weights"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
