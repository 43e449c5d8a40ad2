"""The import graph of srdjax/, built from the source with `ast`: no cycle, and the primitives
(data, image I/O, models, k-means, OMP, frequency split, attacks, checkpoints, parallel, checks)
import nothing above them. Every import counts, including those inside functions: an import
deferred into a function to dodge a cycle is still a cycle.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "srdjax"

# Modules every other module may stand on. Every module of the attacks package is one, except
# the attacks on whole defenses, which attack the purifier and so sit above it.
PRIMITIVES = {"srdjax." + m for m in (
    "checks", "xla_env", "parallel", "checkpoints", "data", "imageio", "models", "kmeans",
    "kmeans_lloyd", "kmeans_seeding", "kmeans_select", "omp", "frequency", "patches", "attacks")}
ABOVE_PRIMITIVES = {"srdjax.attacks.whole_defense"}



def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set) -> str | None:
    """The srdjax module an imported name lives in (a module itself, or the package that
    defines it); None for anything outside srdjax."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC) -> dict:
    """{module: set of srdjax modules it imports}, from every import statement in the source."""
    files = {module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b`: b may be a module of package a, or a name defined in a
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = _resolve(target, modules)
                if found and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list[set]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def is_primitive(module: str) -> bool:
    return module not in ABOVE_PRIMITIVES and (
        module in PRIMITIVES or module.startswith("srdjax.attacks."))


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_imports_of_every_form(graph, tmp_path):
    # The real source: a module-level import, a deferred one, `from srdjax import module`.
    assert "srdjax.kmeans" in graph["srdjax.clusters"]
    assert {"srdjax.purifier", "srdjax.stages"} <= graph["srdjax.loading"]
    assert "srdjax.imageio" in graph["srdjax.data"]
    # A small package with a relative import, a deferred import and a name from a package.
    pkg = tmp_path / "srdjax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from srdjax import b\n")
    (pkg / "b.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from srdjax.sub.c import thing\n")
    (pkg / "sub" / "c.py").write_text("import srdjax.a\nthing = 1\n")
    toy = import_graph(pkg)
    assert toy == {"srdjax": set(), "srdjax.a": {"srdjax.b"}, "srdjax.b": {"srdjax.sub"},
                   "srdjax.sub": {"srdjax.sub.c"}, "srdjax.sub.c": {"srdjax.a"}}
    assert cycles(toy) == [{"srdjax.a", "srdjax.b", "srdjax.sub", "srdjax.sub.c"}]


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, f"import cycles in srdjax/: {[sorted(c) for c in found]}"


def test_primitives_import_nothing_above_them(graph):
    upward = {m: sorted(d for d in deps if not is_primitive(d)
                        # a package's __init__ may gather its own modules
                        and not d.startswith(m + "."))
              for m, deps in graph.items() if is_primitive(m)}
    upward = {m: deps for m, deps in upward.items() if deps}
    assert not upward, f"primitives importing modules above them: {upward}"
    # A renamed primitive would leave its rule unchecked.
    assert PRIMITIVES <= set(graph), sorted(PRIMITIVES - set(graph))
