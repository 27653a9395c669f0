"""The import rules of docs/architecture.md as a checker over source files (function bodies included), so a test
can run it on the project and on a planted tree that breaks it.

    contract  <-  runtime  <-  writing, export, calibration, engines  <-  verify  <-  cli

A folder may import itself and the folders it lists below; along the data flow a later stage may import an earlier
one (export -> calibration -> engines), never the reverse. No import cycle between modules, at any depth.
"""
from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path

ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "runtime": {"contract"},
    "writing": {"contract"},
    "export": {"contract", "runtime", "writing"},
    "calibration": {"contract", "runtime", "writing", "export"},
    "engines": {"contract", "runtime", "writing", "export", "calibration"},
    "verify": {"contract", "runtime", "writing", "export", "calibration", "engines"},
    "cli": {"contract", "runtime", "writing", "export", "calibration", "engines", "verify"},
}
MODEL_CODE = ("diffusers", "transformers", "peft")  # the runtime never imports model-definition code


@dataclasses.dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.why}"


def package_dirs(root: Path) -> dict[str, Path]:
    """`k3trt.x` -> folder, from pyproject.toml's package-dir (the installed mapping)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = project["tool"]["setuptools"]["package-dir"]
    return {package: root / folder for package, folder in mapping.items()}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package, folder in package_dirs(root).items():
        for path in folder.glob("*.py"):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            found[name] = path
    return found


def folder_of(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str, list[str], int]]:
    """(line, module, imported names, relative level) for every import statement, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", [a.name for a in node.names], node.level))
    return found


def edges(root: Path) -> tuple[dict[str, set[str]], list[Violation]]:
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    violations = []
    for name, path in known.items():
        for line, target, names, level in _imports(path):
            if level:
                violations.append(Violation(name, line, "." * level + target, "relative import: write k3trt.<folder>..."))
                continue
            if folder_of(name) == "runtime" and target.split(".")[0] in MODEL_CODE:
                violations.append(Violation(name, line, target, "the runtime never imports model code"))
            if not target.startswith("k3trt."):
                continue
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
            for imported in targets:
                graph[name].add(imported)
                source, dest = folder_of(name), folder_of(imported)
                if dest != source and dest not in ALLOWED.get(source, set()):
                    violations.append(Violation(name, line, imported, f"{source}/ may not import {dest}/ "
                                                                      "(docs/architecture.md)"))
    return graph, violations


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check(root: Path) -> list[str]:
    graph, violations = edges(root)
    return [str(v) for v in violations] + [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
