"""The package's import graph: no cycle between modules, no import pointing up the layers.

Every module of the installed package (``hq_diffusion`` and its subpackages, plus the folders pyproject maps
into it: ``kernels/`` → ``hq_diffusion.kernels``, ``eval/`` → ``hq_diffusion.eval``, ``app/`` →
``hq_diffusion.app``, ``assets/`` → ``hq_diffusion.assets``) is parsed with :mod:`ast`, without importing it.
Counted as imports: ``import x``, ``from x import y`` (``y`` when it is a module), relative imports, imports
inside functions and ``try`` blocks, and ``importlib.import_module("literal")`` / ``import_module("literal")``
strings. Not counted: imports under ``if TYPE_CHECKING:`` (never executed).

Layers, bottom to top (a module may import its own layer and the layers below)::

    assets < codec < kernels < nn < integrations < hq_diffusion.models < eval < app < bench / cli / demo

``hq_diffusion/__init__.py`` is the lazy public facade: its imports are exempt (it is the entry point); importing
it counts as importing the integrations layer, whose public names it gives access to.
See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = "hq_diffusion"
#: The packages whose folders are walked (the mapped top-level folders live outside hq_diffusion/).
PACKAGE_ROOTS = ("hq_diffusion", "hq_diffusion.kernels", "hq_diffusion.eval", "hq_diffusion.app",
                 "hq_diffusion.assets")
#: (module-name prefix, layer): the longest matching prefix decides; higher layers may import lower ones.
LAYERS = (
    ("hq_diffusion.assets", 0),
    ("hq_diffusion.codec", 1),
    ("hq_diffusion.kernels", 2),
    ("hq_diffusion.nn", 3),
    ("hq_diffusion.integrations", 4),
    ("hq_diffusion.models", 5),
    ("hq_diffusion.tiny", 5),  # the tiny pipelines of hq_diffusion.models
    ("hq_diffusion.eval", 6),
    ("hq_diffusion.app", 7),
    ("hq_diffusion.bench", 8),
    ("hq_diffusion.cli", 8),
    ("hq_diffusion.demo", 8),
)
LAYER_NAMES = {0: "assets", 1: "codec", 2: "kernels", 3: "nn", 4: "integrations", 5: "models", 6: "eval",
               7: "app", 8: "bench/cli/demo"}
EXEMPT_IMPORTERS = {"hq_diffusion"}  # the lazy facade
FACADE_LAYER = 4  # what importing the facade gives access to: the integrations' public names


# ---- collecting --------------------------------------------------------------------------------------------

def package_sources() -> dict[str, Path]:
    """{module name: file} of every module of the installed package (found, not imported)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGE_ROOTS:
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, f"package {pkg} is not installed"
        base = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if "__pycache__" in rel or any(p.startswith(".") for p in rel):
                continue
            if rel[0] in {"kernels", "eval", "app", "assets"} and pkg == ROOT:
                continue  # never the case with the pyproject mapping; guards against a stray copy
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out.setdefault(".".join((pkg, *parts)), path)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """ast.walk, minus the bodies of ``if TYPE_CHECKING:``."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        if isinstance(n, ast.If) and _is_type_checking(n.test):
            todo.extend(n.orelse)
            continue
        todo.extend(ast.iter_child_nodes(n))


def imports_of(module: str, source: str, *, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` (plus any ``hq_diffusion...`` name) that ``module`` imports, as module names."""
    package = module if is_package else module.rpartition(".")[0]

    def resolve_relative(level: int, name: str | None) -> str:
        parts = package.split(".")
        if level - 1 > len(parts) - 1:
            raise ValueError(f"{module}: relative import beyond the top-level package")
        base = ".".join(parts[:len(parts) - (level - 1)])
        return f"{base}.{name}" if name else base

    found: set[str] = set()
    for node in _walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve_relative(node.level, node.module) if node.level else node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name != "import_module" or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                lit = arg.value
                if lit.startswith("."):
                    level = len(lit) - len(lit.lstrip("."))
                    lit = resolve_relative(level, lit.lstrip(".") or None)
                found.add(lit)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def import_graph(sources: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    """{module: modules of ``sources`` it imports} (an import of a name not in ``sources`` is kept as is)."""
    known = set(sources)
    graph = {}
    for mod, src in sources.items():
        if mod in EXEMPT_IMPORTERS:
            graph[mod] = set()
            continue
        graph[mod] = {m for m in imports_of(mod, src, is_package=mod in packages, known=known) if m != mod}
    return graph


# ---- checking ----------------------------------------------------------------------------------------------

def layer_of(module: str) -> int | None:
    if module == ROOT:
        return FACADE_LAYER
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # recursion depth is bounded by the number of modules (a few hundred)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Human-readable problems: modules outside every layer, import cycles, upward imports."""
    problems = []
    for mod in sorted(graph):
        if mod not in EXEMPT_IMPORTERS and layer_of(mod) is None:
            problems.append(f"module {mod} belongs to no layer: add it to LAYERS in tests/test_layers.py")
    for comp in cycles(graph):
        members = set(comp)
        edges = sorted(f"{a} -> {b}" for a in comp for b in graph[a] if b in members)
        problems.append(f"import cycle between {', '.join(comp)}:\n      " + "\n      ".join(edges))
    for mod in sorted(graph):
        lm = layer_of(mod)
        for dep in sorted(graph[mod]):
            ld = layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                problems.append(f"upward import: {mod} ({LAYER_NAMES[lm]}) imports {dep} ({LAYER_NAMES[ld]})")
    return problems


def package_graph() -> dict[str, set[str]]:
    files = package_sources()
    sources = {m: p.read_text(encoding="utf-8") for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return import_graph(sources, packages)


# ---- tests -------------------------------------------------------------------------------------------------

def test_walk_covers_every_layer():
    graph = package_graph()
    for prefix in ("hq_diffusion.codec.config", "hq_diffusion.kernels", "hq_diffusion.nn.linear",
                   "hq_diffusion.integrations.quantize", "hq_diffusion.models", "hq_diffusion.eval.runner",
                   "hq_diffusion.app.engine", "hq_diffusion.bench", "hq_diffusion.cli", "hq_diffusion.demo"):
        assert prefix in graph, f"{prefix} was not found by the walk"


def test_no_import_cycle_and_no_upward_import():
    problems = violations(package_graph())
    assert not problems, (f"{len(problems)} import-layer violation(s) (layers, bottom to top: "
                          f"{' < '.join(LAYER_NAMES[i] for i in sorted(LAYER_NAMES))}):\n  - "
                          + "\n  - ".join(problems))


# The checker itself, on planted violations: every import form is seen, and each problem is reported.
PLANTED = {
    "hq_diffusion": "import importlib\nimportlib.import_module('hq_diffusion.app.ui')\n",
    "hq_diffusion.codec": "from .config import X\n",
    "hq_diffusion.codec.config": "def f():\n    from ..nn import linear\n",
    "hq_diffusion.nn": "",
    "hq_diffusion.nn.linear": "import hq_diffusion.codec.config\n",
    "hq_diffusion.integrations": "",
    "hq_diffusion.integrations.a": "import importlib\nimportlib.import_module('hq_diffusion.integrations.b')\n",
    "hq_diffusion.integrations.b": "from . import c\n",
    "hq_diffusion.integrations.c": "try:\n    from .a import thing\nexcept ImportError:\n    pass\n",
    "hq_diffusion.integrations.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from hq_diffusion.app import ui\n",
    "hq_diffusion.app": "", "hq_diffusion.app.ui": "from hq_diffusion.eval import runner\n",  # allowed
    "hq_diffusion.eval": "", "hq_diffusion.eval.runner": "from hq_diffusion.app import ui as _\n",
    "hq_diffusion.kernels": "", "hq_diffusion.kernels.ops": "def f():\n    import hq_diffusion\n",
    "hq_diffusion.stray": "",
}


def test_checker_reports_planted_violations():
    graph = import_graph(PLANTED, packages={m for m in PLANTED if m.count(".") < 2})
    assert graph["hq_diffusion"] == set()  # the facade is exempt
    assert graph["hq_diffusion.codec"] == {"hq_diffusion.codec.config"}
    assert graph["hq_diffusion.integrations.d"] == set()  # TYPE_CHECKING only
    problems = violations(graph)
    text = "\n".join(problems)
    assert "module hq_diffusion.stray belongs to no layer" in text
    # codec.config -> nn.linear (function-local, relative) -> codec.config: a cycle and an upward import
    assert "import cycle between hq_diffusion.codec.config, hq_diffusion.nn.linear" in text
    assert "upward import: hq_diffusion.codec.config (codec) imports hq_diffusion.nn.linear (nn)" in text
    # import_module string -> from . import c -> try/except import: a three-module cycle
    assert ("import cycle between hq_diffusion.integrations.a, hq_diffusion.integrations.b, "
            "hq_diffusion.integrations.c") in text
    assert "upward import: hq_diffusion.eval.runner (eval) imports hq_diffusion.app.ui (app)" in text
    # the facade exposes integrations: importing it from below is an upward import
    assert "upward import: hq_diffusion.kernels.ops (kernels) imports hq_diffusion (integrations)" in text
    assert len(problems) == 7, text


@pytest.mark.parametrize("module,layer", [("hq_diffusion.kernels.ops", "kernels"), ("hq_diffusion.models", "models"),
                                          ("hq_diffusion.bench.kernels", "bench/cli/demo")])
def test_layer_of_uses_the_longest_prefix(module, layer):
    assert LAYER_NAMES[layer_of(module)] == layer
