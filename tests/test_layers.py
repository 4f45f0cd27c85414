"""The package's layers: each module imports only its own layer and the ones below, so there are no cycles, the
coordinator and the node never import each other, and the library never imports the lab (README, "Where things
are"). Read from the source with ``ast``, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import dume

# Lowest first. A module belongs to the longest prefix listed; it may import its own layer and every layer below.
LAYERS = [
    ("dume.v1",),  # the wire contract's generated stubs
    ("dume.shared.errors", "dume.shared.progress", "dume.shared.files", "dume.shared.config", "dume.shared.logs",
     "dume.shared"),
    ("dume.shared.method",),
    ("dume.shared.trust",),
    ("dume.shared.transport",),
    ("dume.shared.commandline",),
    ("dume.coordinator", "dume.node"),  # side by side: neither imports the other
    ("dume.shared.lab",),
    ("dume.shared.cli",),  # the `dume` command: merge and the demo
]
SIBLINGS_APART = ("dume.coordinator", "dume.node")
PACKAGE_DIRS = {"dume": "proto/dume", "dume.shared": "shared", "dume.coordinator": "coordinator", "dume.node": "node"}
ROOT = Path(dume.__file__).resolve().parents[2]


PACKAGE_ONLY = {"dume.shared"}  # the package itself, not everything below it


def layer_of(module: str) -> tuple[int, str]:
    matches = [(len(prefix), index, prefix) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (module.startswith(prefix + ".") and prefix not in PACKAGE_ONLY)]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    _, index, prefix = max(matches)
    return index, prefix


def modules() -> dict[str, Path]:
    """Every module of the installed package (but the package root, which only names the public API), by name."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if package == "dume" and parts[:1] != ("v1",):
                continue  # dume.shared, .coordinator and .node are mapped from their own folders
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if name != "dume":
                found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("dume.")}


def test_every_module_imports_only_its_layer_and_below():
    upward, across = [], []
    for module, path in modules().items():
        level, prefix = layer_of(module)
        for imported in imports_of(path):
            their_level, their_prefix = layer_of(imported)
            if their_level > level:
                upward.append(f"{module} imports {imported} (layer {their_prefix})")
            elif their_level == level and {prefix, their_prefix} == set(SIBLINGS_APART):
                across.append(f"{module} imports {imported}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))
    assert not across, "the coordinator and the node must not import each other:\n" + "\n".join(sorted(across))


def test_no_import_cycles_between_modules():
    known = modules()
    graph = {module: {imported for imported in imports_of(path) if imported in known} |
             {imported.rpartition(".")[0] for imported in imports_of(path) if imported.rpartition(".")[0] in known}
             for module, path in known.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module] - {module}):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
