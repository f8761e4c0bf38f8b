"""trustvision.data imports only trustvision._utils, trustvision.errors and itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_models_layering import imported_modules  # noqa: E402


def test_data_imports_only_utils_errors_and_itself():
    allowed = ("_utils", "errors", "data")
    for name, mods in imported_modules("data").items():
        bad = {m for m in mods if m.split(".")[1] not in allowed}
        assert not bad, (name, bad)
