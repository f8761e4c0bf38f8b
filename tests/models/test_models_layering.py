"""Layering: data -> models -> train -> explain -> evaluate -> audit -> cli; models never reach up."""

from __future__ import annotations

import ast
from pathlib import Path

import trustvision

SRC = Path(trustvision.__file__).resolve().parent


def imported_modules(folder: str) -> dict[str, set[str]]:
    """file -> every trustvision module it imports, at the top or inside functions."""
    out = {}
    for path in sorted((SRC / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                names |= {a.value for a in node.args if isinstance(a, ast.Constant)}
        out[path.name] = {n for n in names if n.startswith("trustvision.")}
    return out


def test_models_import_no_later_layer():
    banned = ("train", "explain", "evaluate", "audit", "cli", "report", "__main__")
    for name, mods in imported_modules("models").items():
        bad = {m for m in mods if m.split(".")[1] in banned}
        assert not bad, (name, bad)
