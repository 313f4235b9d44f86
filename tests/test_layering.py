"""The package imports one way: down through five layers, with no cycle between modules.

Every module of ``compress/`` is read with ``ast``: imports at module level and inside functions,
relative imports resolved. ``python tests/test_layering.py`` prints the counts (modules, edges,
cycles, function-level imports) that the README's "Layout" section quotes.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compress"

# Layer of each module, by the longest matching prefix (README "Layout"). A module may import
# only from its own layer or those below; a new module must be placed here.
LAYERS = {
    "compress.errors": 1, "compress.registry": 1, "compress.schema": 1, "compress.config": 1,
    "compress.files": 1, "compress.batches": 1,
    "compress.models": 2, "compress.data": 2, "compress.pruning": 2, "compress.sharing": 2,
    "compress.quant": 2, "compress.encoding": 2, "compress.distill": 2, "compress.hardware": 2,
    "compress.metrics": 2, "compress.tasks": 2, "compress.checkpoint": 2, "compress.lit": 2, "compress.runtime": 2,
    "compress.stages": 3,
    "compress.recipe": 4, "compress.pipeline": 4, "compress.sensitivity": 4, "compress.tracking": 4,
    "compress.teachers": 4, "compress.report": 4,
    "compress.cli": 5, "compress": 5,
}
LAYER_NAMES = {1: "foundation", 2: "capabilities", 3: "stages", 4: "orchestration", 5: "entry points"}
MAX_FUNCTION_IMPORTS = 5  # outside cli.py, each with a comment saying why


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool
    commented: bool


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The compress modules an import statement loads (``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        names = [f"{package}.{a.name}" if f"{package}.{a.name}" in known else package for a in node.names]
    out = []
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            out.append(name)
    return sorted(set(out))


def imports(known: dict[str, Path] | None = None) -> list[Import]:
    known = known or modules()
    found = []
    for module, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                in_function |= {id(sub) for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                text = "\n".join(lines[node.lineno - 1: node.end_lineno])
                for target in _targets(module, path, node, known):
                    found.append(Import(module, target, node.lineno, id(node) in in_function, "#" in text))
    return found


def layer_of(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best is not None else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(_path_through(sorted(component), edges))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _path_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected component: start -> ... -> start."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, set()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def edges_of(found: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in found:
        edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def test_cycle_finder_names_a_cycle():
    """The checker itself: a planted cycle is found and named as a path."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    found = cycles(edges_of(imports()))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_every_module_has_a_layer_and_imports_only_downward():
    known = modules()
    unplaced = sorted(m for m in known if layer_of(m) is None)
    assert not unplaced, f"modules with no layer (add them to LAYERS and the README): {unplaced}"
    upward = [f"{i.source} (layer {layer_of(i.source)}) imports {i.target} (layer {layer_of(i.target)}) "
              f"at line {i.line}" for i in imports(known) if layer_of(i.target) > layer_of(i.source)]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_function_level_imports_are_few_and_explained():
    inside = [i for i in imports() if i.in_function and i.source != "compress.cli"]
    statements = {(i.source, i.line): i for i in inside}
    assert len(statements) <= MAX_FUNCTION_IMPORTS, \
        f"{len(statements)} function-level imports outside cli.py: {sorted(statements)}"
    silent = sorted(k for k, i in statements.items() if not i.commented)
    assert not silent, f"function-level imports without a comment saying why: {silent}"


def test_starting_the_cli_loads_no_heavy_library():
    """``run.py --help`` and recipe errors answer before Lightning, wandb or Torch-Pruning load."""
    import subprocess

    heavy = ('pytorch_lightning', 'wandb', 'onnxruntime', 'matplotlib', 'plotly', 'playwright')
    code = f"import sys, compress.cli, compress.recipe; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]", f"loaded at start-up: {out}"


def main() -> None:
    known = modules()
    found = imports(known)
    edges = edges_of(found)
    found_cycles = cycles(edges)
    inside = {(i.source, i.line) for i in found if i.in_function}
    outside_cli = {k for k in inside if k[0] != "compress.cli"}
    print(f"modules {len(known)}, import edges {sum(len(v) for v in edges.values())}, cycles {len(found_cycles)}"
          f" (largest {max((len(c) - 1 for c in found_cycles), default=0)} modules), function-level imports "
          f"{len(inside)} ({len(outside_cli)} outside cli.py)")
    for layer, name in LAYER_NAMES.items():
        print(f"  {layer} {name}: {', '.join(sorted(m for m in known if layer_of(m) == layer))}")


if __name__ == "__main__":
    main()
