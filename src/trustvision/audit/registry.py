"""The check registry: one class per audit check, registered with ``@register_check(name)``.

A check declares a ``title`` and ``description`` (shown in the report), its ``options`` (name ->
:class:`Option`: type, default, help; set with ``--option CHECK.KEY=VALUE`` or
``audit.run(options={"CHECK.KEY": value})`` and read with ``ctx.option(KEY)``), its headline
``metrics`` (name -> :class:`Metric`: which direction is better and the legend of the report's
summary table), optionally ``applies_to(ctx)`` (e.g. only for generative classifiers), and
implements ``run(ctx)`` returning a :class:`CheckResult`. Bump ``version`` when the check's output
changes, so stored results of older versions are recomputed.

Example (a new check is one file in ``trustvision/audit/checks/``; every module there is imported)::

    from trustvision.audit import Check, CheckResult, register_check

    @register_check("mean-confidence")
    class MeanConfidence(Check):
        title = "Mean confidence"
        options = {"split": Option(str, "test", "split to score", choices=("val", "test"))}
        metrics = {"Mean confidence": Metric("higher", "mean top-1 probability.")}
        def run(self, ctx):
            probs, _ = ctx.predict(ctx.option("split"))
            m = float(probs.max(1).values.mean())
            return CheckResult(data={"mean": m}, metrics={"Mean confidence": m})
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from trustvision._utils.registry import Registry
from trustvision.errors import TrustVisionError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from trustvision.audit.context import AuditContext

__all__ = [
    "Check", "CheckResult", "Option", "Metric", "Condition", "register_check", "get_check", "list_checks",
    "default_checks", "resolve_check_options", "evaluate_conditions",
]

_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list"}


@dataclass(frozen=True)
class Option:
    """One declared option of a check: ``type`` (int, float, str, bool or list = a list of
    strings, comma-separated on the command line), ``default``, ``help``; optional ``choices``
    (allowed values; for lists, allowed items) and ``min`` / ``max`` bounds for numbers.
    ``affects_results=False`` keeps it out of the stored result's fingerprint. ``default`` and
    ``choices`` may be zero-argument callables, read when the audit runs (e.g. every method of
    a registry, including those registered after the check)."""

    type: type
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    affects_results: bool = True

    def resolved_default(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def resolved_choices(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type, getattr(self.type, "__name__", str(self.type)))

    def parse(self, value: Any, where: str) -> Any:
        """``value`` (a command-line string or a Python value) converted and validated."""
        t = self.type
        try:
            if t is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    out: Any = low in ("1", "true", "yes", "on")
                elif isinstance(value, (bool, int)):
                    out = bool(value)
                else:
                    raise ValueError
            elif t is list:
                if isinstance(value, str):
                    out = [v.strip() for v in value.split(",") if v.strip()]
                elif isinstance(value, (list, tuple)):
                    out = [str(v) for v in value]
                else:
                    raise ValueError
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if not math.isfinite(out):
                    raise ValueError
            else:
                out = t(value)
        except (TypeError, ValueError):
            raise TrustVisionError(f"option {where} takes a {self.type_name}, got {value!r}") from None
        choices = self.resolved_choices()
        if choices is not None:
            bad = [v for v in (out if t is list else [out]) if v not in choices]
            if bad:
                raise TrustVisionError(f"option {where} does not accept {bad[0]!r}; use "
                                       f"{', '.join(map(str, choices))}")
        if self.min is not None and t in (int, float) and out < self.min:
            raise TrustVisionError(f"option {where} must be >= {self.min}, got {out}")
        if self.max is not None and t in (int, float) and out > self.max:
            raise TrustVisionError(f"option {where} must be <= {self.max}, got {out}")
        return out

    def describe(self) -> dict:
        d = {"type": self.type_name, "default": self.resolved_default(), "help": self.help}
        choices = self.resolved_choices()
        if choices is not None:
            d["choices"] = list(choices)
        return d


@dataclass(frozen=True)
class Condition:
    """A condition on a check's result (Deepchecks' "conditions"): ``test(metrics, data)`` returns
    None when it passes, or the reason it warns (one sentence, shown in the report's flag list and
    on the flagged cell). ``metric``: the headline metric the flag colours in the summary table.

    Example: ``Condition("ECE worse after scaling", lambda m, d: "..." if m["ECE after TS"] >
    m["ECE"] else None, metric="ECE after TS")``.
    """

    name: str
    test: "Any"
    metric: str | None = None


@dataclass(frozen=True)
class Metric:
    """A headline number of a check, shown in the report's summary table.

    ``better``: "higher", "lower" or None; ``legend``: what the number is (may use ``{option}``
    placeholders filled from the audit and check options, and the wildcard of a patterned name,
    e.g. ``"Insertion AUC ({method})"`` declares every ``Insertion AUC (<method>)`` key).
    ``fold_into``: show the value small under another metric's cell instead of in a column of its
    own, formatted with ``note_format`` (e.g. the fitted temperature under "ECE after TS").
    ``group``: metrics of one group share one legend entry (their wildcard values joined).
    """

    better: str | None
    legend: str
    fold_into: str | None = None
    note_format: str = "{:.4g}"
    group: str | None = None

    def __post_init__(self):
        if self.better not in ("higher", "lower", None):
            raise ValueError(f"Metric.better must be 'higher', 'lower' or None, got {self.better!r}")


@dataclass
class CheckResult:
    """What a check returns.

    Attributes:
        data: JSON-serialisable dict with every number the check measured (tensors, numpy arrays and
            NaN are converted when stored: arrays to lists, NaN to null).
        figures: name -> matplotlib Figure; stored as PNG and embedded in the report.
        summary: one or two sentences for the report.
        metrics: headline numbers for the report's summary table (label -> float), e.g.
            ``{"Accuracy": 0.98}``; each label is declared in the check's ``metrics``.
        notes: label -> a short text shown under that metric's value (e.g. the OOD detector used).
        captions: figure name -> its caption for people (e.g. "SAG of test image 44: true 8,
            predicted 8, p = 0.97"); figures without one get their name.
        tables: name -> ``{"columns": [...], "rows": [[...], ...]}`` rendered as HTML tables.
    """

    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, "Figure"] = field(default_factory=dict)
    summary: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)


class Check:
    """Base class of audit checks; subclasses set ``title``/``description`` and implement ``run``."""

    #: registry name; set by :func:`register_check`
    name: str = ""
    title: str = ""
    description: str = ""
    #: bump to invalidate stored results of this check
    version: int = 1
    #: run when the user does not pass ``--checks``
    default: bool = True
    #: the check reads ``ctx.compare``; its stored results then depend on the compared model too
    uses_compare: bool = False
    #: position in the report and run order (smaller first)
    order: int = 100
    #: declared options: name -> Option (read them in ``run`` with ``ctx.option(name)``)
    options: dict[str, Option] = {}
    #: declared headline metrics: name (or pattern with one ``{wildcard}``) -> Metric
    metrics: dict[str, Metric] = {}
    #: conditions on the result, each pass or warn with a reason (see :class:`Condition`)
    conditions: tuple[Condition, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, "_fills_options", False):

            @functools.wraps(run)
            def run_with_defaults(self, ctx):
                # options not given (e.g. a context built by hand) take their declared defaults
                declared = type(self).options
                missing = {k: o.resolved_default() for k, o in declared.items() if k not in ctx.check_options}
                if missing:
                    ctx.check_options = {**missing, **ctx.check_options}
                return run(self, ctx)

            run_with_defaults._fills_options = True  # type: ignore[attr-defined]
            cls.run = run_with_defaults

    @classmethod
    def metric_info(cls, key: str, values: Mapping[str, Any] | None = None) -> dict | None:
        """The declared :class:`Metric` of the emitted metric ``key`` as a JSON-ready dict with its
        legend filled in (``values``: option values for ``{placeholders}``); None if undeclared."""
        for name, m in cls.metrics.items():
            wild = None
            if name == key:
                match = True
            else:
                parts = re.split(r"\{(\w+)\}", name)
                if len(parts) != 3:
                    continue
                found = re.fullmatch(re.escape(parts[0]) + "(.+)" + re.escape(parts[2]), key)
                match = found is not None
                if match:
                    wild = {parts[1]: found.group(1)}
            if not match:
                continue
            fill = {**(values or {}), **(wild or {})}
            try:
                legend = m.legend.format(**fill)
            except (KeyError, IndexError, ValueError):
                legend = m.legend
            return {"better": m.better, "legend": legend, "fold_into": m.fold_into,
                    "note_format": m.note_format, "group": m.group, "pattern": name,
                    "wildcard": next(iter(wild.values())) if wild else None, "check": cls.name}
        return None

    @classmethod
    def describe(cls) -> dict:
        """The check's metadata for results.json and ``--list-checks``."""
        return {"name": cls.name, "title": cls.title, "description": cls.description,
                "version": cls.version, "default": cls.default,
                "options": {k: o.describe() for k, o in cls.options.items()},
                "metrics": {k: {"better": m.better, "legend": m.legend} for k, m in cls.metrics.items()}}

    def applies_to(self, ctx: "AuditContext") -> bool:
        """Whether the check makes sense for ``ctx.model`` (non-applicable checks are skipped)."""
        return True

    def run(self, ctx: "AuditContext") -> CheckResult:  # pragma: no cover - abstract
        raise NotImplementedError


_CHECKS: Registry[type[Check]] = Registry("check", "`trustvision audit --list-checks`")


def register_check(name: str):
    """Class decorator registering a :class:`Check` subclass under ``name``."""

    def deco(cls: type[Check]) -> type[Check]:
        if not (isinstance(cls, type) and issubclass(cls, Check)):
            raise TypeError("@register_check decorates subclasses of trustvision.audit.Check")
        cls.name = name
        if not cls.title:
            cls.title = name
        _CHECKS.add(name, cls)
        return cls

    return deco


def get_check(name: str) -> type[Check]:
    """The check class registered as ``name`` (unknown names raise a one-line TrustVisionError)."""
    return _CHECKS.get(name)


def list_checks() -> list[str]:
    """All registered check names, in run order."""
    return sorted(_CHECKS.names(), key=lambda n: (_CHECKS.get(n).order, n))


def default_checks() -> list[str]:
    """Checks run when none are requested explicitly, in run order."""
    return [n for n in list_checks() if _CHECKS.get(n).default]


def resolve_check_options(
    classes: list[type[Check]], overrides: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Per check, its declared options' values: defaults updated by ``overrides``.

    ``overrides`` maps ``"check.key"`` (or ``check -> {key: value}``) to values, parsed and
    validated by each :class:`Option`; a key naming an unknown check or an undeclared option is a
    one-line :class:`TrustVisionError` (naming the valid ones). Overrides of checks that are
    registered but not selected are validated and otherwise ignored.
    """
    flat: dict[tuple[str, str], Any] = {}
    for k, v in (overrides or {}).items():
        if isinstance(v, Mapping):
            for kk, vv in v.items():
                flat[(str(k), str(kk))] = vv
            continue
        check, sep, key = str(k).partition(".")
        if not sep or not check or not key:
            raise TrustVisionError(f"option {k!r} must be CHECK.KEY=VALUE, e.g. explanations.n=4")
        flat[(check, key)] = v
    out = {c.name: {k: o.resolved_default() for k, o in c.options.items()} for c in classes}
    for (check, key), value in flat.items():
        cls = get_check(check)
        if key not in cls.options:
            valid = ", ".join(sorted(cls.options)) or "none"
            raise TrustVisionError(f"check {check!r} has no option {key!r} (its options: {valid}); "
                                   "`trustvision audit --list-checks` lists them")
        parsed = cls.options[key].parse(value, f"{check}.{key}")
        if check in out:
            out[check][key] = parsed
    return out


def evaluate_conditions(check: type[Check], metrics: Mapping[str, Any], data: Mapping[str, Any]) -> list[dict]:
    """Each declared condition of ``check`` on a result: ``{"name", "status": "pass"|"warn",
    "reason", "metric"}``. A condition that cannot be evaluated (missing key) passes silently."""
    out = []
    for cond in check.conditions:
        try:
            reason = cond.test(metrics, data)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            reason = None
        out.append({"name": cond.name, "status": "warn" if reason else "pass",
                    "reason": " ".join(str(reason).split()) if reason else None, "metric": cond.metric})
    return out
