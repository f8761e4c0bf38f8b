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

from trustvision._utils.io import atomic_write_bytes
from trustvision.errors import TrustVisionError
from trustvision.report.figures import png_data_uri
from trustvision.report.schema import figure_path, validate_results

__all__ = ["render_report", "render_html", "load_results", "summary_table", "summary_csv", "check_sections",
           "summary_html"]

_ARROWS = {"higher": "\u2191", "lower": "\u2193"}


def load_results(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/results.json`` (one-line TrustVisionError if missing or not an audit result)."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise TrustVisionError(f"{folder} is a file; pass the output folder of `trustvision audit` (it holds results.json)")
    path = folder / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustVisionError(f"{path} not found; pass the output directory of `trustvision audit`") from None
    except IsADirectoryError:
        raise TrustVisionError(f"{path} is a folder, not a results file; pass the output directory of "
                               "`trustvision audit`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrustVisionError(f"{path} is not valid JSON ({exc}); rerun `trustvision audit`") from None
    except RecursionError:
        raise TrustVisionError(f"{path} is nested too deeply to be an audit result; rerun `trustvision audit`") from None
    except OSError as exc:
        raise TrustVisionError(f"cannot read {path} ({exc.strerror or exc}); check the folder") from None
    if not isinstance(results, dict) or "schema_version" not in results or "models" not in results:
        raise TrustVisionError(f"{path} is not a trustvision results file; rerun `trustvision audit`")
    return validate_results(results)


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


def _direction(better: str | None) -> str:
    return {"higher": "\u2191 higher is better; ", "lower": "\u2193 lower is better; "}.get(better or "", "")


def _fallback_info(key: str, models: list[dict]) -> dict:
    owners = [c.get("title") or name for m in models for name, c in (m.get("checks") or {}).items()
              if key in (c.get("metrics") or {})]
    return {"better": None, "legend": f"headline number of the {owners[0] if owners else 'audit'} check "
                                      "(see its section below).", "fold_into": None, "group": None}


def _note(model: dict, key: str) -> str | None:
    for c in (model.get("checks") or {}).values():
        if key in (c.get("metrics") or {}) and isinstance(c.get("notes"), dict):
            note = c["notes"].get(key)
            if note:
                return str(note)
    return None


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def summary_table(results: dict) -> dict:
    """The summary table of an audit: one row per model, one column per headline number.

    Everything comes from the metadata the checks declared and the audit stored in results.json
    (``results["metrics"]``: per metric key its direction ``better``, ``legend``, ``fold_into``
    / ``note_format`` and ``group``; each check record's ``notes``): columns in first-seen order;
    a metric with ``fold_into`` is shown small under its host's value (its legend appended to the
    host's); metrics of one ``group`` share one legend entry; a record's note for a metric (e.g.
    the OOD detector) is shown under the value. Metrics without metadata get a neutral column.
    Returns ``{"columns": [{"key", "header", "better"}], "rows": [{"model": model_record,
    "cells": [{"value", "note"}]}], "legend": [(term, explanation)]}``.
    """
    models = results.get("models", [])
    meta = results.get("metrics") if isinstance(results.get("metrics"), dict) else {}
    keys: list[str] = []
    for m in models:
        for k in m.get("metrics") or {}:
            if k not in keys:
                keys.append(k)
    info = {k: {**_fallback_info(k, models), **(meta.get(k) or {})} for k in keys}
    folded = {k: i["fold_into"] for k, i in info.items() if i.get("fold_into") in keys and i["fold_into"] != k}
    columns: list[dict[str, Any]] = []
    legend: list[tuple[str, str]] = [
        ("Model", "links to the model's section; architecture, parameter count and training data under the name."),
    ]
    groups_done: set[str] = set()
    for key in keys:
        if key in folded:
            continue
        i = info[key]
        better = i.get("better") if i.get("better") in ("higher", "lower") else None
        columns.append({"key": key, "header": key, "better": better})
        group = i.get("group")
        if group:
            if group in groups_done:
                continue
            groups_done.add(group)
            members = [k for k in keys if info[k].get("group") == group and k not in folded]
            pattern = str(i.get("pattern") or key)
            prefix, _, rest = pattern.partition("{")
            suffix = rest.partition("}")[2] if rest else ""
            wild = [str(info[k].get("wildcard") or k) for k in members]
            term = prefix + " / ".join(wild) + suffix if rest else " / ".join(members)
        else:
            term = key
        text = str(i.get("legend") or "")
        extra = [str(info[f].get("legend") or "") for f, host in folded.items() if host == key]
        text = " ".join([text] + [_cap(e) for e in extra if e]).strip()
        legend.append((term, _direction(better) + text))
    legend.append(("Checks", "how many checks finished (done), failed, or do not apply to the model (n/a)."))
    legend.append(("\u2014", "not measured for this model (the check does not apply to it, or failed)."))
    flagged: dict[tuple[str, str], list[str]] = {}
    for f in results.get("flags") or []:
        if isinstance(f, dict) and f.get("metric"):
            flagged.setdefault((str(f.get("model_key")), str(f["metric"])), []).append(str(f.get("reason") or ""))
    rows = []
    for m in models:
        metrics = m.get("metrics") or {}
        cells = []
        for col in columns:
            value = metrics.get(col["key"])
            notes = []
            for k, host in folded.items():
                if host == col["key"] and isinstance(metrics.get(k), (int, float)):
                    try:
                        notes.append(str(info[k].get("note_format") or "{:.4g}").format(metrics[k]))
                    except (ValueError, IndexError, KeyError):
                        notes.append(_fmt(metrics[k]))
            note = _note(m, col["key"]) if value is not None else None
            if note:
                notes.append(note)
            flag = " ".join(flagged.get((str(m.get("key")), col["key"]), [])) or None
            cells.append({"value": value, "note": ", ".join(notes) or None, "flag": flag})
        rows.append({"model": m, "cells": cells})
    return {"columns": columns, "rows": rows, "legend": legend}


def check_sections(results: dict) -> list[dict]:
    """The report's comparison view: one entry per check (in run order) with its title,
    description (once, not per model) and every model's record side by side:
    ``[{"name", "title", "description", "models": [(model_record, check_record or None)],
    "metrics": [metric keys of this check]}]``."""
    models = results.get("models", [])
    names: list[str] = [c.get("name") for c in results.get("checks") or [] if c.get("name")]
    for m in models:
        for n in m.get("checks") or {}:
            if n not in names:
                names.append(n)
    out = []
    for name in names:
        recs = [(m, (m.get("checks") or {}).get(name)) for m in models]
        first = next((r for _, r in recs if r), {}) or {}
        spec = next((c for c in results.get("checks") or [] if c.get("name") == name), {})
        keys: list[str] = []
        for _, r in recs:
            for k in (r or {}).get("metrics") or {}:
                if k not in keys:
                    keys.append(k)
        out.append({"name": name, "title": spec.get("title") or first.get("title") or name,
                    "description": spec.get("description") or first.get("description") or "",
                    "models": recs, "metrics": keys})
    return out


def summary_csv(results: dict) -> str:
    """Every model's headline metrics as CSV: one row per model, one column per metric (all of
    them, also those the HTML table folds under another, at full precision), the flags last;
    the audit writes it as ``summary.csv`` beside the report."""
    import csv
    import io

    models = results.get("models", [])
    keys: list[str] = []
    for m in models:
        for k in m.get("metrics") or {}:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "architecture", "num_parameters", *keys, "flags"])
    for m in models:
        metrics = m.get("metrics") or {}
        flags = "; ".join(str(f.get("reason")) for f in results.get("flags") or []
                          if f.get("model_key") == m.get("key"))
        w.writerow([m.get("name"), m.get("architecture"), m.get("num_parameters"),
                    *[("" if metrics.get(k) is None else repr(metrics[k]) if isinstance(metrics[k], float)
                       else metrics[k]) for k in keys], flags])
    return buf.getvalue()


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
                target = figure_path(base, rel, f"the figure {fname!r} of {m.get('name')}/{cname}")
                try:
                    uris[fname] = png_data_uri(target.read_bytes())
                except (OSError, ValueError):
                    uris[fname] = None
            figures[m["key"]][cname] = uris
    return _environment().from_string(_template_text()).render(
        r=results,
        figures=figures,
        summary=summary_table(results),
        sections=check_sections(results),
        arrows=_ARROWS,
        model_names=[m["name"] for m in results.get("models", [])],
        dataset_names=[d["name"] for d in results.get("datasets", [])],
    )


def summary_html(results: dict) -> str:
    """The summary table and its legend as an HTML fragment (a notebook's rich display of an audit)."""
    template = _environment().from_string(
        '<div class="tv-summary"><style>.tv-summary td.num{text-align:right}.tv-summary .cellnote{display:block;'
        'font-size:85%;color:#5b6b7c}.tv-summary .flag-warn{background:#fff3cd}</style>'
        '<table><thead><tr><th>Model</th>{% for c in s.columns %}<th>{{ c.header }}{% if c.better %} '
        '{{ arrows[c.better] }}{% endif %}</th>{% endfor %}</tr></thead><tbody>{% for row in s.rows %}<tr>'
        '<td>{{ row.model.name }}</td>{% for cell in row.cells %}<td class="num{% if cell.flag %} flag-warn{% endif %}"'
        '{% if cell.flag %} title="{{ cell.flag }}"{% endif %}>{{ cell.value | fmt }}{% if cell.note %}'
        '<span class="cellnote">{{ cell.note }}</span>{% endif %}</td>{% endfor %}</tr>{% endfor %}</tbody></table>'
        '{% if flags %}<p><b>Flags</b></p><ul>{% for f in flags %}<li>{{ f.model }} / {{ f.title }}: {{ f.reason }}'
        '</li>{% endfor %}</ul>{% endif %}</div>')
    return template.render(s=summary_table(results), arrows=_ARROWS, flags=results.get("flags") or [])


def render_report(out_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Render ``out_dir/results.json`` to ``path`` (default ``out_dir/report.html``), atomically,
    and write the summary table as ``out_dir/summary.csv`` beside it."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    html = render_html(results, out_dir)
    target = Path(path) if path is not None else out_dir / "report.html"
    atomic_write_bytes(target.with_name("summary.csv") if path is None else out_dir / "summary.csv",
                       summary_csv(results).encode("utf-8"))
    return atomic_write_bytes(target, html.encode("utf-8"))
