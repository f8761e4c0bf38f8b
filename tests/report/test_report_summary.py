"""The report's summary table: one compact row per model, every column explained in the legend."""

from __future__ import annotations

import re

import pytest

from trustvision.audit.checks.ood import SUMMARY_SETS
from trustvision.report import render_html, summary_table

ZOO = ("zoo:ibinn-small-digits", "zoo:ibinn-small-ff-digits", "zoo:small-cnn-digits")


def _header_cells(html: str) -> list[str]:
    table = re.search(r'<table class="summary">(.*?)</table>', html, re.S).group(1)
    thead = re.search(r"<thead>(.*?)</thead>", table, re.S).group(1)
    cells = re.findall(r"<th>(.*?)</th>", thead, re.S)
    return [re.sub(r"<[^>]+>", "", h).replace("&nbsp;", " ").strip() for h in cells]


@pytest.mark.slow
def test_default_audit_summary_is_compact(default_audit):
    out, results = default_audit
    assert {m["name"] for m in results["models"]} >= set(ZOO)
    html = (out / "report.html").read_text(encoding="utf-8")
    headers = _header_cells(html)
    assert len(headers) <= 12, headers
    # one OOD column per set, shared by generative and feed-forward models
    for s in SUMMARY_SETS:
        assert sum(h.startswith(f"OOD AUROC vs {s}") for h in headers) == 1
    assert not any("typicality" in h or "max-softmax" in h or "Temperature" in h for h in headers)
    assert headers[0] == "Model" and headers[-1] == "Checks"
    # every column is explained in the legend, with its direction where it has one
    legend = dict(summary_table(results)["legend"])
    for col in summary_table(results)["columns"]:
        term = next(t for t in legend if t == col["header"] or (col["header"].startswith("OOD AUROC vs ")
                                                                and t.startswith("OOD AUROC vs ")))
        if col["better"] is not None:
            assert legend[term].startswith(f"{'↑' if col['better'] == 'higher' else '↓'} {col['better']} is better")
    assert legend["ECE"].startswith("↓ lower is better") and legend["Accuracy"].startswith("↑ higher is better")


@pytest.mark.slow
def test_ood_cells_are_the_best_detectors_auroc(default_audit):
    """Each OOD summary cell is the highest AUROC of the model's detectors on that set, named under
    the value; the check's data keeps every detector (the post-hoc ones on these models, the
    likelihood scores too for the generative classifier, whose energy and max-logit are named as
    left out)."""
    _, results = default_audit
    table = summary_table(results)
    keys = [c["key"] for c in table["columns"]]
    for m, row in zip(results["models"], table["rows"]):
        assert row["model"]["name"] == m["name"]
        rows = [r for r in m["checks"]["ood"]["data"]["rows"] if not r["detector"].endswith("(compare)")]
        dets = {r["detector"] for r in rows}
        gc = m["name"] == "zoo:ibinn-small-digits"
        # the generative classifier's outputs are log-posteriors: energy and max-logit are left out, named
        assert {"max-softmax", "mahalanobis", "knn"} | (set() if gc else {"max-logit", "energy"}) <= dets, dets
        if gc:
            assert {"max-logit", "energy"} <= set(m["checks"]["ood"]["data"]["skipped"]) and not \
                {"max-logit", "energy"} & dets
        for s in SUMMARY_SETS:
            of_set = [r for r in rows if r["ood_set"] == s]
            best = max(of_set, key=lambda r: r["auroc"])
            cell = row["cells"][keys.index(f"OOD AUROC vs {s}")]
            assert cell["value"] == best["auroc"] == m["metrics"][f"OOD AUROC vs {s}"]
            assert cell["value"] >= max(r["auroc"] for r in of_set)
            assert cell["note"] == best["detector"].replace("_", "-")
        if m["name"] == "zoo:ibinn-small-digits":
            assert {"log_px", "typicality", "complexity"} <= dets


def test_folded_and_unknown_metrics():
    """The temperature and the twin gap sit under their host value; an unknown metric keeps a column."""
    results = {"options": {"n_bins": 10}, "metrics": {  # what the checks declared, as the audit stores it
        "Accuracy": {"better": "higher", "legend": "top-1 accuracy on the test split."},
        "ECE": {"better": "lower", "legend": "expected calibration error with 10 equal-width bins."},
        "ECE after TS": {"better": "lower", "legend": "the same after temperature scaling."},
        "Temperature": {"better": None, "legend": "the fitted temperature.", "fold_into": "ECE after TS",
                        "note_format": "T = {:.2f}"},
        "Accuracy gap to twin": {"better": None, "legend": "the difference to the feed-forward twin.",
                                 "fold_into": "Accuracy", "note_format": "{:+.4f} vs twin"}}, "models": [
        {"key": "a", "name": "a", "metrics": {"Accuracy": 0.9, "ECE": 0.05, "ECE after TS": 0.02, "Temperature": 1.5,
                                             "Accuracy gap to twin": -0.01, "Mean confidence": 0.8},
         "checks": {"conf": {"status": "ok", "title": "Mean <confidence>", "metrics": {"Mean confidence": 0.8}}}},
        {"key": "b", "name": "b", "metrics": {"Accuracy": 0.7}, "checks": {}},
    ]}
    t = summary_table(results)
    assert [c["key"] for c in t["columns"]] == ["Accuracy", "ECE", "ECE after TS", "Mean confidence"]
    a, b = ([c["value"] for c in r["cells"]] for r in t["rows"])
    assert a == [0.9, 0.05, 0.02, 0.8] and b == [0.7, None, None, None]
    notes = [c["note"] for c in t["rows"][0]["cells"]]
    assert notes == ["-0.0100 vs twin", None, "T = 1.50", None]
    legend = dict(t["legend"])
    assert "10 equal-width bins" in legend["ECE"] and "twin" in legend["Accuracy"]
    assert legend["Mean confidence"] == "headline number of the Mean <confidence> check (see its section below)."
    html = render_html({**results, "models": [{**m, "architecture": "x", "num_parameters": 3} for m in
                                              results["models"]]}, ".")
    assert "Mean &lt;confidence&gt;" in html and "T = 1.50" in html
