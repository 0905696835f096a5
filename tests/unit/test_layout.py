"""The import rule of the architecture, enforced on the source tree (../shared/DESIGN.md,
"Layout"): contracts on the ground floor, kits and the kernel above them, components
beside each other on top, importing only downward.

Layers (``lmcache.<top>``):

* ``abc``, ``utils``, ``plugin``, ``ops``: the ground floor; ``abc`` imports only
  ``abc``, ``utils`` and ``plugin`` (and names the kernel's config and metadata types in
  annotations, under ``TYPE_CHECKING``);
* ``kits``: building blocks for components -- the ground floor and other kits;
* ``kernel``: the engine, storage manager and configuration -- ``abc``, ``plugin``,
  ``utils`` only: never a kit, never a component;
* ``builtin``: each component (``builtin.allocators``, ``builtin.connectors``, ...,
  ``builtin.tiers.disk``) imports the ground floor, the kits and itself, never another
  component and never the kernel (but its config and metadata types in annotations);
* plugin distributions (``plugins/*/src``): like a builtin component, plus their own
  package.

Everything else (``experimental`` faces, ``integration``, ``testing``, ``cli``) sits on
top and may import anything. Every import counts: at module level, inside functions and
under ``TYPE_CHECKING``. Module-level imports among lmcache's modules have no cycles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lmcache"
GROUND = {"abc", "utils", "plugin", "ops"}
#: What annotations may name from above their layer.
TYPE_ONLY = {"lmcache.kernel.config", "lmcache.kernel.metadata"}


@dataclass(frozen=True)
class Import:
    target: str  # the imported module (or module.attribute)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    top_level: bool  # executed when the module is imported


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True, top)
                for stmt in child.orelse:
                    visit_stmt(stmt, type_only, top)
                continue
            visit_stmt(child, type_only, top)

    def visit_stmt(stmt: ast.AST, type_only: bool, top: bool) -> None:
        if isinstance(stmt, ast.Import):
            found.extend(Import(a.name, stmt.lineno, type_only, top) for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - stmt.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend(Import(f"{base}.{a.name}", stmt.lineno, type_only, top)
                         for a in stmt.names)
        else:
            inner = top and not isinstance(
                stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(stmt, type_only, inner)

    visit(tree, False, True)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def resolve(target: str, modules: set[str]) -> str | None:
    """The lmcache module ``target`` names (``a.b.C`` → ``a.b``), or None if outside."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def component_of(module: str) -> str:
    """The component a ``lmcache.builtin`` module belongs to (tiers are one each)."""
    parts = module.split(".")
    depth = 4 if len(parts) > 2 and parts[2] == "tiers" else 3
    return ".".join(parts[:depth])


def violation(importer: str, imp: Import, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None when it may)."""
    top = importer.split(".")[1] if "." in importer else ""
    target_top = imported.split(".")[1] if "." in imported else ""
    if imported == "lmcache":  # the package itself: __version__
        return None
    if imp.type_only and imported in TYPE_ONLY and top in {"abc", "kits", "builtin", "plugin"}:
        return None
    if top == "abc":
        ok = target_top in {"abc", "utils", "plugin"}
    elif top in {"utils", "plugin", "ops"}:
        ok = target_top in GROUND and (target_top != "abc" or imp.type_only)
    elif top == "kits":
        ok = target_top in GROUND | {"kits"}
    elif top == "kernel":
        ok = target_top in {"abc", "plugin", "utils", "kernel"}
    elif top == "builtin":
        ok = target_top in GROUND | {"kits"} or (
            target_top == "builtin" and component_of(imported) == component_of(importer))
    else:
        return None  # faces, integration, testing, cli: the top floor
    return None if ok else f"lmcache.{top} may not import {imported}"


def source_modules() -> dict[str, Path]:
    return {module_name(p, ROOT): p for p in sorted(PACKAGE.rglob("*.py"))}


def check_tree(modules: dict[str, Path], extra: dict[str, Path] | None = None,
               root: Path = ROOT) -> list[str]:
    """Every violation of the rule in ``modules`` (and in plugin distributions' modules
    ``extra``, which are held to the rule of a builtin component)."""
    names = set(modules)
    problems = []
    for name, path in {**modules, **(extra or {})}.items():
        for imp in imports_of(path, name):
            imported = resolve(imp.target, names)
            if imported is None:
                continue
            if name in (extra or {}):  # a plugin distribution: like a component
                why = violation("lmcache.builtin.<plugin>", imp, imported)
                if why is None and imported.startswith("lmcache.builtin."):
                    why = f"a plugin distribution may not import {imported}"
                if why is not None:
                    why = why.replace("lmcache.builtin", name.split(".")[0], 1)
            else:
                why = violation(name, imp, imported)
            if why:
                problems.append(f"{path.relative_to(root)}:{imp.line}: {why}")
    return problems


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Cycles among module-level (import-time) imports of lmcache's modules."""
    names = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imp in imports_of(path, name):
            if imp.type_only or not imp.top_level:
                continue
            target = resolve(imp.target, names)
            if target is not None and target != name:
                edges.add(target)
        graph[name] = edges
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # importing a package runs its __init__ first: that is not a cycle back
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return found


def plugin_modules() -> dict[str, Path]:
    out = {}
    for src in sorted((ROOT / "plugins").glob("*/src")):
        for path in sorted(src.rglob("*.py")):
            out[module_name(path, src)] = path
    return out


def test_the_tree_follows_the_import_rule():
    problems = check_tree(source_modules(), plugin_modules())
    assert problems == [], "\n".join(problems)


def test_no_import_cycles():
    assert cycles(source_modules()) == []


def test_every_component_kind_has_a_contract_and_built_ins_live_in_builtin():
    from lmcache.plugin.registry import BASES, registry

    for kind, base in BASES.items():
        assert base.startswith("lmcache.abc."), (kind, base)
        for entry in registry.entries(kind):
            if entry.first_party:
                assert entry.value.startswith("lmcache.builtin."), entry


def test_no_module_mixes_a_contract_with_its_implementations():
    # a module under abc/ defines no concrete component: every class there is abstract,
    # a Protocol, a dataclass, an exception, an enum or the no-op TierEvents
    import importlib
    import inspect

    for name in sorted(source_modules()):
        if not name.startswith("lmcache.abc."):
            continue
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name:
                continue
            allowed = (inspect.isabstract(cls) or getattr(cls, "_is_protocol", False)
                       or hasattr(cls, "__dataclass_fields__") or issubclass(cls, Exception)
                       or cls.__name__ in {"MemoryFormat", "TierEvents"})
            assert allowed, f"{name}.{cls.__name__} is an implementation in a contract module"


# -- the checker itself fails on a broken tree --------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    out = {}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[module_name(path, tmp_path)] = path
    return out


@pytest.mark.parametrize(("importer", "text", "why"), [
    ("lmcache/kernel/engine.py", "from lmcache.builtin.tiers.cpu import LocalCPUBackend\n",
     "lmcache.kernel may not import lmcache.builtin.tiers.cpu"),
    ("lmcache/kernel/engine.py", "def f():\n    import lmcache.kits.remote\n",
     "lmcache.kernel may not import lmcache.kits.remote"),
    ("lmcache/builtin/tiers/disk/tier.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from lmcache.builtin.tiers.cpu import LocalCPUBackend\n",
     "lmcache.builtin may not import lmcache.builtin.tiers.cpu"),
    ("lmcache/builtin/serdes/zstd.py", "from lmcache.kernel.storage_manager import X\n",
     "lmcache.builtin may not import lmcache.kernel.storage_manager"),
    ("lmcache/abc/memory.py", "from lmcache.kits.memory import TensorMemoryObj\n",
     "lmcache.abc may not import lmcache.kits.memory"),
    ("lmcache/kits/remote.py", "from ..builtin.tiers import cpu\n",
     "lmcache.kits may not import lmcache.builtin.tiers.cpu"),
])
def test_the_checker_reports_a_broken_rule(tmp_path, importer, text, why):
    files = {rel: "" for rel in (
        "lmcache/__init__.py", "lmcache/abc/__init__.py", "lmcache/abc/memory.py",
        "lmcache/kits/__init__.py", "lmcache/kits/memory.py", "lmcache/kits/remote.py",
        "lmcache/kernel/__init__.py", "lmcache/kernel/engine.py",
        "lmcache/kernel/storage_manager.py", "lmcache/builtin/__init__.py",
        "lmcache/builtin/serdes/__init__.py", "lmcache/builtin/serdes/zstd.py",
        "lmcache/builtin/tiers/__init__.py", "lmcache/builtin/tiers/cpu.py",
        "lmcache/builtin/tiers/disk/__init__.py", "lmcache/builtin/tiers/disk/tier.py")}
    files[importer] = text
    problems = check_tree(_tree(tmp_path, files), root=tmp_path)
    assert len(problems) == 1 and problems[0].endswith(why), problems


def test_allowed_imports_are_not_reported(tmp_path):
    files = {
        "lmcache/__init__.py": "", "lmcache/abc/__init__.py": "",
        "lmcache/abc/memory.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from lmcache.kernel.config import C\n",
        "lmcache/kernel/__init__.py": "", "lmcache/kernel/config.py": "",
        "lmcache/kernel/engine.py": "from lmcache.abc.memory import MemoryObj\n",
        "lmcache/builtin/__init__.py": "", "lmcache/builtin/tiers/__init__.py": "",
        "lmcache/builtin/tiers/disk/__init__.py": "",
        "lmcache/builtin/tiers/disk/index.py": "",
        "lmcache/builtin/tiers/disk/tier.py":
            "from lmcache.builtin.tiers.disk.index import DiskIndex\n",
    }
    assert check_tree(_tree(tmp_path, files), root=tmp_path) == []


def test_a_cycle_is_found(tmp_path):
    modules = _tree(tmp_path, {"lmcache/__init__.py": "", "lmcache/kits/__init__.py": "",
                               "lmcache/kits/a.py": "from lmcache.kits import b\n",
                               "lmcache/kits/b.py": "import lmcache.kits.a\n"})
    assert cycles(modules) == [["lmcache.kits.a", "lmcache.kits.b", "lmcache.kits.a"]]
