"""Render an audit results directory (``results.json`` + PNG figures) to one self-contained HTML file.

The page has inline CSS, figures embedded as ``data:image/png;base64`` URIs, no JavaScript and no
external resources, so it can be mailed or opened from disk. Every string from results.json is
HTML-escaped (jinja2 autoescape).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from trustvision.audit.checks.ood import SUMMARY_SETS, primary_detector
from trustvision.audit.store import atomic_write_bytes
from trustvision.errors import TrustVisionError
from trustvision.report.figures import png_data_uri

__all__ = ["render_report", "render_html", "load_results", "summary_table"]

#: Summary-table columns known to the report: metric key -> (header, better, legend). ``better`` is
#: "higher", "lower" or None; the legend says what the number is (``{n_bins}`` is filled in).
_COLUMNS: dict[str, tuple[str, str | None, str | None]] = {
    "Accuracy": ("Accuracy", "higher", "top-1 accuracy on the test split{gap}."),
    "ECE": ("ECE", "lower", "expected calibration error on top-1 confidence with {n_bins} "
                            "equal-width bins (0 = confidence matches accuracy)."),
    "ECE after TS": ("ECE after TS", "lower", "the same after temperature scaling fitted on the "
                                              "validation split; the fitted temperature T is under "
                                              "the value (T > 1: the model was overconfident, "
                                              "T < 1: underconfident)."),
    **{f"OOD AUROC vs {s}": (f"OOD AUROC vs {s}", "higher", None) for s in SUMMARY_SETS},
    "Bits/dim": ("Bits/dim", "lower", "negative log-likelihood of the test images in bits per "
                                      "dimension (8-bit scale); generative classifiers only."),
}
_OOD_NAMES = {"uniform": "uniform noise", "faces": "face photos", "textures": "textures"}
_OOD_LEGEND = ("AUROC for telling the test images (positive) from out-of-distribution images of "
               "the same shape: {sets} (0.5 = chance, 1 = perfect), scored by the model's own "
               "primary detector, named under the value: typicality = two-tailed typicality test "
               "on -log p(x)/D (generative classifiers), max-softmax = maximum class probability "
               "(every other classifier). All detectors and OOD sets are in each model's "
               "out-of-distribution section.")
#: Metric families whose key names the explanation method in parentheses, e.g. "Insertion AUC (iGOS++)".
_FAMILIES: dict[str, tuple[str | None, str]] = {
    "Insertion AUC": ("higher", "class probability integrated while the {method} heatmap's most "
                                "important cells are revealed on a blurred image (mean over the "
                                "explained test images; high = the heatmap finds the evidence)."),
    "Deletion AUC": ("lower", "the same while those cells are blurred away (low = removing what the "
                              "heatmap points at destroys the prediction)."),
}
#: Metrics shown as a small note under another column's value instead of a column of their own.
_FOLDED: dict[str, tuple[str, str]] = {
    "Temperature": ("ECE after TS", "T = {:.2f}"),
    "Accuracy gap to twin": ("Accuracy", "{:+.4f} vs twin"),
}
_GAP_NOTE = ("; with --compare, the difference to the feed-forward twin is under the value "
             "(positive = this model is more accurate)")
_ARROWS = {"higher": "\u2191", "lower": "\u2193"}


def load_results(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/results.json`` (one-line TrustVisionError if missing or not an audit result)."""
    path = Path(out_dir) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustVisionError(f"{path} not found; pass the output directory of `trustvision audit`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrustVisionError(f"{path} is not valid JSON ({exc}); rerun `trustvision audit`") from None
    if not isinstance(results, dict) or "schema_version" not in results or "models" not in results:
        raise TrustVisionError(f"{path} is not a trustvision results file; rerun `trustvision audit`")
    return results


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        if abs(value) >= 10:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def _humanize(name: str) -> str:
    return str(name).replace("_", " ").replace("-", " ").capitalize()


def _check_counts(model: dict) -> str:
    statuses = [c.get("status") for c in model.get("checks", {}).values()]
    parts = [f"{statuses.count('ok')} done"]
    if statuses.count("error"):
        parts.append(f"{statuses.count('error')} failed")
    if statuses.count("skipped"):
        parts.append(f"{statuses.count('skipped')} n/a")
    return ", ".join(parts)


def _ood_detector(model: dict) -> str | None:
    """The detector behind the model's "OOD AUROC vs <set>" metrics, read from its ood check data."""
    rec = (model.get("checks") or {}).get("ood") or {}
    rows = (rec.get("data") or {}).get("rows") if rec.get("status") == "ok" else None
    if not rows:
        return None
    return primary_detector(str(r.get("detector")) for r in rows).replace("_", "-")


def _family(key: str) -> tuple[str, str] | None:
    """("Insertion AUC", "iGOS++") for "Insertion AUC (iGOS++)"; None if ``key`` is no known family."""
    for fam in _FAMILIES:
        if key.startswith(fam + " (") and key.endswith(")"):
            return fam, key[len(fam) + 2: -1]
    return None


def _direction(better: str | None) -> str:
    return {"higher": "\u2191 higher is better; ", "lower": "\u2193 lower is better; "}.get(better or "", "")


def summary_table(results: dict) -> dict:
    """The summary table of an audit: one row per model, one column per headline number.

    Columns come from the models' ``metrics`` (each check's ``CheckResult.metrics``) in first-seen
    order; diagnostics that only qualify another number (the fitted temperature, the accuracy gap to
    the ``--compare`` twin) are shown small under that number instead of in a column of their own,
    and the OOD columns name the detector under each value. Returns ``{"columns": [{"key",
    "header", "better"}], "rows": [{"model": model_record, "cells": [{"value", "note"}]}],
    "legend": [(term, explanation)]}``; ``better`` is "higher", "lower" or None.
    """
    models = results.get("models", [])
    n_bins = (results.get("options") or {}).get("n_bins", 15)
    keys: list[str] = []
    for m in models:
        for k in m.get("metrics") or {}:
            if k not in keys:
                keys.append(k)
    folded = {k: host for k, (host, _) in _FOLDED.items() if k in keys and host in keys}
    columns: list[dict[str, Any]] = []
    legend: list[tuple[str, str]] = [
        ("Model", "links to the model's section; architecture, parameter count and training data under the name."),
    ]
    gap = any("Accuracy gap to twin" in (m.get("metrics") or {}) for m in models)
    ood_keys = [k for k in keys if k.startswith("OOD AUROC vs ")]
    for key in keys:
        if key in folded:
            continue
        fam = _family(key)
        if key in _COLUMNS:
            header, better, text = _COLUMNS[key]
            if text is not None:
                text = text.format(n_bins=n_bins, gap=_GAP_NOTE if gap else "")
        elif fam is not None:
            header, (better, text) = key, _FAMILIES[fam[0]]
            text = text.format(method=fam[1])
        else:
            header, better = key, None
            owners = [c.get("title") or name for m in models for name, c in (m.get("checks") or {}).items()
                      if key in (c.get("metrics") or {})]
            text = f"headline number of the {owners[0] if owners else 'audit'} check (see its section below)."
        columns.append({"key": key, "header": header, "better": better})
        if key in ood_keys:
            if key == ood_keys[0]:
                sets = [k[len("OOD AUROC vs "):] for k in ood_keys]
                text = _OOD_LEGEND.format(sets=", ".join(_OOD_NAMES.get(x, x) for x in sets))
                legend.append(("OOD AUROC vs " + " / ".join(sets), _direction(better) + text))
            continue
        legend.append((header, _direction(better) + text))
    legend.append(("Checks", "how many checks finished (done), failed, or do not apply to the model (n/a)."))
    legend.append(("\u2014", "not measured for this model (the check does not apply to it, or failed)."))
    rows = []
    for m in models:
        metrics = m.get("metrics") or {}
        detector = _ood_detector(m)
        cells = []
        for col in columns:
            value = metrics.get(col["key"])
            notes = [fmt.format(metrics[k]) for k, (host, fmt) in _FOLDED.items()
                     if folded.get(k) == col["key"] and isinstance(metrics.get(k), (int, float))]
            if col["key"] in ood_keys and value is not None and detector:
                notes.append(detector)
            cells.append({"value": value, "note": ", ".join(notes) or None})
        rows.append({"model": m, "cells": cells})
    return {"columns": columns, "rows": rows, "legend": legend}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(fmt=_fmt, humanize=_humanize, check_counts=_check_counts)
    return env


def _template_text() -> str:
    return (resources.files("trustvision.report") / "templates" / "report.html").read_text(encoding="utf-8")


def render_html(results: dict, base_dir: str | os.PathLike) -> str:
    """The report for ``results`` as an HTML string; figure paths are read relative to ``base_dir``."""
    base = Path(base_dir)
    figures: dict[str, dict[str, dict[str, str | None]]] = {}
    for m in results.get("models", []):
        figures[m["key"]] = {}
        for cname, c in m.get("checks", {}).items():
            uris: dict[str, str | None] = {}
            for fname, rel in (c.get("figures") or {}).items():
                try:
                    uris[fname] = png_data_uri((base / rel).read_bytes())
                except (OSError, ValueError):
                    uris[fname] = None
            figures[m["key"]][cname] = uris
    return _environment().from_string(_template_text()).render(
        r=results,
        figures=figures,
        summary=summary_table(results),
        arrows=_ARROWS,
        model_names=[m["name"] for m in results.get("models", [])],
        dataset_names=[d["name"] for d in results.get("datasets", [])],
    )


def render_report(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Render ``out_dir/results.json`` to ``path`` (default ``out_dir/report.html``), atomically."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    html = render_html(results, out_dir)
    return atomic_write_bytes(Path(path) if path is not None else out_dir / "report.html", html.encode("utf-8"))
