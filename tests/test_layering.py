"""The package's layering (docs/architecture.md): no import cycle, and no import from a layer above.

Imports are read from the source with `ast`, those inside functions included, so an import deferred into a function
to dodge a cycle still counts. Importing `pipeline.a.b` also runs `pipeline/a/__init__.py`; that implicit step is
not an edge here (a package's own `__init__` may import its submodules), only the imports the code writes.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest first. A module may import modules of its own layer and of the layers below it, never above.
LAYERS = (
    ("leaves", ("pipeline", "pipeline.environment", "pipeline.errors", "pipeline.fileio", "pipeline.processes",
                "pipeline.quiet", "pipeline.progress", "pipeline.code_deps", "pipeline.backbones",
                "pipeline.backbones.*", "pipeline.export.formats", "pipeline.data", "pipeline.train", "pipeline.export",
                "pipeline.checkers", "pipeline.reporting", "pipeline.cache", "pipeline.confidence",
                "pipeline.cluster")),
    ("core", ("pipeline.config", "pipeline.catalog", "pipeline.cache.*", "pipeline.stages", "pipeline.local_workers",
              "pipeline.runner")),
    ("wings", ("pipeline.data.*", "pipeline.checkers.*", "pipeline.reporting.*", "pipeline.confidence.*")),
    ("training and export", ("pipeline.train.*", "pipeline.export.*")),
    ("stages", ("pipeline.stages.*",)),
    ("commands", ("pipeline.sweep", "pipeline.predict", "pipeline.cli", "pipeline.__main__", "pipeline.cluster.*")),
)


def modules(root):
    """{dotted module name: source file} of the package at `root`."""
    found = {}
    for path in Path(root).rglob("*.py"):
        parts = [Path(root).name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root):
    """{module: the package's modules it imports anywhere in its source}, relative imports resolved."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
                candidates = [c for c in candidates[:-1] if c in known] or [base]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in known:  # `import pipeline.a.b` names pipeline.a.b itself
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def layer_of(module, layers=LAYERS):
    """The index of the layer whose patterns name `module` (the exact name first, then wildcards)."""
    for exact in (True, False):
        for rank, (_, patterns) in enumerate(layers):
            if any(module == p if exact else ("*" in p and fnmatch.fnmatchcase(module, p)) for p in patterns):
                return rank
    raise AssertionError(f"module {module} is in no layer of LAYERS: add it to the layer it belongs to")


def upward_imports(graph, layers=LAYERS):
    """Every import of a module from a layer above its own, as 'a (layer) -> b (layer)'."""
    return [f"{a} ({layers[layer_of(a, layers)][0]}) -> {b} ({layers[layer_of(b, layers)][0]})"
            for a, targets in sorted(graph.items()) for b in sorted(targets)
            if layer_of(b, layers) > layer_of(a, layers)]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE_ROOT)) == []


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph(PACKAGE_ROOT)) == []


def test_every_module_has_a_layer():
    for module in import_graph(PACKAGE_ROOT):
        layer_of(module)


def write_package(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "",
        "b.py": "def late():\n    from pkg.c import thing\n",
        "c.py": "from . import a\nthing = 1\n",
        "d.py": "import pkg.sub.b\n",
    })
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_an_import_from_a_higher_layer_is_found(tmp_path):
    package = write_package(tmp_path / "pkg", {"__init__.py": "", "low.py": "def f():\n    import pkg.high\n",
                                               "high.py": "from pkg import low\n"})
    layers = (("bottom", ("pkg", "pkg.low")), ("top", ("pkg.high",)))
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    assert upward_imports(graph, layers) == ["pkg.low (bottom) -> pkg.high (top)"]
