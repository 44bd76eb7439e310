"""The house's rules, checked on the code itself: data flows down the layers, no circles, and the
runtime is chosen in one function."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
# Lower numbers are lower floors; a module may import from its own floor or below.
LAYERS = {"config": 0, "faults": 0, "version": 0, "io": 1, "models": 2, "runtime": 2, "encode": 2,
          "index": 2, "sinks": 2, "jobs": 3, "commands": 3, "tools": 4, "cli": 5, "exits": 5, "__init__": 5}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """pipeline.* modules imported anywhere in the file (function-level imports too)."""
    package = name.rsplit(".", 1)[0] if not path.name == "__init__.py" else name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pipeline"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    modules = _modules()
    return {t for t in found if t in modules and t != name}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]] if module != "pipeline" else 5


def test_no_module_imports_one_above_it():
    upward = [f"{name} -> {target}" for name, path in _modules().items()
              for target in _imports(name, path)
              if not name.endswith("__init__") and _layer(target) > _layer(name)]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = {name: _imports(name, path) for name, path in _modules().items()
             if not name.endswith("__init__")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("circle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_runtime_is_resolved_in_one_function():
    """The step functions of runtime.py are called from resolve_runtime (and check_here) only."""
    steps = {"_device", "_dtype", "_dtype_note", "_attention", "_compile"}
    callers = {}
    for name, path in _modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                for call in ast.walk(fn):
                    if isinstance(call, ast.Call):
                        called = getattr(call.func, "id", getattr(call.func, "attr", None))
                        if called in steps:
                            callers.setdefault(called, set()).add(f"{name}.{fn.name}")
    assert set(callers) == steps
    assert set().union(*callers.values()) <= {"pipeline.runtime.runtime.resolve_runtime",
                                              "pipeline.runtime.runtime._attention"}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_500_lines():
    """A module past 500 lines holds more than one role: split it by role."""
    long = {name: _lines(path) for name, path in _modules().items() if _lines(path) > 500}
    assert long == {}


def test_no_folder_holds_over_a_fifth_of_the_package():
    """Rooms of like size: a folder past a fifth of the package's lines (its C++ sources too)
    hides more than one stage; split it (as encode/ became encode/, models/ and runtime/)."""
    sources = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cpp", ".h")]
    by_folder: dict[str, int] = {}
    for path in sources:
        parts = path.relative_to(PACKAGE).parts
        room = parts[0] if len(parts) > 1 else path.name
        by_folder[room] = by_folder.get(room, 0) + _lines(path)
    total = sum(by_folder.values())
    assert {room: round(n / total, 3) for room, n in by_folder.items() if n > total / 5} == {}
