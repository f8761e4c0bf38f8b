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

from trustvision.audit.store import atomic_write_bytes
from trustvision.errors import TrustVisionError
from trustvision.report.figures import png_data_uri

__all__ = ["render_report", "render_html", "load_results"]

_METRIC_NOTES = {
    "Accuracy": "Accuracy: top-1 accuracy on the test split (higher is better).",
    "ECE": "ECE: expected calibration error on top-1 confidence with {n_bins} equal-width bins (lower is better).",
    "ECE after TS": "ECE after TS: the same after temperature scaling fitted on the validation split.",
    "Temperature": "Temperature: fitted T (T > 1: the model was overconfident).",
}


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
    metric_columns: list[str] = []
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
        for col in m.get("metrics", {}):
            if col not in metric_columns:
                metric_columns.append(col)
    n_bins = (results.get("options") or {}).get("n_bins", 15)
    notes = [_METRIC_NOTES[c].format(n_bins=n_bins) for c in metric_columns if c in _METRIC_NOTES]
    return _environment().from_string(_template_text()).render(
        r=results,
        figures=figures,
        metric_columns=metric_columns,
        notes=notes,
        model_names=[m["name"] for m in results.get("models", [])],
        dataset_names=[d["name"] for d in results.get("datasets", [])],
    )


def render_report(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Render ``out_dir/results.json`` to ``path`` (default ``out_dir/report.html``), atomically."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    html = render_html(results, out_dir)
    return atomic_write_bytes(Path(path) if path is not None else out_dir / "report.html", html.encode("utf-8"))
