"""The exception tree of ``ecpm.errors``: every exception class ecpm defines derives
from ``EcpmError`` (two internal signals excepted), and the tree drawn in the module
docstring names each of them."""

from __future__ import annotations

import ast
from pathlib import Path

import ecpm.errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ecpm", "probes", "monitor")
OUTSIDE = {"CommandRefused", "_TooComplex"}  # never leave their module (see ecpm.errors)
FOREIGN_ROOTS = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError", "TypeError"}


def _classes() -> dict[str, tuple[str, list[str]]]:
    """name -> (module path, base names) for every class in the three packages."""
    found: dict[str, tuple[str, list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
                    found[node.name] = (str(path.relative_to(ROOT)), bases)
    return found


def _ancestors(name: str, classes: dict[str, tuple[str, list[str]]]) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for base in classes.get(todo.pop(), ("", []))[1]:
            if base not in seen:
                seen.add(base)
                todo.append(base)
    return seen


def test_every_exception_class_derives_from_ecpm_error() -> None:
    classes = _classes()
    exceptions = {
        name for name in classes if name != "EcpmError" and _ancestors(name, classes) & FOREIGN_ROOTS
    }
    assert "SipError" in exceptions and "WireError" in exceptions  # the walk sees them
    stray = sorted(
        f"{classes[n][0]}: {n}" for n in exceptions - OUTSIDE if "EcpmError" not in _ancestors(n, classes)
    )
    assert stray == []


def test_the_docstring_tree_names_every_ecpm_error() -> None:
    classes = _classes()
    tree = ecpm.errors.__doc__ or ""
    derived = {n for n in classes if "EcpmError" in _ancestors(n, classes)}
    assert sorted(n for n in derived if n not in tree) == []
