"""Audits: registered checks run over models, results stored per check, one HTML report.

The entry point is :func:`run` (``trustvision.audit.run(model, dataset, out="report")``).

Example:
    >>> from trustvision.audit import list_checks
    >>> list_checks()[:2]
    ['accuracy', 'calibration']

A new check is one file in ``trustvision/audit/checks/`` (see :mod:`trustvision.audit.registry`).
"""

from trustvision.audit.context import AuditContext, LazySplits
from trustvision.audit.registry import (
    Check,
    CheckResult,
    Metric,
    Option,
    default_checks,
    get_check,
    list_checks,
    register_check,
)
from trustvision.audit.runner import SCHEMA_VERSION, AuditModel, AuditResult, resolve_checks, run, run_audit
from trustvision.audit.store import ResultStore

from trustvision.audit import checks as _checks  # noqa: E402,F401,I001  (registers the built-in checks)

__all__ = [
    "AuditContext",
    "AuditModel",
    "AuditResult",
    "Check",
    "CheckResult",
    "LazySplits",
    "Metric",
    "Option",
    "ResultStore",
    "SCHEMA_VERSION",
    "default_checks",
    "get_check",
    "list_checks",
    "register_check",
    "resolve_checks",
    "run",
    "run_audit",
]
