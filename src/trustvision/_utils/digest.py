"""Content digests for the keys of partial results (the audit's scratch store): a key names
everything a result depends on (the model's weights, the settings, the input), so a result stored
by an interrupted run is reused only for the same work."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["digest", "weights_digest", "tensor_from_json", "tensor_to_json"]


def _canonical(p: Any) -> Any:
    """``p`` with every tensor replaced by its digest (so a tensor inside a dict or list is hashed
    by its bytes, never by its truncated repr)."""
    if isinstance(p, torch.Tensor):
        return {"tensor": digest(p)}
    if isinstance(p, dict):
        return {str(k): _canonical(v) for k, v in p.items()}
    if isinstance(p, (list, tuple)):
        return [_canonical(v) for v in p]
    return p


def digest(*parts: Any) -> str:
    """A 32-hex-digit SHA-256 of ``parts``: tensors by dtype, shape and bytes, anything else by
    its canonical JSON (tensors nested in dicts / lists by their bytes too).

    Example:
        >>> digest(torch.zeros(2), {"eps": 0.1}) == digest(torch.zeros(2), {"eps": 0.1})
        True
        >>> digest({"baseline": torch.zeros(3)}) == digest({"baseline": torch.ones(3)})
        False
    """
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(_canonical(p), sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trustvision")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown"


def weights_digest(model: torch.nn.Module) -> str:
    """:func:`digest` of the model's class and every parameter and buffer, and of the trustvision
    version (a partial result of another version is never reused)."""
    return digest(_version(), f"{type(model).__module__}.{type(model).__qualname__}",
                  *[x for kv in model.state_dict().items() for x in kv])


def tensor_to_json(t: torch.Tensor) -> dict:
    """A float tensor as ``{"shape": [...], "values": [...]}`` (float32 values survive the JSON
    round trip exactly: a float32 is exactly a double, and JSON keeps the double)."""
    t = t.detach().cpu()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "values": t.reshape(-1).tolist()}


def tensor_from_json(d: dict) -> torch.Tensor:
    """The inverse of :func:`tensor_to_json`."""
    return torch.tensor(d["values"], dtype=getattr(torch, d.get("dtype", "float32"))).reshape(d["shape"])
