"""Import layers of the exporter package, read from the source with ``ast``.

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:`` (a type
import still ties the two modules together). Two rules:

* no import cycles between modules;
* a module imports only from its own layer or lower ones (``LAYERS``, lowest first), plus the
  narrower allowances of ``ONLY``.

One test per module, so the report names the modules that break a rule; each failure prints
every violation of its module as ``module (file:line) -> imported module: why``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "exporter"

# Lowest first. A module's layer is the one of its first name below the package
# (exporter.fleet.health -> "fleet"). The package root (exporter/__init__.py: the version) may
# be imported from anywhere.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "logs"),
    ("rules",),  # imports config only
    ("fleet",),
    ("store",),
    ("probing",),
    ("routing",),
    ("client",),  # routes from the routing table with routing's code; nothing else (see ONLY)
    ("failover",),
    ("conformance",),  # a client of masters: uses failover.protocol's checksum and parsing
    ("cluster",),  # replicas on etcd: probing shards, quorum, the leader's facts
    ("metrics",),
    ("service",),
    ("web",),
    ("sim", "cli"),
)

# Modules that may import from no more than these layers (or these exact modules), whatever
# their own layer.
# sim.master is the simulated master: an independent implementation of the master protocol
# (its snapshot checksum included), so it shares no code with the exporter it is tested against.
ONLY: dict[str, frozenset[str]] = {
    "rules": frozenset({"config", "fleet", "routing"}),
    "client": frozenset({"client", "config", "fleet", "routing"}),
    "sim.master": frozenset({"sim.state"}),
    "sim.state": frozenset(),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (a package stands for its __init__)
    path: Path
    line: int


@dataclass(frozen=True)
class Violation:
    imp: Import
    why: str

    def __str__(self) -> str:
        where = f"{self.imp.path.relative_to(ROOT).as_posix()}:{self.imp.line}"
        return f"{self.imp.module} ({where}) -> {self.imp.target}: {self.why}"


def discover(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every module of ``package`` under ``root``."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = base[: len(base) - drop] if drop else base
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str) -> Iterator[Import]:
    """Every import of a module of ``package`` made anywhere in ``path``'s source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"

    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if inside(alias.name):
                    yield Import(module, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            if not inside(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from exporter.web import failover` imports a module; `from x import Name`
                # imports from x itself
                yield Import(module, sub if sub in modules else base, path, node.lineno)
        elif isinstance(node, ast.Call):  # importlib.import_module("exporter.x") / __import__
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and inside(node.args[0].value)
            ):
                yield Import(module, node.args[0].value, path, node.lineno)


def key_of(module: str) -> str:
    """exporter.fleet.health -> 'fleet'; the package root -> ''."""
    return module.split(".")[1] if "." in module else ""


def _only_rule(module: str, package: str) -> tuple[str, frozenset[str]] | None:
    rest = module.removeprefix(package + ".")
    for name, allowed in ONLY.items():
        if rest == name or rest.startswith(name + "."):
            return name, allowed
    return None


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    out.append(component)
    return out


def _path(graph: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    """Shortest import path start -> ... -> goal inside one component (BFS)."""
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & within):
                if child == goal:
                    path = [child, node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1]
                if child not in seen:
                    seen.add(child)
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start, goal]


def violations(root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[Violation]]:
    """{module: its violations} for every module of ``package``, in import order."""
    modules = discover(root, package)
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    found: dict[str, list[Violation]] = {m: [] for m in modules}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    first: dict[tuple[str, str], Import] = {}
    for module, path in modules.items():
        own = key_of(module)
        if module != package and own not in rank:
            found[module].append(Violation(
                Import(module, module, path, 1), f"'{own}' has no layer in LAYERS"))
        only = _only_rule(module, package)
        for imp in imports_of(module, path, modules, package):
            target = imp.target
            if target not in modules:
                found[module].append(Violation(imp, "no such module"))
                continue
            if target == module or target == package:
                continue
            graph[module].add(target)
            first.setdefault((module, target), imp)
            theirs = key_of(target)
            exact = target.removeprefix(package + ".")
            if only is not None and theirs not in only[1] and exact not in only[1]:
                allowed = ", ".join(sorted(only[1]))
                why = f"{only[0]} may import only {allowed}" if allowed else (
                    f"{only[0]} may import nothing from the exporter")
                found[module].append(Violation(imp, why))
            elif own in rank and theirs in rank and rank[theirs] > rank[own]:
                found[module].append(Violation(
                    imp, f"layer '{own}' imports the higher layer '{theirs}'"))
    for component in _cycles(graph):
        for module in sorted(component):
            for target in sorted(graph[module] & component):
                cycle = _path(graph, target, module, component)
                found[module].append(Violation(
                    first[(module, target)], "import cycle " + " -> ".join([module, *cycle])))
    for items in found.values():
        items.sort(key=lambda v: (v.imp.line, v.imp.target, v.why))
    return found


_FOUND = violations()


@pytest.mark.parametrize("module", sorted(_FOUND))
def test_module_imports_respect_layers_and_no_cycles(module: str) -> None:
    problems = _FOUND[module]
    for problem in problems:
        print(problem)
    assert not problems, "\n" + "\n".join(str(p) for p in problems)


def test_every_layer_names_an_existing_part_of_the_package() -> None:
    parts = {key_of(m) for m in discover(ROOT, PACKAGE)} - {""}
    named = {name for layer in LAYERS for name in layer}
    assert named == parts, (sorted(named - parts), sorted(parts - named))


# --- the checker itself, on a made-up package -------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_sees_every_kind_of_import_and_every_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "exporter/__init__.py": "__version__ = '1'\n",
        "exporter/config.py": (
            "from typing import TYPE_CHECKING\n"
            "from exporter import __version__\n"
            "if TYPE_CHECKING:\n"
            "    from exporter.fleet import Fleet\n"  # 4: upward, type-only
        ),
        "exporter/fleet/__init__.py": "from .runtime import Fleet\n",
        "exporter/fleet/runtime.py": (
            "from exporter.config import X\n"
            "def later():\n"
            "    import exporter.store.sqlite\n"  # 3: upward, function level
        ),
        "exporter/store/__init__.py": "",
        "exporter/store/sqlite.py": "from ..fleet import runtime\n",  # cycle via relative import
        "exporter/web/__init__.py": "",
        "exporter/web/a.py": "def f():\n    from exporter.web import b\n",
        "exporter/web/b.py": "import importlib\nimportlib.import_module('exporter.web.a')\n",
        "exporter/rules.py": "from exporter.store import sqlite\n",
        "exporter/sim/__init__.py": "",
        "exporter/sim/master.py": "from exporter.config import X\nfrom exporter.nope import Y\n",
    })
    found = {
        (v.imp.module.removeprefix("exporter."), v.imp.target.removeprefix("exporter."),
         v.imp.line, v.why.replace("exporter.", ""))
        for vs in violations(tmp_path, "exporter").values() for v in vs
    }
    assert found == {
        ("config", "fleet", 4, "layer 'config' imports the higher layer 'fleet'"),
        ("config", "fleet", 4, "import cycle config -> fleet -> fleet.runtime -> config"),
        ("fleet", "fleet.runtime", 1, "import cycle fleet -> fleet.runtime -> config -> fleet"),
        ("fleet.runtime", "config", 1,
         "import cycle fleet.runtime -> config -> fleet -> fleet.runtime"),
        ("fleet.runtime", "store.sqlite", 3, "layer 'fleet' imports the higher layer 'store'"),
        ("fleet.runtime", "store.sqlite", 3,
         "import cycle fleet.runtime -> store.sqlite -> fleet.runtime"),
        ("store.sqlite", "fleet.runtime", 1,
         "import cycle store.sqlite -> fleet.runtime -> store.sqlite"),
        ("web.a", "web.b", 2, "import cycle web.a -> web.b -> web.a"),
        ("web.b", "web.a", 2, "import cycle web.b -> web.a -> web.b"),
        ("rules", "store.sqlite", 1, "rules may import only config, fleet, routing"),
        ("sim.master", "config", 1, "sim.master may import only sim.state"),
        ("sim.master", "nope", 2, "no such module"),
    }
