"""The package's imports point one way (docs/design.md, "Module map").

Every ``import`` and ``from ... import`` in ``src/twotower``, at module level or inside a function,
is read with ``ast`` (no module is executed) and checked against three rules:

- a stage imports only itself and the stages before it, in the order of the data flow
  ``data -> features -> model -> evaluation -> run -> training -> index -> serving``, under the
  orchestration on top (``api``, ``cli``, ``compare``, ``demo``, the package root) and over the base
  that every stage may use (``config``, ``errors``, ``artifacts``, small utilities: every top-level
  module not named below);
- no two modules import each other, directly or through others (no cycle);
- no private name (leading underscore) is imported from another module; a package's ``__init__``
  may import its own private submodules (they are its implementation, behind its public names).

The checks are tested on a small package written to a temporary folder, so that each rule is
known to fire.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The data flow, earliest first. A module's stage is its subpackage (twotower.<stage>....).
STAGES = ("data", "features", "model", "evaluation", "run", "training", "index", "serving", "export")
# Top-level modules that belong to a stage rather than to the base. ``run``, the run directory, is
# written by training and read by index and serving; it embeds and ranks with ``evaluation``.
TOP_LEVEL_STAGE = {"run": "run", "run_dir": "run"}
# Orchestration on top: may import every stage. "" is the package root (twotower/__init__.py).
TOP = {"", "api", "cli", "compare", "demo", "__main__"}
RANK = {"base": 0, **{s: i + 1 for i, s in enumerate(STAGES)}, "top": len(STAGES) + 1}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_package(src: Path, package: str) -> dict[str, tuple[Path, ast.Module]]:
    """Every module of ``package`` under ``src``: dotted name -> (file, syntax tree)."""
    return {module_name(f, src): (f, ast.parse(f.read_text(encoding="utf-8"), filename=str(f)))
            for f in sorted((src / package).rglob("*.py"))}


def compiled_modules(src: Path, package: str) -> set[str]:
    """Extension modules of ``package``: one per C source (setup.py builds each) or built binary."""
    found = set()
    for pattern in ("*.c", "*.so", "*.pyd"):
        for f in (src / package).rglob(pattern):
            found.add(module_name(f.with_name(f.name.split(".")[0] + ".py"), src))
    return found


def imports(name: str, path: Path, tree: ast.Module, modules: set[str], package: str):
    """``(line, target module, imported names)`` of every import of ``package`` in one module.

    ``from P import n`` where ``P.n`` is a module counts as importing ``P.n`` (``from . import
    metrics``); otherwise as importing ``P`` for the name ``n``. Relative imports are resolved
    against the module's own package."""
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == package or target.startswith(package + ".")):
                continue
            plain = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    yield node.lineno, f"{target}.{alias.name}", []
                else:
                    plain.append(alias.name)
            if plain:
                yield node.lineno, target, plain


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def stage_of(name: str, package: str) -> str:
    parts = name.split(".")[1:]  # without the package itself
    if not parts:
        return "top"
    if len(parts) > 1 or parts[0] in STAGES:  # a subpackage, or its __init__
        return parts[0] if parts[0] in STAGES else "base"
    if parts[0] in TOP:
        return "top"
    return TOP_LEVEL_STAGE.get(parts[0], "base")


def check(src: Path, package: str = "twotower") -> dict[str, list[str]]:
    """The violations of each rule, as readable lines (empty lists when the package is clean)."""
    parsed = read_package(src, package)
    modules = set(parsed) | compiled_modules(src, package)
    graph: dict[str, set[str]] = defaultdict(set)
    order, private = [], []
    for name, (path, tree) in parsed.items():
        where = path.relative_to(src)
        for line, target, names in imports(name, path, tree, modules, package):
            if target != name:
                graph[name].add(target)
            mine, theirs = stage_of(name, package), stage_of(target, package)
            if RANK[theirs] > RANK[mine]:
                order.append(f"{where}:{line}: {name} ({mine}) imports {target} ({theirs}), a later stage")
            if target == name:
                continue
            # a package's own private submodules are its implementation, hidden behind it (the
            # native package's compiled kernels behind their checked wrappers)
            own = path.name == "__init__.py" and target.rpartition(".")[0] == name
            if not own and any(p.startswith("_") and not _is_dunder(p) for p in target.split(".")):
                private.append(f"{where}:{line}: {name} imports the private module {target}")
            hidden = [n for n in names if n.startswith("_") and not _is_dunder(n)]
            if hidden:
                private.append(f"{where}:{line}: {name} imports private {', '.join(hidden)} from {target}")
    return {"order": order, "cycles": cycles(graph), "private": private}


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append("cycle: " + " <-> ".join(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def violations() -> dict[str, list[str]]:
    return check(SRC)


def test_stages_import_only_earlier_stages(violations):
    assert not violations["order"], "\n".join(violations["order"])


def test_no_import_cycles(violations):
    assert not violations["cycles"], "\n".join(violations["cycles"])


def test_no_private_name_imported_from_another_module(violations):
    assert not violations["private"], "\n".join(violations["private"])


def test_the_walk_sees_the_package():
    """The checks read the real package: module-level and function-level imports of both forms."""
    parsed = read_package(SRC, "twotower")
    modules = set(parsed) | compiled_modules(SRC, "twotower")
    edges = {(name, target) for name, (path, tree) in parsed.items()
             for _, target, _ in imports(name, path, tree, modules, "twotower")}
    assert ("twotower.cli", "twotower.api") in edges           # inside cmd_train
    assert ("twotower.evaluation.evaluator", "twotower.evaluation.metrics") in edges  # from . import metrics
    assert ("twotower.data.sources", "twotower.config") in edges
    assert stage_of("twotower.data.readers", "twotower") == "data"
    assert stage_of("twotower.config", "twotower") == "base"
    assert stage_of("twotower.cli", "twotower") == "top"
    assert stage_of("twotower", "twotower") == "top"


def test_each_rule_fires_on_a_package_that_breaks_it(tmp_path):
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "config.py": "",
        "api.py": "from .model import towers\n",
        "data/__init__.py": "",
        "data/readers.py": "def f():\n    from ..model.towers import Tower\n",   # data -> model: later
        "data/vocab.py": "from .readers import _helper\n",                        # private name
        "data/splits.py": "",
        "model/__init__.py": "",
        "model/towers.py": "from ..data import splits\nfrom ..config import X\nfrom . import heads\n",
        "model/heads.py": "import pkg.model.towers\n",                             # towers <-> heads
        "evaluation/_kernel.c": "",
        "evaluation/ranking.py": "from . import _kernel\nfrom .. import api\n",   # private module; top
        "evaluation/__init__.py": "from . import _kernel\n",                        # its own: allowed
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = check(tmp_path, "pkg")
    assert found["order"] == [
        "pkg/data/readers.py:2: pkg.data.readers (data) imports pkg.model.towers (model), a later stage",
        "pkg/evaluation/ranking.py:2: pkg.evaluation.ranking (evaluation) imports pkg.api (top), a later stage",
    ]
    assert found["cycles"] == ["cycle: pkg.model.heads <-> pkg.model.towers"]
    assert found["private"] == [
        "pkg/data/vocab.py:1: pkg.data.vocab imports private _helper from pkg.data.readers",
        "pkg/evaluation/ranking.py:1: pkg.evaluation.ranking imports the private module pkg.evaluation._kernel",
    ]
