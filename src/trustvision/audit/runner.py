"""Run audit checks over models, store each finished check, write ``results.json`` and the report.

Rerunning the same audit skips every check whose stored record has the same fingerprint, so an
interrupted audit resumes where it stopped. A check that raises is recorded as an error (in
``results.json`` and the report) and the audit goes on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from rich.markup import escape

import trustvision
from trustvision.audit.context import AuditContext, LazySplits
from trustvision.audit.registry import Check, CheckResult, default_checks, get_check, list_checks
from trustvision.audit.store import (
    ResultStore,
    atomic_write_json,
    fingerprint,
    model_fingerprint,
    safe_key,
    to_jsonable,
)
from trustvision.data._base import ImageDataset
from trustvision.errors import TrustVisionError

__all__ = ["AuditModel", "AuditResult", "run_audit", "SCHEMA_VERSION", "DEFAULT_OPTIONS", "resolve_checks"]

#: version of the results.json layout (bump on incompatible changes)
SCHEMA_VERSION = 1
#: options every audit has; checks may read more keys from ``ctx.options``
DEFAULT_OPTIONS: dict[str, Any] = {"n_max": None, "batch_size": 256, "n_bins": 15}
# options that never change a check's numbers (left out of fingerprints)
_NON_RESULT_OPTIONS = {"batch_size"}


@dataclass
class AuditModel:
    """A model to audit: display ``name``, the loaded ``model`` and where it came from (``source``)."""

    name: str
    model: torch.nn.Module
    source: str = ""


@dataclass
class AuditResult:
    """Outcome of :func:`run_audit`: paths, the results dict, and how many checks failed/ran/were reused."""

    out_dir: Path
    results_path: Path
    report_path: Path | None
    results: dict = field(repr=False)
    n_errors: int = 0
    n_computed: int = 0
    n_cached: int = 0

    @property
    def ok(self) -> bool:
        return self.n_errors == 0


def resolve_checks(names: Sequence[str] | str | None) -> list[type[Check]]:
    """Check classes for ``names`` (comma-separated string or list; ``None`` -> default checks).

    Unknown names raise a one-line :class:`TrustVisionError` naming ``trustvision audit --list-checks``.
    """
    import trustvision.audit.checks  # noqa: F401  (registers the built-in checks)

    if names is None:
        names = default_checks()
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise TrustVisionError("no checks selected; `trustvision audit --list-checks` lists the valid names")
    classes = [get_check(n) for n in dict.fromkeys(names)]
    order = {n: i for i, n in enumerate(list_checks())}
    return sorted(classes, key=lambda c: order[c.name])


def _as_audit_models(models) -> list[AuditModel]:
    if isinstance(models, Mapping):
        items = [AuditModel(str(k), v, str(k)) for k, v in models.items()]
    elif isinstance(models, torch.nn.Module):
        items = [AuditModel(type(models).__name__, models, "")]
    else:
        items = [m if isinstance(m, AuditModel) else AuditModel(str(m[0]), m[1], str(m[0])) for m in models]
    if not items:
        raise TrustVisionError("no models to audit; pass --model PATH or zoo:NAME")
    return items


def _unique_keys(names: list[str]) -> list[str]:
    keys, seen = [], {}
    for n in names:
        k = safe_key(n)
        if k in seen:
            seen[k] += 1
            k = f"{k}-{seen[k]}"
        else:
            seen[k] = 1
        keys.append(k)
    return keys


def _check_compatible(model: torch.nn.Module, ds: ImageDataset) -> None:
    from trustvision.models import check_compatible

    check_compatible(model, ds)


def _labels(ds) -> list[int]:
    if callable(getattr(ds, "tensors", None)):
        return torch.as_tensor(ds.tensors()[1]).long().flatten().tolist()
    for attr in ("labels", "targets"):
        if getattr(ds, attr, None) is not None:
            return torch.as_tensor(getattr(ds, attr)).long().flatten().tolist()
    return [int(ds[i][1]) for i in range(len(ds))]


def _dataset_info(datasets: LazySplits, name: str) -> dict:
    test = datasets["test"]
    labels = _labels(test)
    info = {
        "name": name,
        "classes": [str(c) for c in test.classes],
        "num_classes": len(test.classes),
        "image_size": list(test.image_size),
        "num_channels": int(test.num_channels),
    }
    info["fingerprint"] = fingerprint({**info, "n_test": len(test),
                                       "labels": hashlib.sha256(str(labels).encode()).hexdigest()})
    return info


def _model_info(am: AuditModel, key: str, fp: str) -> dict:
    m = am.model
    cfg = getattr(m, "tv_config", None) or {}
    return {
        "name": am.name,
        "key": key,
        "source": am.source,
        "class": type(m).__name__,
        "architecture": cfg.get("architecture", type(m).__name__),
        "num_classes": int(getattr(m, "num_classes", cfg.get("num_classes", 0)) or 0),
        "trained_on": cfg.get("dataset"),
        "training_metrics": cfg.get("metrics", {}),
        "num_parameters": int(sum(p.numel() for p in m.parameters())),
        "fingerprint": fp,
    }


def _make_progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True, log_path=False),
                    disable=not enabled, transient=False)


def _tracker(progress) -> Callable[..., Iterable]:
    def track(iterable, total: int | None = None, description: str = ""):
        task = progress.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                progress.advance(task)
        finally:
            progress.remove_task(task)

    return track


def _run_one(check: Check, ctx: AuditContext) -> tuple[dict, dict[str, bytes]]:
    from trustvision.report.figures import figure_to_png

    t0 = time.perf_counter()
    result = check.run(ctx)
    if not isinstance(result, CheckResult):
        raise TypeError(f"check {check.name!r} returned {type(result).__name__}, expected CheckResult")
    figures = {name: figure_to_png(fig) for name, fig in result.figures.items()}
    record = {
        "check": check.name,
        "status": "ok",
        "title": check.title,
        "description": check.description,
        "version": check.version,
        "summary": result.summary,
        "data": to_jsonable(result.data),
        "metrics": to_jsonable(result.metrics),
        "tables": to_jsonable(result.tables),
        "duration_s": round(time.perf_counter() - t0, 3),
        "computed_at": _now(),
    }
    return record, figures


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def run_audit(
    models,
    dataset: str | Mapping[str, ImageDataset],
    out: str | Path,
    *,
    checks: Sequence[str] | str | None = None,
    options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    seed: int = 0,
    compare: AuditModel | torch.nn.Module | None = None,
    progress: bool = True,
    command: str | None = None,
    render: bool = True,
    dataset_name: str | None = None,
) -> AuditResult:
    """Audit ``models`` on ``dataset`` with ``checks``; write ``out/results.json`` and ``out/report.html``.

    Args:
        models: ``{name: model}``, a list of :class:`AuditModel`, or a single model.
        dataset: a registered dataset name (splits loaded on demand), ``{"train"|"val"|"test": ImageDataset}``
            or a :class:`LazySplits`.
        out: output directory (created); per-check records live in ``out/checks``.
        checks: check names (list or comma-separated); ``None`` runs the default checks.
        options: overrides of :data:`DEFAULT_OPTIONS` (``n_max`` limits every split to a seeded subset).
        device: torch device for inference.
        seed: seed passed to checks (``ctx.seed``) and used for ``n_max`` subsets.
        compare: optional second model given to every check as ``ctx.compare``.
        progress: show rich progress bars on stderr.
        command: the command line, shown in the report header.
        render: also write ``report.html``.
        dataset_name: display name of the dataset (default: ``dataset`` if a name, else the test split's name).

    Returns:
        An :class:`AuditResult`; ``n_errors`` counts checks that raised (the audit still finished).

    Raises:
        TrustVisionError: unknown check, incompatible model and dataset, missing split.
    """
    check_classes = resolve_checks(checks)
    audit_models = _as_audit_models(models)
    opts = {**DEFAULT_OPTIONS, **dict(options or {})}
    out = Path(out)
    if isinstance(dataset, str):
        from trustvision import data as _data

        name = dataset
        splits = LazySplits(lambda s: _data.load(name, split=s))
    else:
        splits = dataset if isinstance(dataset, LazySplits) else LazySplits(dataset)
        name = dataset_name or getattr(splits["test"], "name", "dataset")
    ds_info = _dataset_info(splits, name)

    cmp_model = compare.model if isinstance(compare, AuditModel) else compare
    cmp_name = None
    if compare is not None:
        cmp_name = compare.name if isinstance(compare, AuditModel) else type(compare).__name__
    for am in audit_models + ([AuditModel(cmp_name, cmp_model)] if cmp_model is not None else []):
        am.model.to(device).eval()
        _check_compatible(am.model, splits["test"])
    cmp_fp = model_fingerprint(cmp_model) if cmp_model is not None else None

    store = ResultStore(out)
    out.mkdir(parents=True, exist_ok=True)
    result_opts = {k: v for k, v in opts.items() if k not in _NON_RESULT_OPTIONS}
    keys = _unique_keys([am.name for am in audit_models])
    model_records, errors = [], []
    n_computed = n_cached = 0

    with _make_progress(progress) as prog:
        overall = prog.add_task("audit", total=len(audit_models) * len(check_classes))
        for am, key in zip(audit_models, keys):
            mfp = model_fingerprint(am.model)
            info = _model_info(am, key, mfp)
            info["dataset"] = name
            info["compare"] = cmp_name
            ctx = AuditContext(model=am.model, model_name=am.name, datasets=splits, options=dict(opts),
                               device=device, seed=seed, compare=cmp_model, compare_name=cmp_name,
                               track=_tracker(prog))
            records: dict[str, dict] = {}
            for cls in check_classes:
                check = cls()
                prog.update(overall, description=escape(f"{am.name}: {check.name}"))
                base = {"check": check.name, "title": check.title, "description": check.description}
                try:
                    applies = check.applies_to(ctx)
                except Exception as exc:  # noqa: BLE001 - a broken check must not stop the audit
                    records[check.name] = _error_record(base, exc)
                    errors.append({"model": am.name, "check": check.name, "error": _format_exc(exc)})
                    prog.advance(overall)
                    continue
                if not applies:
                    reason = f"does not apply to {info['class']}"
                    records[check.name] = {**base, "status": "skipped", "reason": reason}
                    prog.advance(overall)
                    continue
                fp = fingerprint({"check": check.name, "version": check.version, "model": mfp,
                                  "dataset": ds_info["fingerprint"], "options": result_opts, "seed": seed,
                                  "compare": cmp_fp if check.uses_compare else None})
                stored = store.load(key, check.name, fp)
                if stored is not None:
                    records[check.name] = {**stored, "cached": True}
                    n_cached += 1
                    _log(prog, progress, f"[dim]reused[/] {check.name} for {escape(am.name)}")
                else:
                    try:
                        record, figures = _run_one(check, ctx)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # noqa: BLE001 - recorded, the audit goes on
                        records[check.name] = _error_record(base, exc)
                        errors.append({"model": am.name, "check": check.name, "error": _format_exc(exc)})
                        _log(prog, progress,
                             f"[red]failed[/] {check.name} for {escape(am.name)}: {escape(_format_exc(exc))}")
                    else:
                        records[check.name] = {**store.save(key, check.name, fp, record, figures), "cached": False}
                        n_computed += 1
                        _log(prog, progress, f"[green]done[/] {check.name} for {escape(am.name)} "
                                             f"({record['duration_s']:.1f}s)")
                prog.advance(overall)
            metrics: dict[str, Any] = {}
            for rec in records.values():
                if rec.get("status") == "ok":
                    metrics.update(rec.get("metrics") or {})
            model_records.append({**info, "metrics": metrics, "checks": records})

    ds_info["splits"] = {s: len(d) for s, d in splits.loaded().items()}
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "trustvision",
        "trustvision_version": trustvision.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": _now(),
        "command": command or "trustvision.audit.run_audit(...)",
        "device": str(device),
        "seed": int(seed),
        "status": "errors" if errors else "ok",
        "options": opts,
        "checks": [{"name": c.name, "title": c.title, "description": c.description, "version": c.version}
                   for c in check_classes],
        "datasets": [ds_info],
        "models": model_records,
        "errors": errors,
    }
    results_path = atomic_write_json(out / "results.json", results)
    report_path = None
    if render:
        from trustvision.report.html import render_report

        report_path = render_report(out)
    return AuditResult(out_dir=out, results_path=results_path, report_path=report_path, results=results,
                       n_errors=len(errors), n_computed=n_computed, n_cached=n_cached)


def _log(progress, enabled: bool, message: str) -> None:
    if enabled:
        progress.console.log(message, markup=True, highlight=False)


def _error_record(base: dict, exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {**base, "status": "error", "error": _format_exc(exc), "traceback": tb}


def _format_exc(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
