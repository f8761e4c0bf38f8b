"""Built-in audit checks: every module in this folder is imported, and its ``@register_check``
classes register themselves. Adding a check = adding one file here."""

import importlib
import pkgutil

__all__: list[str] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
