"""Which of the pipeline's own modules a module runs: its imports, followed through every module they import.

Read from the source files with `ast`, so nothing is imported (TensorFlow stays unloaded for `status`).
Imports inside functions count like those at the top. Importing `pipeline.a.b` also runs the packages
`pipeline` and `pipeline.a`, so those count too. Imports by string (importlib) are invisible here; a stage
names those itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

from pipeline import fileio

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent


def source_file(module):
    """The source file of a module of this package, or None if there is none (`pipeline.x` -> pipeline/x.py)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parents(module):
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_relative(module, level, name):
    path = source_file(module)
    package = module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    base = parts[:len(parts) - (level - 1)] if level > 1 else parts
    return ".".join(base + ([name] if name else []))


def direct_imports(module):
    """The package's modules that `module`'s source imports anywhere in it (parents included)."""
    path = source_file(module)
    if path is None:
        raise ValueError(f"no source file for module '{module}'")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, node.level, node.module) if node.level else node.module
            # `from pipeline import models` imports the submodule pipeline.train.models if there is one
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name and source_file(name) is not None:
                found.add(name)
                found.update(p for p in _parents(name) if source_file(p) is not None)
    found.discard(module)
    return frozenset(found)


def closure(modules):
    """`modules`, their parent packages, and every package module they import directly or indirectly, sorted."""
    seen, stack = set(), list(modules)
    for name in modules:
        stack.extend(p for p in _parents(name) if source_file(p) is not None)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(direct_imports(name))
    return sorted(seen)


def source_digest(modules):
    """The SHA-256 of the named modules' source files: a cache key part that changes whenever their code does."""
    return fileio.sha256_json({name: fileio.sha256_file(source_file(name)) for name in modules})
