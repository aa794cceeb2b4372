"""The package's shape: no import cycles (imports inside functions count), imports that only run down the
layers, and no oversized module.

The graph is read from each module's syntax tree, not by importing it: an import inside a function only
runs when the function is called, so importing the package cannot show such a cycle. Only imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bmtard_ray"
MAX_LINES = 400

# The layers, from the floor up: a module may import its own layer and those below it, never one above.
# Each layer is a folder of the package (the floor: the registries of names and the error types).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bmtard_ray", "bmtard_ray.errors", "bmtard_ray.names"),  # floor: names, errors
    ("bmtard_ray.config",),          # what a run is
    ("bmtard_ray.runtime",),         # device, collectives, atomic files
    ("bmtard_ray.storage",),         # run folders and checkpoints
    ("bmtard_ray.data",),            # datasets, splits, loaders
    ("bmtard_ray.models",),          # architectures and model files
    ("bmtard_ray.evaluation",),      # attacks of the evaluation, W-Robust, reports
    ("bmtard_ray.training",),        # methods, trainer, balance, losses, training attacks, teachers, metrics
    ("bmtard_ray.launch",),          # preflight, console, events, the in-process launch
    ("bmtard_ray.ray_train",),       # Ray Train
    ("bmtard_ray.tuning",),          # Ray Tune + Optuna
    ("bmtard_ray.api",),             # the Python API: train, evaluate, search
    ("bmtard_ray.cli",),             # the three command-line tools
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file. Importing ``a.b.c`` from outside ``a.b`` also
    runs ``a/b/__init__.py`` first, so that package counts too; a module inside ``a.b`` does not re-run it
    (its package is already being initialised when it is imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in known:
                found.add(t)
            parts = t.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                inside = name == parent or name.startswith(parent + ".")
                if parent in known and not inside:
                    found.add(parent)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bmtard_ray.x import T\n"
           "def f():\n    from bmtard_ray.y import g\n    import bmtard_ray.z.w\n")
    f = tmp_path / "m.py"
    f.write_text(src)
    found = imports_of("bmtard_ray.m", f, {"bmtard_ray.x", "bmtard_ray.y", "bmtard_ray.z", "bmtard_ray.z.w"})
    assert found == {"bmtard_ray.y", "bmtard_ray.z", "bmtard_ray.z.w"}


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and any(graph.values())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer ``module`` belongs to (its longest matching prefix)."""
    best, index = "", -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            inside = module == prefix or (prefix != "bmtard_ray" and module.startswith(prefix + "."))
            if inside and len(prefix) > len(best):
                best, index = prefix, i
    return index


def test_every_module_belongs_to_a_layer() -> None:
    stray = sorted(name for name in modules() if layer_of(name) < 0)
    assert not stray, f"modules in no layer of LAYERS: {stray}"


def test_imports_only_run_down_the_layers() -> None:
    graph = import_graph()
    up = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


@pytest.mark.parametrize("floor", ["bmtard_ray.names", "bmtard_ray.errors"])
def test_the_floor_imports_nothing_above_it(floor: str) -> None:
    graph = import_graph()
    allowed = {"bmtard_ray.errors", "bmtard_ray.names"}
    assert graph[floor] <= allowed, f"{floor} imports {sorted(graph[floor] - allowed)}"


def test_the_configuration_imports_only_the_floor() -> None:
    graph = import_graph()
    for name in (m for m in graph if m.startswith("bmtard_ray.config")):
        bad = sorted(m for m in graph[name] if layer_of(m) > 0 and not m.startswith("bmtard_ray.config"))
        assert not bad, f"{name} imports {bad}"


def test_the_core_never_imports_ray_or_optuna() -> None:
    """Everything but the Ray layers must import on a machine without Ray or Optuna (the GPU check)."""
    layers = ("bmtard_ray.ray_train", "bmtard_ray.tuning")
    for name, path in modules().items():
        if name.startswith(layers) and not name.endswith(("tuning.space", "tuning.trials")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [m for m in mods if m.split(".")[0] in ("ray", "optuna")]
                assert not bad, f"{name} imports {bad}"


def test_no_module_is_over_the_size_limit() -> None:
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_checkpoint_file_names_live_in_one_module() -> None:
    """The names of checkpoint files and folders are written in bmtard_ray.storage.checkpoints alone: every
    other module asks it (string constants are read from the syntax tree; docstrings are prose)."""
    home = "bmtard_ray.storage.checkpoints"
    names = ("checkpoint.pt", "checkpoint_epoch", "checkpoint_manager_snapshot")
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and any(n in node.value for n in names) and name != home):
                found.append(f"{name}: {node.value!r}")
    assert not found, "checkpoint file names outside " + home + ": " + "; ".join(found)


def test_layers_are_ordered_by_their_place_in_the_list() -> None:
    assert layer_of("bmtard_ray.names") == 0 and layer_of("bmtard_ray.config.schema") == 1
    assert layer_of("bmtard_ray.cli.train") > layer_of("bmtard_ray.ray_train.driver") > layer_of("bmtard_ray.training")
