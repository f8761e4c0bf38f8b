"""What a model's build arguments and a checkpoint's config.json may hold, checked before anything
is built, downloaded or opened.

* :data:`CONFIG_SCHEMA` maps each known config.json key to a :class:`Field` (what it must be and a
  predicate); :func:`check_config` reports the first key that breaks it, naming the key and the file.
* :func:`check_build_args` bounds ``num_classes`` (1..100000), ``in_chans`` (1..64) and
  ``image_size`` (1..8192 per side), so that a bad value is refused before memory is allocated.
* :func:`network_kwarg` finds model keywords that would download at run time (``pretrained=True``,
  torchvision's ``weights=``, a URL-like string); :func:`file_kwarg` adds, for keywords read from a
  checkpoint's config.json, every keyword that names a file, folder or URL (``checkpoint_path``,
  ``pretrained_cfg``, ``file``, ``*_path``, ``*_dir`` ...): a checkpoint never makes trustvision open
  a path or reach a host the user did not name.

Example:
    >>> from trustvision.models._schema import check_config, network_kwarg
    >>> check_config({"num_classes": 1e9}, "ck/config.json")
    "ck/config.json: 'num_classes' is 1000000000.0, but it must be a whole number from 1 to 100000"
    >>> network_kwarg({"member_kwargs": {"pretrained": True}})
    ('member_kwargs.pretrained', True)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = [
    "MAX_NUM_CLASSES", "MAX_IN_CHANS", "MAX_IMAGE_SIDE", "Field", "CONFIG_SCHEMA", "check_config",
    "check_consistency", "check_build_args", "check_mean_std", "network_kwarg", "file_kwarg",
    "shown",
]

MAX_NUM_CLASSES = 100_000
MAX_IN_CHANS = 64
MAX_IMAGE_SIDE = 8192

#: String prefixes (case-insensitive) that make a keyword value a remote location.
URL_PREFIXES = ("http://", "https://", "ftp://", "ftps://", "s3://", "gs://", "file://", "hf-hub:",
                "hf_hub:", "hf://")
#: Keywords that name a file, folder or remote resource (timm, torchvision, common conventions).
FILE_KEYS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "weights",
                       "file", "url", "path", "filename", "cache_dir", "model_dir"})
FILE_SUFFIXES = ("_path", "_url", "_file", "_dir")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _whole(lo: int, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi)


def _image_size(v: Any) -> bool:
    side = _whole(1, MAX_IMAGE_SIDE)
    return side(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(side(s) for s in v))


def _numbers(v: Any, positive: bool = False) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) > 0
            and all(_is_number(x) and math.isfinite(x) and (x > 0 or not positive) for x in v))


def _normalization(v: Any) -> bool:
    return (isinstance(v, dict) and _numbers(v.get("mean")) and _numbers(v.get("std"), positive=True)
            and len(v["mean"]) == len(v["std"]))


@dataclass(frozen=True)
class Field:
    """One config.json key: ``expect`` says what it must be (for the message), ``ok`` tests it."""

    expect: str
    ok: Callable[[Any], bool]


_SIDE = f"a whole number from 1 to {MAX_IMAGE_SIDE}"

#: config.json key -> what it must hold. Keys not listed here (metadata given to ``save(**meta)``)
#: are kept as they are.
CONFIG_SCHEMA: dict[str, Field] = {
    "format": Field("a string", lambda v: isinstance(v, str)),
    "format_version": Field("a whole number >= 1", _whole(1)),
    "architecture": Field("a registered model name (a non-empty string)",
                          lambda v: isinstance(v, str) and v.strip() != ""),
    "num_classes": Field(f"a whole number from 1 to {MAX_NUM_CLASSES}", _whole(1, MAX_NUM_CLASSES)),
    "in_chans": Field(f"a whole number from 1 to {MAX_IN_CHANS}", _whole(1, MAX_IN_CHANS)),
    "image_size": Field(f"{_SIDE} or a list [height, width] of two of them", _image_size),
    "kwargs": Field("a JSON object of model keyword arguments", lambda v: isinstance(v, dict)),
    "classes": Field("a list of class names (strings), one per class, or null",
                     lambda v: v is None or (isinstance(v, list) and all(isinstance(c, str) for c in v))),
    "normalization": Field('{"mean": [...], "std": [...]} with one finite number per channel and '
                           "every std > 0", _normalization),
    "dataset": Field("a dataset name (a string) or null", lambda v: v is None or isinstance(v, str)),
    "metrics": Field("a JSON object of metric name -> number", lambda v: isinstance(v, dict)),
    "trustvision_version": Field("a string", lambda v: isinstance(v, str)),
    "training": Field("a JSON object or null", lambda v: v is None or isinstance(v, dict)),
}


def check_config(cfg: dict, source: Any) -> str | None:
    """The first key of ``cfg`` that breaks :data:`CONFIG_SCHEMA`, as ``"<source>: 'key' is
    <value>, but it must be ..."``; None if there is none. Missing keys are not problems here (the
    loader names the ones it needs)."""
    for key, field in CONFIG_SCHEMA.items():
        if key in cfg and not field.ok(cfg[key]):
            return f"{source}: {key!r} is {shown(cfg[key])}, but it must be {field.expect}"
    return None


def check_consistency(cfg: dict, source: Any) -> str | None:
    """Problems between the keys of a schema-valid ``cfg``: one class name per class, one
    normalization value per channel; None if there is none."""
    k, c = cfg.get("num_classes"), cfg.get("in_chans")
    classes = cfg.get("classes")
    if classes is not None and k is not None and len(classes) != k:
        return (f"{source}: 'classes' has {len(classes)} names, but 'num_classes' is {k}; it must "
                "be a list of num_classes class names")
    norm = cfg.get("normalization")
    if norm is not None and c is not None and len(norm["mean"]) != c:
        return (f"{source}: 'normalization' has {len(norm['mean'])} values per statistic, but "
                f"'in_chans' is {c}; it must have one mean and one std per input channel")
    return None


def check_build_args(num_classes: Any, in_chans: Any, image_size: Any) -> str | None:
    """What is wrong with the three build arguments of every model, or None."""
    given = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    for key, value in given.items():
        field = CONFIG_SCHEMA[key]
        if not field.ok(value):
            return f"{key} must be {field.expect}, got {shown(value)}"
    return None


def check_mean_std(kwargs: dict, in_chans: int) -> str | None:
    """``mean``/``std`` keywords (when given) must hold ``in_chans`` finite numbers, std > 0."""
    for key in ("mean", "std"):
        v = kwargs.get(key)
        if v is None:
            continue
        if not (_numbers(v, positive=key == "std") and len(v) == in_chans):
            need = "positive finite numbers" if key == "std" else "finite numbers"
            return f"{key} must be a list of {in_chans} {need} (one per input channel), got {shown(v)}"
    return None


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """``(dotted key path, last key, value)`` for every entry of nested dicts and lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, str(k), v
            yield from _walk(v, path)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}[{i}]")


def _looks_like_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(URL_PREFIXES)


def network_kwarg(kwargs: dict) -> tuple[str, Any] | None:
    """The first model keyword (searched through nested dicts, e.g. ``member_kwargs``) that would
    make a model download at run time: ``pretrained`` set to anything but false/None, torchvision's
    ``weights`` set, or a string value that is a URL; ``(key path, value)`` or None."""
    for path, key, value in _walk(kwargs):
        if key == "pretrained" and value not in (False, None, 0):
            return path, value
        if key == "weights" and value is not None:
            return path, value
        if _looks_like_url(value):
            return path, value
    return None


def file_kwarg(kwargs: dict) -> tuple[str, Any] | None:
    """For keywords read from a checkpoint: :func:`network_kwarg`, plus every keyword that names a
    file, folder or remote resource (:data:`FILE_KEYS`, names ending in ``_path``, ``_url``,
    ``_file``, ``_dir``) unless it is null; ``(key path, value)`` or None."""
    found = network_kwarg(kwargs)
    if found is not None:
        return found
    for path, key, value in _walk(kwargs):
        name = key.lower()
        if value is not None and (name in FILE_KEYS or name.endswith(FILE_SUFFIXES)):
            return path, value
    return None
