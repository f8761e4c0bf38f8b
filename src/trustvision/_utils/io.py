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

__all__ = ["atomic_write_bytes", "atomic_write_json", "to_jsonable"]


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
