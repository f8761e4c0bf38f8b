"""The results store: one JSON file (plus PNG figures) per finished check, written atomically.

Layout under the audit's output directory::

    checks/<model-key>/<check>.json              # record: fingerprint, status, data, figure paths
    checks/<model-key>/<check>-<fp12>/<fig>.png  # that record's figures

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, and the record JSON is written last, so an interrupted audit leaves either a
complete record or none. A record is reused only when its ``fingerprint`` (model weights and
config, dataset, options, check version) equals the current one.

A check whose work comes in many small units (e.g. one result per image) keeps them in a
:class:`ScratchStore` (``ctx.scratch(name)``), under ``scratch/<model-key>/<name>/`` (one small JSON
file per key, written atomically as each unit finishes), so an interrupted check resumes without
recomputing the finished units; the check makes its keys say everything the unit depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from trustvision._utils.io import atomic_write_bytes, atomic_write_json, to_jsonable

__all__ = [
    "ResultStore",
    "MemoryStore",
    "ScratchStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "to_jsonable",
    "fingerprint",
    "model_fingerprint",
    "safe_key",
]


def fingerprint(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON form of ``obj``."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's class, ``tv_config`` and every parameter/buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    cfg = getattr(model, "tv_config", None) or {}
    h.update(fingerprint({k: v for k, v in cfg.items() if k != "metrics"}).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key(name: str) -> str:
    """A file-name-safe key for a model or figure name (``zoo:small-cnn`` -> ``zoo-small-cnn``)."""
    key = _UNSAFE.sub("-", str(name)).strip("-.")
    return key[:80] or "item"


class ResultStore:
    """Per-check records under ``root/checks`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checks_dir = self.root / "checks"

    def record_path(self, model_key: str, check: str) -> Path:
        return self.checks_dir / safe_key(model_key) / f"{safe_key(check)}.json"

    def load(self, model_key: str, check: str, fp: str) -> dict | None:
        """The stored record if it exists, is readable, finished, has fingerprint ``fp`` and all its figures."""
        path = self.record_path(model_key, check)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(record, dict) or record.get("fingerprint") != fp or record.get("status") != "ok":
            return None
        if not all((self.root / p).is_file() for p in record.get("figures", {}).values()):
            return None
        return record

    def save(self, model_key: str, check: str, fp: str, record: dict, figures: dict[str, bytes]) -> dict:
        """Store ``record`` (plus ``fingerprint`` and figure paths) and its PNG ``figures``; returns the record.

        Figures go to a directory named after the fingerprint and are written before the record,
        so a crash never leaves a record pointing at missing or stale figures. Figure directories
        of older fingerprints are removed afterwards.
        """
        model_dir = self.checks_dir / safe_key(model_key)
        fig_dir_name = f"{safe_key(check)}-{fp[:12]}"
        rel_figs: dict[str, str] = {}
        for name, png in figures.items():
            fname = f"{safe_key(name)}.png"
            atomic_write_bytes(model_dir / fig_dir_name / fname, png)
            rel_figs[name] = (Path("checks") / safe_key(model_key) / fig_dir_name / fname).as_posix()
        record = {**record, "fingerprint": fp, "figures": rel_figs}
        atomic_write_json(self.record_path(model_key, check), record)
        for old in model_dir.glob(f"{safe_key(check)}-*"):
            stale = old.name != fig_dir_name and re.fullmatch(re.escape(safe_key(check)) + r"-[0-9a-f]{12}", old.name)
            if old.is_dir() and stale:
                shutil.rmtree(old, ignore_errors=True)
        return record


class MemoryStore:
    """A store that keeps nothing between runs: used when an audit writes no files (``out=None``).

    ``save`` returns the record with ``figures`` mapping each name to ``memory:<name>``; the PNG
    bytes are kept by the caller (:class:`~trustvision.audit.runner.AuditResult.figures`).
    """

    def load(self, model_key: str, check: str, fp: str) -> dict | None:
        return None

    def save(self, model_key: str, check: str, fp: str, record: dict, figures: dict[str, bytes]) -> dict:
        return {**record, "fingerprint": fp, "figures": {name: f"memory:{name}" for name in figures}}


class ScratchStore:
    """Partial results of a check, one JSON value per string key: under ``root`` (one file per key,
    named by the key's SHA-256, written atomically) or, with ``root=None``, in memory (an audit that
    writes no files). Unreadable files count as missing.

    Example:
        >>> s = ScratchStore()
        >>> s["image 3"] = {"order": [2, 0, 1]}
        >>> s.get("image 3"), s.get("image 4"), len(s)
        ({'order': [2, 0, 1]}, None, 1)
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = None if root is None else Path(root)
        self._memory: dict[str, Any] = {}

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(str(key).encode('utf-8')).hexdigest()[:40]}.json"  # type: ignore[operator]

    def get(self, key: str, default: Any = None) -> Any:
        if self.root is None:
            return self._memory.get(key, default)
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        if self.root is None:
            self._memory[key] = to_jsonable(value)
            return
        text = json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":"))
        atomic_write_bytes(self._path(key), text.encode("utf-8"))

    def __contains__(self, key: object) -> bool:
        return self.get(str(key)) is not None

    def __len__(self) -> int:
        if self.root is None:
            return len(self._memory)
        return sum(1 for _ in self.root.glob("*.json")) if self.root.is_dir() else 0
