"""The package imports one way: down through five layers (and the capabilities' sub-layers), with no
cycle between modules and no package importing another that imports it back.

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

# Layer of each module, by the longest matching prefix (README "Layout", docs/architecture.md). A
# module may import only from its own layer or sub-layer or those below; a new module must be placed
# here. Layer 2 (the capabilities) is ordered too, lowest first (CAPABILITY_SUBLAYERS).
LAYERS = {
    "compress.errors": 1, "compress.registry": 1, "compress.schema": 1, "compress.config": 1,
    "compress.files": 1, "compress.calls": 1, "compress.batches": 1,
    "compress.plumbing": 2.1,
    "compress.models": 2.2, "compress.data": 2.2, "compress.lit": 2.2,
    "compress.tasks": 2.15,
    "compress.quant": 2.3, "compress.sharing": 2.3,
    "compress.metrics": 2.4, "compress.hardware": 2.4, "compress.runtime": 2.4,
    "compress.pruning": 2.5,
    "compress.checkpoint": 2.6, "compress.encoding": 2.6,
    "compress.distill": 2.7,
    "compress.stages": 3, "compress.stage_configs": 3,
    "compress.recipe": 4, "compress.recipe_names": 4, "compress.pipeline": 4, "compress.measurement": 4, "compress.model_setup": 4,
    "compress.sensitivity": 4, "compress.tracking": 4,
    "compress.teachers": 4, "compress.report": 4, "compress.runfolder": 4, "compress.search": 4,
    "compress.cli": 5, "compress": 5,
}
LAYER_NAMES = {1: "foundation", 2: "capabilities", 3: "stages", 4: "orchestration", 5: "entry points"}
CAPABILITY_SUBLAYERS = {
    2.1: "model plumbing",  # masks and other parametrizations, deployed copies, the restorer registries
    2.15: "tasks",  # what judges a model's outputs: loss, metrics, distillation form (the loop and runtimes ask)
    2.2: "models, data, training loop",  # leaves: none imports another capability
    2.3: "weight formats",  # int8 quantisation, shared-weight codebooks
    2.4: "measurement",  # counting and timing, simulated hardware, runtimes: they read the formats
    2.5: "pruning",  # its searches measure: latency tables, MAC counts, runtimes
    2.6: "saved models",  # checkpoints and the compressed format: they restore what 2.3-2.5 did
    2.7: "distillation",  # a teacher is a saved model
}
MAX_FUNCTION_IMPORTS = 5  # outside cli.py, each with a comment saying why
MAX_FUNCTION_LINES = 100
# Longer today: the structured and latency pruning searches share a step loop that issue 23 makes one
# small public piece; take an entry out when its function is split.
LONG_FUNCTIONS = {("compress.pruning.structured", "prune_model"), ("compress.pruning.latency", "prune_to_latency")}


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


def package_of(module: str) -> str:
    """``compress.pruning.structured`` -> ``compress.pruning``; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def package_edges(found: list[Import]) -> dict[str, set[str]]:
    """Imports between packages (within a package they may go both ways)."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        if package_of(imp.source) != package_of(imp.target):
            edges.setdefault(package_of(imp.source), set()).add(package_of(imp.target))
    return edges


def test_cycle_finder_names_a_cycle():
    """The checker itself: a planted cycle is found and named as a path."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_loop_finder_names_packages_not_modules():
    """A module of one package importing another package that imports it back is a loop; imports inside
    one package are not."""
    found = [Import("compress.a.x", "compress.b.y", 1, False, False), Import("compress.b.z", "compress.a", 1, False, False),
             Import("compress.c.x", "compress.c.y", 1, False, False), Import("compress.c.y", "compress.c.x", 1, False, False)]
    assert package_edges(found) == {"compress.a": {"compress.b"}, "compress.b": {"compress.a"}}
    assert cycles(package_edges(found)) == [["compress.a", "compress.b", "compress.a"]]


def test_no_package_imports_another_that_imports_it_back():
    found = cycles(package_edges(imports()))
    assert not found, "package loops: " + "; ".join(" -> ".join(c) for c in found)


def test_every_capability_sublayer_is_named():
    assert {v for v in LAYERS.values() if int(v) == 2} == set(CAPABILITY_SUBLAYERS)


def test_no_import_cycle_between_modules():
    found = cycles(edges_of(imports()))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_every_module_has_a_layer_and_imports_only_downward():
    known = modules()
    unplaced = sorted(m for m in known if layer_of(m) is None)
    assert not unplaced, f"modules with no layer (add them to LAYERS and the README): {unplaced}"
    upward = [f"{i.source} (layer {layer_of(i.source)}) imports {i.target} (layer {layer_of(i.target)}) "
              f"at line {i.line}" for i in imports(known) if layer_of(i.target) > layer_of(i.source)]  # sub-layers too
    assert not upward, "upward imports: " + "; ".join(upward)


def test_function_level_imports_are_few_and_explained():
    inside = [i for i in imports() if i.in_function and i.source != "compress.cli"]
    statements = {(i.source, i.line): i for i in inside}
    assert len(statements) <= MAX_FUNCTION_IMPORTS, \
        f"{len(statements)} function-level imports outside cli.py: {sorted(statements)}"
    silent = sorted(k for k, i in statements.items() if not i.commented)
    assert not silent, f"function-level imports without a comment saying why: {silent}"


def long_functions(known: dict[str, Path] | None = None) -> dict[tuple[str, str], int]:
    """``{(module, function): lines}`` of every function (methods and nested ones too) over the limit."""
    out = {}
    for module, path in (known or modules()).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[(module, node.name)] = lines
    return out


def test_no_function_is_over_100_lines(tmp_path):
    long = {k: v for k, v in long_functions().items() if k not in LONG_FUNCTIONS}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
    planted = tmp_path / "compress" / "m.py"  # the counter itself: 101 lines is over, 100 is not
    planted.parent.mkdir()
    planted.write_text("def f():\n" + "    x = 1\n" * 99 + "    return x\n\n\ndef g():\n" + "    pass\n" * 99)
    assert long_functions(modules(planted.parent)) == {("compress.m", "f"): 101}


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
    for layer, name in sorted({**LAYER_NAMES, **CAPABILITY_SUBLAYERS}.items()):
        members = sorted(m for m in known if layer_of(m) == layer)
        print(f"  {layer} {name}: {', '.join(members) or '(its sub-layers below)'}")


if __name__ == "__main__":
    main()
