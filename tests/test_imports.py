"""The package's dependencies run one way and show at the top of each file.

Read from the source (no imports run): every import of the package sits at module level, and
the graph of which module imports which has no cycle.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "alignment_gap")
# Imports that stay inside a function, and why.
LOCAL_IMPORTS_ALLOWED = {
    ("alignment_gap", "jax"),  # start-up: decide the platform before jax picks one
    ("alignment_gap", "jax._src.hardware_utils"),  # private to jax: its absence is tolerated
    ("alignment_gap.data.real_data", "pyarrow.parquet"),  # optional: parquet files only
}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, name)
    return out


MODULES = _modules()


def _imported(node, module: str) -> list[str]:
    """Module names an import statement names (`from a import b` names `a.b` when that is a
    module, else `a`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative
        parts = module.split(".")
        if not MODULES[module].endswith("__init__.py"):
            parts = parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _local_imports(tree) -> list[ast.AST]:
    """Import statements inside a function or class body."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out += [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        local = set(map(id, _local_imports(tree)))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in local:
                for name in _imported(node, module):
                    # importing a.b.c runs a and a.b first, unless they are this module's own
                    # packages (already being imported when it runs)
                    parts = name.split(".")
                    deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)
                             if not module.startswith(".".join(parts[:i]) + ".")}
        graph[module] = {d for d in deps if d in MODULES and d != module}
    return graph


def test_every_import_of_the_package_is_at_module_level():
    found = []
    for module, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in _local_imports(tree):
            for name in _imported(node, module):
                if (module, name) not in LOCAL_IMPORTS_ALLOWED:
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {name}")
    assert not found, "imports inside functions:\n" + "\n".join(found)


def _cycle(graph) -> list[str] | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("low, high", [
    ("alignment_gap.errors", "alignment_gap"),  # errors imports nothing of ours
    ("alignment_gap.checkpoint", "alignment_gap.train"),
    ("alignment_gap.config_checks", "alignment_gap.study"),
    ("alignment_gap.data", "alignment_gap.train"),
    ("alignment_gap.models", "alignment_gap.train"),
])
def test_lower_layers_do_not_import_higher_ones(low, high):
    graph = _graph()
    for module, deps in graph.items():
        if module == low or module.startswith(low + "."):
            bad = [d for d in deps if d == high or d.startswith(high + ".")]
            if low.startswith(high):  # a leaf of the package: only the package root is allowed
                bad = [d for d in bad if d != "alignment_gap"]
            assert not bad, f"{module} imports {bad}"


def test_the_checks_can_fail():
    """A two-module cycle and a function-level import are found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    tree = ast.parse("def f():\n    import os\n")
    assert len(_local_imports(tree)) == 1


SCRIPT_FOLDERS = ("bench", "tools", "launch")


@pytest.mark.parametrize("folder", SCRIPT_FOLDERS)
def test_scripts_import_no_top_level_configs(folder):
    """`python bench/X.py` puts bench/ on the path, not the repository root, and the wheel
    installs no `configs` package: scripts import the presets from `alignment_gap.presets`."""
    offenders = []
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            path = os.path.join(ROOT, folder, name)
            tree = ast.parse(open(path).read(), path)
            names = [n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                     for n in _imported(node, "alignment_gap")]
            offenders += [f"{folder}/{name}: {n}" for n in names
                          if n == "configs" or n.startswith("configs.")]
    assert not offenders, offenders
