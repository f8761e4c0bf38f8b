"""One small default audit of the digits zoo models, shared by the report's tests (the summary
table's and the browser's): every default check, on small subsets."""

from __future__ import annotations

import json

import pytest

from trustvision import audit, models

SMALL = {"n_max": 80, "ood.n": 40, "generative.ood_n": 40, "generative.counterfactual_n": 2,
         "explanations.n": 3, "explanations.sag_n": 1, "explanations.iterations": 2}


@pytest.fixture(scope="session")
def small_options() -> dict:
    """The audit options of the small runs."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def default_audit(tmp_path_factory):
    """(folder, results.json) of ``trustvision audit`` on the digits zoo models at small sizes."""
    names = [e["name"] for e in models.list_zoo() if e.get("dataset") == "digits"]
    out = tmp_path_factory.mktemp("default-report")
    audit.run({n: models.load(n) for n in names}, "digits", out=out, options=SMALL,
              command="trustvision audit (small)", progress=False)
    return out, json.loads((out / "results.json").read_text())
