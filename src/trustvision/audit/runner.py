"""Run audit checks over models, store each finished check, write ``results.json`` and the report.

:func:`run` is the Python entry point (``trustvision.audit.run(model, dataset)``): it takes
``nn.Module`` s and torch ``Dataset`` s / ``DataLoader`` s as Captum, Quantus and Deepchecks users
have them, returns the results as Python objects and writes files only when ``out`` is given.
``trustvision audit`` is a thin layer over it. Rerunning the same audit into the same ``out``
skips every check whose stored record has the same fingerprint, so an interrupted audit resumes
where it stopped. A check that raises is recorded as an error (in ``results.json`` and the
report) and the audit goes on.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> from trustvision import audit
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(40, 1, 4, 4, generator=g)
    >>> y = (x.mean((1, 2, 3)) > 0.5).long()
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    >>> res = audit.run(net, TensorDataset(x, y), checks="accuracy,calibration")
    >>> sorted(res.metrics[res.model_names[0]])
    ['Accuracy', 'ECE', 'ECE after TS', 'Temperature']
"""

from __future__ import annotations

import contextlib

import datetime as _dt
import hashlib
import math
import platform
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

import trustvision
from trustvision.audit.context import AuditContext, LazySplits
from trustvision.audit.registry import (
    Check,
    CheckResult,
    default_checks,
    evaluate_conditions,
    get_check,
    list_checks,
    resolve_check_options,
)
from trustvision._utils.io import ensure_writable_dir, remove_stale_temp_files
from trustvision._utils.progress import bar_tracker, progress_bar
from trustvision.audit.store import (
    MemoryStore,
    ResultStore,
    atomic_write_json,
    fingerprint,
    model_fingerprint,
    safe_key,
    to_jsonable,
)
from trustvision.data import ImageDataset
from trustvision.errors import TrustVisionError

__all__ = [
    "AuditModel", "AuditResult", "run", "run_audit", "SCHEMA_VERSION", "DEFAULT_OPTIONS",
    "resolve_checks", "split_options",
]

#: version of the results.json layout (bump on incompatible changes)
SCHEMA_VERSION = 1
#: options every audit has; each check declares its own (``Check.options``, keys ``check.key``)
DEFAULT_OPTIONS: dict[str, Any] = {"n_max": None, "batch_size": 256, "n_bins": 15, "num_workers": 0}
# options that never change a check's numbers (left out of fingerprints); the batch size is not
# among them: batched float arithmetic differs in the last digits between batch sizes
#: audit options that change how, not what, is computed (left out of the checks' fingerprints)
_NON_RESULT_OPTIONS: set[str] = {"num_workers"}


@dataclass
class AuditModel:
    """A model to audit: display ``name``, the loaded ``model`` and where it came from (``source``)."""

    name: str
    model: torch.nn.Module
    source: str = ""


@dataclass
class AuditResult:
    """Outcome of :func:`run`: the results (the content of ``results.json``) as Python objects,
    the figures, where files were written (``None`` without ``out``) and how many checks
    failed / ran / were reused.

    ``metrics``: model name -> {metric: value}; ``records(model)``: check name -> record (status,
    data, tables, summary, ...); ``figure(model, check, name)``: the PNG bytes of one figure.
    """

    out_dir: Path | None
    results_path: Path | None
    report_path: Path | None
    results: dict = field(repr=False)
    n_errors: int = 0
    n_computed: int = 0
    n_cached: int = 0
    figures: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.results["models"]]

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: dict(m["metrics"]) for m in self.results["models"]}

    def _model(self, model: str) -> dict:
        for m in self.results["models"]:
            if model in (m["name"], m["key"]):
                return m
        raise TrustVisionError(f"no model {model!r} in this audit; it has {', '.join(self.model_names)}")

    def records(self, model: str | None = None) -> dict[str, dict]:
        """Check name -> record of ``model`` (name or key; default: the only / first model)."""
        m = self._model(model) if model is not None else self.results["models"][0]
        return m["checks"]

    @property
    def flags(self) -> list[dict]:
        """The conditions that warn: ``{"model", "check", "name", "metric", "reason"}`` each."""
        return list(self.results.get("flags") or [])

    def summary_csv(self) -> str:
        """The summary table as CSV (what ``summary.csv`` holds)."""
        from trustvision.report.html import summary_csv

        return summary_csv(self.results)

    def _repr_html_(self) -> str:
        """The summary table and the flags, for a notebook's rich display."""
        from trustvision.report.html import summary_html

        return summary_html(self.results)

    def figure(self, model: str, check: str, name: str) -> bytes:
        """PNG bytes of figure ``name`` of ``check`` for ``model``."""
        m = self._model(model)
        figs = self.figures.get((m["key"], check), {})
        if name in figs:
            return figs[name]
        rel = (m["checks"].get(check, {}).get("figures") or {}).get(name)
        if rel is None or self.out_dir is None:
            raise KeyError((model, check, name))
        return (self.out_dir / rel).read_bytes()


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


def _dataset_info(datasets: LazySplits, name: str) -> dict:
    test = datasets["test"]
    labels = getattr(test, "labels", None)
    labels = torch.as_tensor(labels if labels is not None else test.tensors()[1]).long().flatten().tolist()
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


def _split_sizes(splits: LazySplits) -> dict[str, int]:
    """Size of every split the data has (also those no check needed this time, e.g. on a rerun
    that reused every stored check)."""
    sizes = {}
    for s in splits:
        try:
            sizes[s] = len(splits[s])
        except TrustVisionError:
            continue  # a registered dataset without this split
    return sizes


def _non_finite_metrics(metrics: Mapping[str, Any]) -> list[str]:
    bad = []
    for k, v in metrics.items():
        try:
            if v is not None and not math.isfinite(float(v)):
                bad.append(k)
        except (TypeError, ValueError):
            bad.append(k)
    return bad


def _metric_info(check: type[Check], keys, values: Mapping[str, Any]) -> dict[str, dict]:
    """The declared metadata of every metric ``check`` emitted (undeclared ones get a neutral entry)."""
    out = {}
    for key in keys:
        info = check.metric_info(key, values)
        if info is None:
            info = {"better": None, "legend": f"headline number of the {check.title or check.name} check "
                                              "(see its section below).",
                    "fold_into": None, "note_format": "{:.4g}", "group": None, "pattern": key,
                    "wildcard": None, "check": check.name}
        out[key] = info
    return out


def _run_one(check: Check, ctx: AuditContext, values: Mapping[str, Any]) -> tuple[dict, dict[str, bytes]]:
    from trustvision.report.figures import figure_to_png

    from trustvision.data.loading import loader_options

    t0 = time.perf_counter()
    with loader_options(num_workers=int(ctx.options.get("num_workers") or 0)):
        result = check.run(ctx)
    if not isinstance(result, CheckResult):
        raise TypeError(f"check {check.name!r} returned {type(result).__name__}, expected CheckResult")
    bad = _non_finite_metrics(result.metrics)
    if bad:
        raise ValueError(f"the check's headline numbers are not finite ({', '.join(bad)}): the model's outputs "
                         "are probably NaN or infinite")
    figures = {name: figure_to_png(fig) for name, fig in result.figures.items()}
    record = {
        "check": check.name,
        "status": "ok",
        "title": check.title,
        "description": check.description,
        "version": check.version,
        "options": to_jsonable(ctx.check_options),
        "summary": result.summary,
        "data": to_jsonable(result.data),
        "metrics": to_jsonable(result.metrics),
        "metric_info": _metric_info(type(check), result.metrics, values),
        "notes": to_jsonable(result.notes),
        "captions": {str(k): str(v) for k, v in result.captions.items()},
        "tables": to_jsonable(result.tables),
        "conditions": evaluate_conditions(type(check), to_jsonable(result.metrics), to_jsonable(result.data)),
        "duration_s": round(time.perf_counter() - t0, 3),
        "computed_at": _now(),
    }
    return record, figures


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` -> (audit options, check options).

    Keys of :data:`DEFAULT_OPTIONS` are audit options; ``"check.key"`` keys and ``check ->
    {key: value}`` mappings are check options (validated later by the checks' declarations).
    Anything else is a one-line :class:`TrustVisionError`.
    """
    audit_opts, check_opts = {}, {}
    for k, v in (options or {}).items():
        k = str(k)
        if k in DEFAULT_OPTIONS:
            audit_opts[k] = v
        elif "." in k or isinstance(v, Mapping):
            check_opts[k] = v
        else:
            raise TrustVisionError(
                f"unknown audit option {k!r}; audit options are {', '.join(DEFAULT_OPTIONS)}, check options "
                "are CHECK.KEY (e.g. explanations.n; `trustvision audit --list-checks` lists them)")
    n_max = audit_opts.get("n_max")
    if n_max is not None and (isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1):
        raise TrustVisionError(f"n_max must be a positive integer or None, got {n_max!r}")
    for key, lo, hi in (("batch_size", 1, 1_000_000), ("n_bins", 1, 1000), ("num_workers", 0, 256)):
        v = audit_opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise TrustVisionError(f"{key} must be an integer from {lo} to {hi}, got {v!r}")
    return audit_opts, check_opts


def _as_splits(data, classes, name: str | None) -> tuple[LazySplits, str]:
    """A registered name, ``{split: dataset}``, a LazySplits or one dataset (the test split)."""
    if isinstance(data, str):
        from trustvision import data as _data

        ds_name = data
        return LazySplits(lambda s: _data.load(ds_name, split=s)), ds_name
    if isinstance(data, LazySplits):
        return data, name or getattr(data["test"], "name", "dataset")
    from trustvision.data import SPLITS, as_image_dataset

    if isinstance(data, Mapping):
        unknown = [k for k in data if k not in SPLITS]
        if unknown:
            raise TrustVisionError(f"unknown split {unknown[0]!r}; give a mapping of {', '.join(SPLITS)}")
        if "test" not in data:
            raise TrustVisionError("the data has no 'test' split; give {'test': dataset, ...} or one dataset")
        splits = {s: as_image_dataset(d, classes=classes, name=name, split=s) for s, d in data.items()}
    else:
        splits = {"test": as_image_dataset(data, classes=classes, name=name, split="test")}
    return LazySplits(splits), name or getattr(splits["test"], "name", None) or "dataset"


def _as_model(obj, key: str | None, splits: LazySplits, wrap_kw: dict) -> AuditModel:
    from trustvision import models as _models

    if isinstance(obj, AuditModel):
        return obj
    if isinstance(obj, str):
        return AuditModel(key or obj, _models.load(obj), obj)
    if isinstance(obj, torch.nn.Module):
        label = key or type(obj).__name__
        if not isinstance(obj, _models.ImageClassifier):
            example = splits["test"].subset(list(range(min(2, len(splits["test"]))))).tensors()[0]
            obj = _models.wrap(obj, example=example, **wrap_kw)
        return AuditModel(label, obj, "")
    raise TrustVisionError(f"cannot audit a {type(obj).__name__}; pass an nn.Module, a checkpoint path or zoo:NAME")


def _as_models(models, splits: LazySplits, wrap_kw: dict) -> list[AuditModel]:
    if isinstance(models, Mapping):
        items = [_as_model(v, str(k), splits, wrap_kw) for k, v in models.items()]
    elif isinstance(models, (torch.nn.Module, str, AuditModel)) or not isinstance(models, (list, tuple)):
        items = [_as_model(models, None, splits, wrap_kw)]
    else:
        items = []
        for m in models:
            if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str):
                items.append(_as_model(m[1], m[0], splits, wrap_kw))
            else:
                items.append(_as_model(m, None, splits, wrap_kw))
    if not items:
        raise TrustVisionError("no models to audit; pass --model PATH or zoo:NAME")
    return items


def run(
    models,
    data,
    checks: Sequence[str] | str | None = None,
    options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    *,
    seed: int = 0,
    compare=None,
    progress: bool | str = False,
    command: str | None = None,
    render: bool = True,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset_name: str | None = None,
    ray: str | None = None,
    ray_workers: int | None = None,
    ray_gpus_per_worker: float = 0.0,
) -> AuditResult:
    """Audit ``models`` on ``data`` with ``checks``; results as Python objects, files only with ``out``.

    Args:
        models: an ``nn.Module`` (a trustvision model, or any module taking [0, 1] images and
            returning logits: it is wrapped with :func:`trustvision.models.wrap`, ``num_classes``
            inferred from one forward pass unless given, ``mean``/``std`` applied inside when
            given), a checkpoint path or ``zoo:NAME``, a list of these or of ``(name, model)``
            pairs, or ``{name: model}``.
        data: a registered dataset name (splits loaded on demand), one dataset (used as the test
            split: an ``ImageDataset``, a torch ``Dataset`` of (image, label) pairs such as a
            ``TensorDataset``, a ``DataLoader`` or an ``(images, labels)`` tuple; images float
            (N, C, H, W) in [0, 1]), or ``{"train"|"val"|"test": dataset}``.
        checks: check names (list or comma-separated); ``None`` runs the default checks.
        options: audit options (``n_max``: a seeded subset of each split, ``batch_size``,
            ``n_bins``, ``num_workers``: DataLoader processes decoding streamed splits, default 0,
            left out of the fingerprints) and check options as ``"check.key": value`` (or ``check: {key: value}``);
            unknown keys are one-line errors.
        out: output directory: per-check records in ``out/checks`` (an audit into the same folder
            resumes), ``out/results.json`` and ``out/report.html``. ``None``: nothing is written.
        device: torch device for inference.
        seed: seed passed to checks (``ctx.seed``) and used for ``n_max`` subsets.
        compare: an optional second model given to every check as ``ctx.compare``.
        progress: True: rich progress bars with ETAs on stderr; "lines": one plain stderr line per
            finished unit (check, explanation method; what ``--no-progress`` gives); False: silent.
        command: the command line recorded in results.json and shown in the report.
        render: write ``report.html`` (only with ``out``).
        classes: class names when ``data`` carries none.
        dataset_name: display name of the dataset.
        ray: "auto" or a Ray cluster address: per-image explanation work runs on ``ray_workers``
            Ray actors (``ray_gpus_per_worker`` GPUs each) that load each model from its
            checkpoint path or zoo name (:mod:`trustvision.audit.distributed`); the results are
            those of the single-process run.

    Returns:
        An :class:`AuditResult`; ``n_errors`` counts checks that raised (the audit still finished).

    Raises:
        TrustVisionError: unknown check or option, incompatible model and dataset, missing split,
            bad data (images outside [0, 1], wrong shape).
    """
    check_classes = resolve_checks(checks)
    audit_opts, check_opt_overrides = split_options(options)
    check_opts = resolve_check_options(check_classes, check_opt_overrides)
    opts = {**DEFAULT_OPTIONS, **audit_opts}
    splits, name = _as_splits(data, classes, dataset_name)
    wrap_kw = {"num_classes": num_classes, "mean": mean, "std": std}
    audit_models = _as_models(models, splits, wrap_kw)
    ds_info = _dataset_info(splits, name)

    cmp = None if compare is None else _as_model(compare, None, splits, wrap_kw)
    cmp_model = cmp.model if cmp is not None else None
    cmp_name = cmp.name if cmp is not None else None
    for am in audit_models + ([cmp] if cmp is not None else []):
        am.model.to(device).eval()
        _check_compatible(am.model, splits["test"])
    cmp_fp = model_fingerprint(cmp_model) if cmp_model is not None else None

    if out is not None:
        out = ensure_writable_dir(out, "out")
        remove_stale_temp_files(out)  # left by a process killed between writing and renaming
        store: ResultStore | MemoryStore = ResultStore(out)
    else:
        store = MemoryStore()
    result_opts = {k: v for k, v in opts.items() if k not in _NON_RESULT_OPTIONS}

    def check_fp(cls: type[Check], values: Mapping[str, Any], mfp: str) -> str:
        fp_opts = {k: v for k, v in values.items() if k in cls.options and cls.options[k].affects_results}
        return fingerprint({"check": cls.name, "version": cls.version, "model": mfp,
                            "dataset": ds_info["fingerprint"], "options": result_opts,
                            "check_options": fp_opts, "seed": seed,
                            "compare": cmp_fp if cls.uses_compare else None})

    selected = {c.name for c in check_classes}
    kept_classes, kept_opts, kept_used = [], {}, set()
    if out is not None:
        for name in list_checks():
            if name in selected:
                continue
            cls = get_check(name)
            try:
                kept_opts[name] = resolve_check_options([cls], check_opt_overrides)[name]
            except TrustVisionError:
                continue
            kept_classes.append(cls)
    keys = _unique_keys([am.name for am in audit_models])
    model_records, errors = [], []
    n_computed = n_cached = 0
    all_figures: dict[tuple[str, str], dict[str, bytes]] = {}

    ray_started = False
    if ray:  # connect and check the cluster before any progress is shown (bad input: one line)
        from trustvision.audit.distributed import connect, require_ray

        ray_started = not require_ray().is_initialized()
        connect(ray, ray_workers, ray_gpus_per_worker, [am.source for am in audit_models])
    with progress_bar(progress) as prog, _ray_session(ray_started):
        overall = prog.add_task("audit", total=len(audit_models) * len(check_classes))
        for am, key in zip(audit_models, keys):
            mfp = model_fingerprint(am.model)
            info = _model_info(am, key, mfp)
            info["dataset"] = name
            info["compare"] = cmp_name
            ctx = AuditContext(model=am.model, model_name=am.name, datasets=splits, options=dict(opts),
                               device=device, seed=seed, compare=cmp_model, compare_name=cmp_name,
                               track=bar_tracker(prog, indent="  "),
                               scratch_root=None if out is None else out / "scratch" / key,
                               log=lambda msg, _name=am.name: _log(prog, progress, f"  {escape(_name)}: {escape(msg)}"))
            records: dict[str, dict] = {}
            pool = None
            if ray:
                from trustvision.audit.distributed import RayPool

                pool = RayPool(am.source, ray, ray_workers, ray_gpus_per_worker)
                ctx.executor = pool  # its map() runs the checks' units
            for cls in check_classes:
                check = cls()
                ctx.check_options = dict(check_opts[cls.name])
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
                fp = check_fp(cls, ctx.check_options, mfp)
                stored = store.load(key, check.name, fp)
                if stored is not None:
                    records[check.name] = {**stored, "cached": True}
                    n_cached += 1
                    _log(prog, progress, f"[dim]reused[/] {check.name} for {escape(am.name)}")
                else:
                    try:
                        record, figures = _run_one(check, ctx, {**opts, **ctx.check_options})
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # noqa: BLE001 - recorded, the audit goes on
                        records[check.name] = _error_record(base, exc)
                        errors.append({"model": am.name, "check": check.name, "error": _format_exc(exc)})
                        _log(prog, progress,
                             f"[red]failed[/] {check.name} for {escape(am.name)}: {escape(_format_exc(exc))}")
                    else:
                        records[check.name] = {**store.save(key, check.name, fp, record, figures), "cached": False}
                        if isinstance(store, MemoryStore):
                            all_figures[(key, check.name)] = figures
                        n_computed += 1
                        _log(prog, progress, f"[green]done[/] {check.name} for {escape(am.name)} "
                                             f"({record['duration_s']:.1f}s)")
                prog.advance(overall)
            if pool is not None:
                pool.close()
            # checks stored in `out` by an earlier audit of the same model, data and options but not
            # selected this time are kept (a rerun with --checks accuracy does not drop the others)
            for cls in kept_classes:
                stored = store.load(key, cls.name, check_fp(cls, kept_opts[cls.name], mfp))
                if stored is not None:
                    records[cls.name] = {**stored, "cached": True, "kept": True}
                    kept_used.add(cls.name)
            order = {n: i for i, n in enumerate(list_checks())}
            records = dict(sorted(records.items(), key=lambda kv: order.get(kv[0], len(order))))
            metrics: dict[str, Any] = {}
            for rec in records.values():
                if rec.get("status") == "ok":
                    metrics.update(rec.get("metrics") or {})
            model_records.append({**info, "metrics": metrics, "checks": records})

    flags = [{"model": m["name"], "model_key": m["key"], "check": name, "title": rec.get("title") or name,
              "name": c.get("name"), "metric": c.get("metric"), "reason": c.get("reason")}
             for m in model_records for name, rec in m["checks"].items() if rec.get("status") == "ok"
             for c in rec.get("conditions") or [] if c.get("status") == "warn"]
    metric_meta: dict[str, dict] = {}
    for m in model_records:
        for rec in m["checks"].values():
            if rec.get("status") == "ok":
                for k, v in (rec.get("metric_info") or {}).items():
                    metric_meta.setdefault(k, v)
    ds_info["splits"] = _split_sizes(splits)
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "trustvision",
        "trustvision_version": trustvision.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": _now(),
        "command": command or "trustvision.audit.run(...)",
        "device": str(device),
        "seed": int(seed),
        "status": "errors" if errors else "ok",
        "options": opts,
        "checks": [{**c.describe(), "options": to_jsonable({**kept_opts, **check_opts}[c.name]),
                    "option_types": {k: o.describe() for k, o in c.options.items()},
                    **({"kept": True} if c.name not in selected else {})}
                   for c in sorted(check_classes + [k for k in kept_classes if k.name in kept_used],
                                   key=lambda c: list_checks().index(c.name))],
        "metrics": metric_meta,
        "datasets": [ds_info],
        "models": model_records,
        "flags": flags,
        "errors": errors,
    }
    results = to_jsonable(results)
    results_path = report_path = None
    if out is not None:
        results_path = atomic_write_json(out / "results.json", results)
        if render:
            from trustvision.report.html import render_report

            report_path = render_report(out)
    return AuditResult(out_dir=out, results_path=results_path, report_path=report_path, results=results,
                       n_errors=len(errors), n_computed=n_computed, n_cached=n_cached, figures=all_figures)


def run_audit(models, dataset, out: str | Path | None, **kw) -> AuditResult:
    """:func:`run` with the output folder as third argument (``run_audit(models, data, out, ...)``)."""
    progress = kw.pop("progress", True)
    return run(models, dataset, out=out, progress=progress, **kw)


def _log(progress, enabled: bool | str, message: str) -> None:
    """A finished unit (check, method): on the progress console, as a plain stderr line in
    ``"lines"`` mode (``--no-progress``), or nowhere."""
    if enabled is True:
        progress.console.log(message, markup=True, highlight=False)
    elif enabled == "lines":
        from rich.text import Text

        print(Text.from_markup(message).plain, file=sys.stderr, flush=True)


def _error_record(base: dict, exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {**base, "status": "error", "error": _format_exc(exc), "traceback": tb}


@contextlib.contextmanager
def _ray_session(started: bool):
    """Shut down the Ray session this audit started (a cluster it joined is left running)."""
    try:
        yield
    finally:
        if started:
            from trustvision.audit.distributed import require_ray

            require_ray().shutdown()


def _format_exc(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
