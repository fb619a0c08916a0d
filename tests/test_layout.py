"""The library's shape (README, Layout): wings that name its parts, no import circles, small files, one-way arrows.

Imports are read from the source with `ast` (every import, also those inside functions, which run too), so the
check does not depend on what happens to be imported already.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "gnlorp"
WINGS = ("cli", "data", "models", "train", "export", "runs", "optim", "memory", "methods")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIBRARY.rglob("*.py") if "assets" not in p.parts}


def imported(path: Path, known: set[str]) -> set[str]:
    """The gnlorp modules `path` imports: `from pkg import name` counts pkg.name where that is a module, and importing
    pkg.mod runs pkg/__init__ first, so each package above an imported module counts too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return found - ancestors - {name}


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imported(path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_library():
    assert cycles(import_graph()) == []


def test_the_export_writers_share_report_and_neither_imports_the_other():
    graph = import_graph()
    assert "gnlorp.export.report" in graph["gnlorp.export.hf"] and "gnlorp.export.report" in graph["gnlorp.export.gguf"]
    assert "gnlorp.export.gguf" not in graph["gnlorp.export.hf"]
    assert "gnlorp.export.hf" not in graph["gnlorp.export.gguf"]


def test_at_most_eight_modules_at_the_top_and_every_wing_is_a_package():
    top = sorted(p.name for p in LIBRARY.glob("*.py"))
    assert len(top) <= 8, top
    assert all((LIBRARY / wing / "__init__.py").is_file() for wing in WINGS)
    assert {p.name for p in LIBRARY.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(WINGS)


@pytest.mark.parametrize("folder", ["gnlorp", "ui"])
def test_no_file_over_the_size_line(folder):
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / folder).rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_every_wing_says_what_it_is_for():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((LIBRARY / wing / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, wing


def _gnlorp_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every gnlorp import in a file outside the library."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gnlorp":
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "gnlorp"]
    return found


def test_the_library_never_imports_the_studio():
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "ui" or n.startswith("ui.") or n in ("app",) for n in names), path


def test_the_studio_uses_only_the_public_api():
    """ui/ and app.py import gnlorp's top modules and wings, never a module inside a wing or a private name."""
    for path in [ROOT / "app.py", *(ROOT / "ui").rglob("*.py")]:
        for module, names in _gnlorp_imports(path):
            assert module.count(".") <= 1, f"{path.name} imports {module}: import it from its wing"
            assert not any(name.startswith("_") for name in names), f"{path.name}: a private name from {module}"
            if module.split(".")[-1] in WINGS:  # a wing's public names are its __all__ and its modules
                wing = LIBRARY / module.split(".")[-1]
                exported = getattr(__import__(module, fromlist=["_"]), "__all__", [])
                public = {*exported, *(p.stem for p in wing.glob("*.py"))}
                assert set(names) <= public, f"{path.name}: {set(names) - public} not public in {module}"
