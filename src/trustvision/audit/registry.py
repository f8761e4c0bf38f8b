"""The check registry: one class per audit check, registered with ``@register_check(name)``.

A check declares a ``title`` and ``description`` (shown in the report), optionally
``applies_to(ctx)`` (e.g. only for generative classifiers), and implements ``run(ctx)`` returning a
:class:`CheckResult`. Bump ``version`` when the check's output changes, so stored results of older
versions are recomputed.

Example (a new check is one file in ``trustvision/audit/checks/``; every module there is imported)::

    from trustvision.audit import Check, CheckResult, register_check

    @register_check("mean-confidence")
    class MeanConfidence(Check):
        title = "Mean confidence"
        def run(self, ctx):
            probs, _ = ctx.predict("test")
            return CheckResult(data={"mean": float(probs.max(1).values.mean())})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trustvision._registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from trustvision.audit.context import AuditContext

__all__ = ["Check", "CheckResult", "register_check", "get_check", "list_checks", "default_checks"]


@dataclass
class CheckResult:
    """What a check returns.

    Attributes:
        data: JSON-serialisable dict with every number the check measured (tensors, numpy arrays and
            NaN are converted when stored: arrays to lists, NaN to null).
        figures: name -> matplotlib Figure; stored as PNG and embedded in the report.
        summary: one or two sentences for the report.
        metrics: headline numbers for the report's summary table (label -> float), e.g.
            ``{"Accuracy": 0.98}``.
        tables: name -> ``{"columns": [...], "rows": [[...], ...]}`` rendered as HTML tables.
    """

    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, "Figure"] = field(default_factory=dict)
    summary: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)


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
