"""Atomic file writes and conversion of results to strict JSON (shared by the audit and the report)."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "to_jsonable", "ensure_writable_dir", "remove_stale_temp_files"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden name in the same directory (same file system, so os.replace is atomic);
    # opened with "xb" so the file gets the usual umask-based permissions.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, tuples, paths and dataclass-like objects to plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return to_jsonable(asdict(obj))
    raise TypeError(f"cannot store a {type(obj).__name__} in results.json; convert it to numbers/lists")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (made JSON-safe with :func:`to_jsonable`) as indented JSON, atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def ensure_writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written there.

    Every problem is a one-line :class:`~trustvision.errors.TrustVisionError` naming ``flag``: an
    empty path, a name component over 255 bytes, a path that is (or lies under) a file, a folder
    that cannot be created or written.
    """
    from trustvision.errors import TrustVisionError

    text = os.fspath(path)
    if not str(text).strip():
        raise TrustVisionError(f"{flag} is empty; give the folder to write to, e.g. {flag} report")
    p = Path(text)
    for part in p.parts:
        if len(os.fsencode(part)) > 255:
            raise TrustVisionError(f"{flag}: the name {part[:40]!r}... is longer than 255 bytes; use a shorter folder name")
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == p else f"lies under the file {parent}"
            raise TrustVisionError(f"{flag} {text} {where}; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".trustvision-write-test.{os.getpid()}.{secrets.token_hex(4)}"
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TrustVisionError(f"cannot write to {flag} {text} ({reason}); choose a folder you can write to") from None
    return p


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove the ``.NAME.PID.TOKEN.tmp`` files :func:`atomic_write_bytes` leaves when a process is
    killed between writing and renaming, for processes that no longer run. Returns how many."""
    import re

    removed = 0
    pattern = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
    root = Path(folder)
    if not root.is_dir():
        return 0
    for tmp in root.rglob(".*.tmp"):
        m = pattern.match(tmp.name)
        if not m or not tmp.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another audit is writing this folder right now
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
