"""The package's layers, read from the source with ``ast`` (nothing is imported):
core (``spec_plugins/*.py``, ``kernels``) <- proposers and models <- engine adapters
(``vllm``, ``sglang``); the tools are a leaf nothing imports. No import cycle; the core
imports no engine and no upper layer; what the core imports when it loads is declared
in pyproject's ``dependencies``."""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("vllm", "sglang")
ADAPTERS = ("spec_plugins.vllm", "spec_plugins.sglang")
TOOLS = "spec_plugins.tools"
SESSION = "spec_plugins.adapter"   # the engine-neutral adapter session, below the adapters
UPPER = ("spec_plugins.proposers", SESSION) + ADAPTERS + (TOOLS,)


@dataclass(frozen=True)
class Import:
    target: str        # the imported module (for ``from m import x``: m, or m.x if a module)
    at_load: bool      # runs when the module loads (not inside a function, not TYPE_CHECKING)
    runs: bool = True  # False: for type checkers only (``if TYPE_CHECKING:``)


def module_names(package: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = f.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node, at_load: bool, runs: bool = True) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            at_load = False
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, False, False)
            for child in node.orelse:
                visit(child, at_load, runs)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, at_load, runs) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append(Import(base, at_load, runs))
            found.extend(Import(f"{base}.{a.name}", at_load, runs) for a in node.names
                         if f"{base}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child, at_load, runs)

    visit(ast.parse(path.read_text()), True)
    return found


@dataclass
class Graph:
    imports: dict[str, list[Import]]  # module -> what it imports
    core: set[str]                    # spec_plugins/*.py and spec_plugins/kernels/


def import_graph(package: Path) -> Graph:
    mods = module_names(package)
    core = {m for m, p in mods.items() if p.parent in (package, package / "kernels")}
    return Graph({m: imports_of(m, p, set(mods)) for m, p in mods.items()}, core)


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: Graph, at_load_only: bool = True) -> list[list[str]]:
    """Groups of modules that import each other in a ring: over the imports that run at
    load, or over every import that runs except a module's imports of its own packages
    (loaded before it, so complete by the time its functions run). ``from pkg import
    sub`` inside ``pkg`` is an edge to ``pkg.sub`` only."""
    def edge(m: str, i: Import) -> bool:
        if i.target not in graph.imports or i.target == m:
            return False
        return i.at_load if at_load_only else i.runs and not m.startswith(i.target + ".")

    edges = {m: sorted({i.target for i in imps if edge(m, i)})
             for m, imps in graph.imports.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def layer_violations(graph: Graph) -> list[str]:
    """Imports, at load or inside functions, that point up or out of a module's layer."""
    bad = []
    for m, imps in sorted(graph.imports.items()):
        for i in imps:
            top = i.target.split(".")[0]
            if m in graph.core and (top in ENGINES or _within(i.target, UPPER)):
                bad.append(f"core {m} imports {i.target}")
            elif _within(m, ("spec_plugins.proposers", "spec_plugins.models")) and (
                    top in ENGINES or _within(i.target, (SESSION,) + ADAPTERS + (TOOLS,))):
                bad.append(f"{m} imports {i.target}")
            elif _within(m, (SESSION,)) and (top in ENGINES or _within(i.target, ADAPTERS + (TOOLS,))):
                bad.append(f"{m} imports {i.target}")
            elif not _within(m, (TOOLS,)) and _within(i.target, (TOOLS,)):
                bad.append(f"{m} imports the tool {i.target}")
    return bad


def declared(pyproject: Path, extras: tuple[str, ...] = ()) -> set[str]:
    """The distributions pyproject declares: ``dependencies`` plus the named extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    return {_normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d).group()) for d in deps}


def _normal(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def undeclared(graph: Graph, deps: set[str]) -> list[str]:
    """Third-party modules the core imports at load whose distribution is not declared."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    bad = []
    for m in sorted(graph.core):
        for i in graph.imports[m]:
            top = i.target.split(".")[0]
            if not i.at_load or top in sys.stdlib_module_names or top == "spec_plugins":
                continue
            names = {_normal(d) for d in dists.get(top, [top])}
            if not names & deps:
                bad.append(f"{m} imports {top} (distribution {sorted(names)}) at load")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT / "spec_plugins")


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_import_cycle_through_imports_inside_functions(graph):
    assert cycles(graph, at_load_only=False) == []


def test_the_core_imports_no_engine_and_no_upper_layer(graph):
    assert layer_violations(graph) == []


def test_the_cores_third_party_imports_are_declared(graph):
    """The root's in ``dependencies``; the GPU kernels' (Triton) in the ``gpu`` extra."""
    root = Graph(graph.imports, {m for m in graph.core if not m.startswith("spec_plugins.kernels.")})
    kernels = Graph(graph.imports, graph.core - root.core)
    assert undeclared(root, declared(ROOT / "pyproject.toml")) == []
    assert undeclared(kernels, declared(ROOT / "pyproject.toml", ("gpu",))) == []


def test_the_checks_catch_what_they_forbid(tmp_path):
    """On a small package with one of each fault, each check reports it (so the checks
    above pass because the package is clean, not because they see nothing)."""
    pkg = tmp_path / "spec_plugins"
    for d in ("", "kernels", "proposers", "sglang", "tools"):
        (pkg / d).mkdir(exist_ok=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import numpy\nimport scipy\nfrom spec_plugins import b\n")
    (pkg / "b.py").write_text("from . import a\n\ndef f():\n    import vllm\n")
    (pkg / "kernels" / "k.py").write_text("def f():\n    from spec_plugins.tools import t\n")
    (pkg / "tools" / "t.py").write_text("import vllm\n")  # a tool may use an engine
    (pkg / "proposers" / "p.py").write_text("def f():\n    import spec_plugins.sglang.x\n")
    (pkg / "sglang" / "x.py").write_text("from spec_plugins.proposers import p\n")
    (pkg / "sglang" / "y.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import spec_plugins.sglang.z\n")
    (pkg / "sglang" / "z.py").write_text("import spec_plugins.sglang.y\n")
    # A cycle closed inside a function; a package whose function imports its child,
    # which reads the package (not a cycle: the package has loaded by then).
    (pkg / "kernels" / "c1.py").write_text("def f():\n    from spec_plugins.kernels import c2\n")
    (pkg / "kernels" / "c2.py").write_text("from spec_plugins.kernels import c1\n")
    (pkg / "sglang" / "__init__.py").write_text("NAME = 1\n\ndef f():\n    from . import w\n")
    (pkg / "sglang" / "w.py").write_text("from spec_plugins.sglang import NAME\n")
    g = import_graph(pkg)
    assert cycles(g) == [["spec_plugins.a", "spec_plugins.b"]]
    assert cycles(g, at_load_only=False) == [
        ["spec_plugins.a", "spec_plugins.b"], ["spec_plugins.kernels.c1", "spec_plugins.kernels.c2"],
        ["spec_plugins.proposers.p", "spec_plugins.sglang.x"]]
    assert layer_violations(g) == [
        "core spec_plugins.b imports vllm",
        "core spec_plugins.kernels.k imports spec_plugins.tools",
        "core spec_plugins.kernels.k imports spec_plugins.tools.t",
        "spec_plugins.proposers.p imports spec_plugins.sglang.x"]
    assert undeclared(g, {"numpy"}) == [
        "spec_plugins.a imports scipy (distribution ['scipy']) at load"]
