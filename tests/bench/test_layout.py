"""The lab tools stay beside the product: pipeline/ never imports bench/, the wheel's package list
leaves bench/ out, and every bench module imports from the checkout."""
from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def _absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_product_imports_no_lab_tool():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in ROOT.glob("pipeline/**/*.py")
                 for name in _absolute_imports(path) if name == "bench" or name.startswith("bench.")]
    assert offenders == []


def test_the_wheel_packages_leave_bench_out():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "pipeline.tools" in packages and "pipeline" in packages
    assert [p for p in packages if not p.startswith("pipeline")] == []
    # and bench/ is a package that find_packages would take without that include
    assert "bench" in find_packages(where=str(ROOT))


BENCH_MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                       for p in ROOT.glob("bench/**/*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("module", BENCH_MODULES)
def test_every_bench_module_imports(module):
    assert importlib.import_module(module).__file__.startswith(str(ROOT / "bench"))
