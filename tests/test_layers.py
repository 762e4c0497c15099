"""Imports run one way: `llava` (the library) and `data_gen` at the bottom, `stages` on them, `pipeline` on top.

Every import statement counts, including the lazy ones inside functions: a lazy upward import is still a dependency
that makes the lower layer unusable without the upper one. Modules also import each other without cycles, so each can
be read (and tested) after the ones it builds on.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> the first-party packages its modules may import (written once; everything else is an upward import)
ALLOWED = {
    "llava": {"llava"},
    "data_gen": {"data_gen", "llava"},
    "stages": {"stages", "llava", "data_gen"},
    "pipeline": {"pipeline", "stages", "llava", "data_gen"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    source = path.read_text(encoding="utf-8") if source is None else source
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            found.append((node.lineno, base))
            # `from pkg import mod` imports a module when pkg is a package: count pkg.mod when that file exists
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if (REPO / base.replace(".", "/") / f"{alias.name}.py").is_file()
                      or (REPO / base.replace(".", "/") / alias.name / "__init__.py").is_file()]
    return found


def first_party_files() -> list[Path]:
    return sorted(p for package in ALLOWED for p in (REPO / package).rglob("*.py"))


def test_no_import_runs_up_the_layers():
    upward = []
    for path in first_party_files():
        layer = path.relative_to(REPO).parts[0]
        for line, name in imported_modules(path):
            top = name.split(".")[0]
            if top in ALLOWED and top not in ALLOWED[layer]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name} ({layer} may import only "
                              f"{', '.join(sorted(ALLOWED[layer]))})")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_first_party_modules_import_each_other_without_cycles():
    modules = {module_name(p): p for p in first_party_files()}
    graph = {name: sorted({m for _, m in imported_modules(path) if m in modules and m != name})
             for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path_stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path_stack.append(name)
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path_stack[path_stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        path_stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports():
    """The checker itself: an import inside a function and relative imports are all found and resolved."""
    source = "def f():\n    from pipeline.evaluate import x\nfrom . import trainer\nfrom .config import bind\n"
    names = sorted(name for _, name in imported_modules(REPO / "stages" / "probe.py", source))
    assert names == ["pipeline.evaluate", "stages", "stages.config", "stages.trainer"]
