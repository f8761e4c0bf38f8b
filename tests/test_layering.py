"""The package's imports run one way: data -> models -> train -> explain -> evaluate -> audit -> cli.

``report`` stands apart: it renders results.json and imports nothing of the layers (the audit and
the CLI call it). ``trustvision._utils`` and ``trustvision.errors`` are shared by all and import
no layer. Every import counts, also those inside functions (a lazy import is still a dependency);
only ``if TYPE_CHECKING:`` blocks are ignored. A second test finds import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trustvision

ROOT = Path(trustvision.__file__).parent
ORDER = ["data", "models", "train", "explain", "evaluate", "audit", "cli"]
BASE = {"_utils", "errors"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top in ("cli", "cli_explain", "__main__"):
        return "cli"
    if top in BASE:
        return "base"
    return top


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, module: str, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported trustvision module, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and not (top_level_only and nested):
                out.extend((a.name, child.lineno) for a in child.names if a.name.split(".")[0] == "trustvision")
            elif isinstance(child, ast.ImportFrom) and not (top_level_only and nested):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "trustvision":
                    out.append((target, child.lineno))
                    # "from trustvision.x import y" may import the submodule y
                    for a in child.names:
                        out.append((f"{target}.{a.name}", child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def allowed(src: str, dst: str) -> bool:
    """May module ``src`` import module ``dst``?"""
    a, b = layer(src), layer(dst)
    if b in ("base", "root"):  # _utils, errors, and trustvision/__init__ (which imports errors only)
        return True
    if a in ("base", "root"):
        return False
    if a == b:
        return True
    if a == "report":
        return False
    if b == "report":
        return a in ("audit", "cli")
    if a in ORDER and b in ORDER:
        return ORDER.index(b) < ORDER.index(a)
    return False


def test_layers_import_in_order():
    mods = _modules()
    assert {"trustvision.data", "trustvision.models", "trustvision.report", "trustvision.cli"} <= set(mods)
    bad = []
    for name, path in mods.items():
        for target, line in imports(path, name):
            if target not in mods and target.rsplit(".", 1)[0] in mods:
                target = target.rsplit(".", 1)[0]  # "from pkg import function"
            if target not in mods:
                continue
            if not allowed(name, target):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} ({layer(name)}) imports "
                           f"{target} ({layer(target)})")
    bad = list(dict.fromkeys(bad))
    assert not bad, "imports against data -> models -> train -> explain -> evaluate -> audit -> cli " \
                    "(report apart):\n" + "\n".join(bad)


def test_base_modules_import_no_layer():
    mods = _modules()
    for name, path in mods.items():
        if layer(name) != "base":
            continue
        for target, _ in imports(path, name):
            if target in mods:
                assert layer(target) in ("base",), f"{name} imports {target}"


def test_no_import_cycles():
    """Module-level imports between modules form no cycle (a module importing its own parent
    package's ``__init__`` is the registration pattern and is not counted)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in imports(path, name, top_level_only=True):
            if target not in mods and target.rsplit(".", 1)[0] in mods:
                target = target.rsplit(".", 1)[0]
            if target not in mods or target == name or name.startswith(target + "."):
                continue
            graph[name].add(target)
    # ancestors' __init__ import their children: an edge parent -> child plus child -> parent is the
    # registration pattern above, already dropped; find the remaining strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("src,dst,ok", [
    ("trustvision.models.generative", "trustvision.train.ib_loss", False),
    ("trustvision.train.distributed", "trustvision.cli", False),
    ("trustvision.report.html", "trustvision.audit.store", False),
    ("trustvision.report.html", "trustvision._utils.io", True),
    ("trustvision.audit.runner", "trustvision.report.html", True),
    ("trustvision.evaluate.faithfulness", "trustvision.explain.igos", True),
    ("trustvision.explain.igos", "trustvision.evaluate.faithfulness", False),
    ("trustvision._utils.images", "trustvision.data", False),
])
def test_rule_itself(src, dst, ok):
    """The checker would catch the violations this project has had (and allows what it should)."""
    assert allowed(src, dst) is ok
