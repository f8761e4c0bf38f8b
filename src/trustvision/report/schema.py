"""Validation of a results.json before it is rendered: one line naming the first problem.

The report renders what an audit wrote, but the file may have been edited, truncated or crafted
by someone else. Every value the template and the summary table read is checked here for its
type (and figure paths for staying inside the audit folder), so a tampered file gives a one-line
:class:`~trustvision.errors.TrustVisionError` instead of a traceback or a page that embeds files
from elsewhere.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from trustvision.errors import TrustVisionError

__all__ = ["validate_results", "figure_path"]

_STATUS = ("ok", "error", "skipped")
_NOTE_FORMAT = re.compile(r"^[^{}]*\{:[^{}]*\}[^{}]*$")


class _Invalid(Exception):
    def __init__(self, where: str, what: str, got: Any):
        text = repr(got)
        super().__init__(f"{where} must be {what} (got {text[:40]}{'...' if len(text) > 40 else ''})")


def _type(where: str, value: Any, types: tuple, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) and bool not in types:
        raise _Invalid(where, what, value)
    if not isinstance(value, types):
        raise _Invalid(where, what, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(where, what, value)


def _str(where, value, optional=False):
    _type(where, value, (str,), "a string", optional)


def _int(where, value, optional=False):
    _type(where, value, (int,), "an integer", optional)


def _num(where, value, optional=True):
    _type(where, value, (int, float), "a number or null", optional)


def _scalar(where, value):
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise _Invalid(where, "a number, a string or null", value)


def _dict(where, value, optional=False) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(where, "an object", value)
    return value


def _list(where, value, optional=False) -> list:
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise _Invalid(where, "a list", value)
    return value


def _each(where: str, items: dict | list, check: Callable[[str, Any], None]) -> None:
    pairs = items.items() if isinstance(items, dict) else enumerate(items)
    for k, v in pairs:
        check(f"{where}[{k!r}]" if isinstance(items, dict) else f"{where}[{k}]", v)


def figure_path(base: Path, rel: Any, where: str = "figure") -> Path:
    """``base / rel`` for a figure named in results.json, refused (one line) unless ``rel`` is a
    relative path that stays inside ``base`` once symlinks are resolved."""
    if not isinstance(rel, str) or not rel:
        raise TrustVisionError(f"results.json: {where} must be a relative path inside the audit folder")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", rel):
        raise TrustVisionError(f"results.json: {where} {rel!r} points outside the audit folder; the report "
                               "only embeds figures from inside it (rerun `trustvision audit`)")
    root = base.resolve()
    target = (root / Path(*pure.parts)).resolve()
    if target != root and root not in target.parents:
        raise TrustVisionError(f"results.json: {where} {rel!r} leads outside the audit folder (a symlink?); "
                               "the report only embeds figures from inside it")
    return target


def _record(where: str, rec: Any) -> None:
    rec = _dict(where, rec)
    status = rec.get("status")
    if status not in _STATUS:
        raise _Invalid(f"{where}.status", f"one of {', '.join(_STATUS)}", status)
    for key in ("title", "description", "summary", "error", "traceback", "reason", "computed_at", "check"):
        _str(f"{where}.{key}", rec.get(key), optional=True)
    _int(f"{where}.version", rec.get("version"), optional=True)
    _num(f"{where}.duration_s", rec.get("duration_s"))
    _each(f"{where}.metrics", _dict(f"{where}.metrics", rec.get("metrics"), True), _num)
    _each(f"{where}.notes", _dict(f"{where}.notes", rec.get("notes"), True), lambda w, v: _str(w, v, True))
    _each(f"{where}.figures", _dict(f"{where}.figures", rec.get("figures"), True), _str)
    _each(f"{where}.captions", _dict(f"{where}.captions", rec.get("captions"), True), _str)
    for i, c in enumerate(_list(f"{where}.conditions", rec.get("conditions"), True)):
        c = _dict(f"{where}.conditions[{i}]", c)
        if c.get("status") not in ("pass", "warn"):
            raise _Invalid(f"{where}.conditions[{i}].status", "'pass' or 'warn'", c.get("status"))
        for key in ("name", "reason", "metric"):
            _str(f"{where}.conditions[{i}].{key}", c.get(key), optional=True)
    for tname, table in _dict(f"{where}.tables", rec.get("tables"), True).items():
        t = _dict(f"{where}.tables[{tname!r}]", table)
        _each(f"{where}.tables[{tname!r}].columns", _list(f"{where}.tables[{tname!r}].columns", t.get("columns")),
              _scalar)
        for i, row in enumerate(_list(f"{where}.tables[{tname!r}].rows", t.get("rows"))):
            _each(f"{where}.tables[{tname!r}].rows[{i}]", _list(f"{where}.tables[{tname!r}].rows[{i}]", row), _scalar)


def _model(where: str, m: Any) -> None:
    m = _dict(where, m)
    _str(f"{where}.key", m.get("key"))
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", m["key"]):
        raise _Invalid(f"{where}.key", "a file-name-safe key", m["key"])
    _str(f"{where}.name", m.get("name"))
    for key in ("architecture", "class", "source", "trained_on", "compare", "fingerprint", "dataset"):
        _str(f"{where}.{key}", m.get(key), optional=True)
    for key in ("num_parameters", "num_classes"):
        _int(f"{where}.{key}", m.get(key), optional=True)
    _each(f"{where}.metrics", _dict(f"{where}.metrics", m.get("metrics"), True), _num)
    _each(f"{where}.checks", _dict(f"{where}.checks", m.get("checks"), True), _record)


def _metric_meta(where: str, info: Any) -> None:
    info = _dict(where, info)
    if info.get("better") not in ("higher", "lower", None):
        raise _Invalid(f"{where}.better", "'higher', 'lower' or null", info.get("better"))
    for key in ("legend", "fold_into", "group", "pattern", "wildcard", "check"):
        _str(f"{where}.{key}", info.get(key), optional=True)
    fmt = info.get("note_format")
    if fmt is not None and (not isinstance(fmt, str) or not _NOTE_FORMAT.match(fmt)):
        raise _Invalid(f"{where}.note_format", "a format with one {:...} field", fmt)


def validate_results(results: Any) -> dict:
    """``results`` if it is a well-formed results.json; else a one-line TrustVisionError naming the
    first problem (e.g. ``results.json: models[0].checks['accuracy'].status must be ...``)."""
    try:
        r = _dict("the file", results)
        if "schema_version" not in r or "models" not in r:
            raise TrustVisionError("results.json is not a trustvision results file (no schema_version / models); "
                                   "rerun `trustvision audit`")
        _int("schema_version", r.get("schema_version"))
        for key in ("created", "command", "trustvision_version", "torch_version", "python_version", "device",
                    "status", "tool"):
            _str(key, r.get(key), optional=True)
        _int("seed", r.get("seed"), optional=True)
        _each("options", _dict("options", r.get("options"), True), _scalar)
        for i, c in enumerate(_list("checks", r.get("checks"), True)):
            c = _dict(f"checks[{i}]", c)
            for key in ("name", "title", "description"):
                _str(f"checks[{i}].{key}", c.get(key), optional=True)
        _each("metrics", _dict("metrics", r.get("metrics"), True), _metric_meta)
        for i, d in enumerate(_list("datasets", r.get("datasets"), True)):
            d = _dict(f"datasets[{i}]", d)
            _str(f"datasets[{i}].name", d.get("name"), optional=True)
            for key in ("num_classes", "num_channels"):
                _int(f"datasets[{i}].{key}", d.get(key), optional=True)
            _each(f"datasets[{i}].image_size", _list(f"datasets[{i}].image_size", d.get("image_size"), True), _int)
            _each(f"datasets[{i}].splits", _dict(f"datasets[{i}].splits", d.get("splits"), True), _int)
        _each("models", _list("models", r.get("models")), _model)
        for i, f in enumerate(_list("flags", r.get("flags"), True)):
            f = _dict(f"flags[{i}]", f)
            for key in ("model", "model_key", "check", "title", "name", "metric", "reason"):
                _str(f"flags[{i}].{key}", f.get(key), optional=True)
        for i, e in enumerate(_list("errors", r.get("errors"), True)):
            e = _dict(f"errors[{i}]", e)
            for key in ("model", "check", "error"):
                _str(f"errors[{i}].{key}", e.get(key), optional=True)
    except _Invalid as exc:
        raise TrustVisionError(f"results.json: {exc}; rerun `trustvision audit` to rewrite it") from None
    # optional parts an older or hand-written file may lack: what the template reads is always there
    out = dict(results)
    for key, empty in (("options", {}), ("checks", []), ("datasets", []), ("errors", []), ("metrics", {}),
                       ("flags", [])):
        if out.get(key) is None:
            out[key] = empty
    out["models"] = [{**m, "checks": m.get("checks") or {}, "metrics": m.get("metrics") or {}}
                     for m in out["models"]]
    return out
