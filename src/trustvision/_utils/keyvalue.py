"""``KEY=VALUE`` command-line arguments (``--model-kw``, ``--method-kw``) parsed into a dict."""

from __future__ import annotations

import json
from typing import Any

from trustvision.errors import TrustVisionError

__all__ = ["parse_key_values"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_key_values(items: list[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``["n_masks=500", "baselines=blur", "mask_size=4,4"]`` -> ``{"n_masks": 500,
    "baselines": "blur", "mask_size": [4, 4]}``: JSON values, else strings; commas make lists.

    A malformed item is a one-line error naming ``flag`` and an ``example`` (``KEY=VALUE``).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrustVisionError(f"{flag} expects KEY=VALUE, got {item!r}; e.g. {flag} {example}")
        raw = raw.strip()
        if "," in raw and not raw.startswith(("[", "{", '"')):
            out[key.strip()] = [_value(v.strip()) for v in raw.split(",")]
        else:
            out[key.strip()] = _value(raw)
    return out
