"""Model registry (timm-style), feed-forward nets, generative classifiers and safe checkpoint I/O.

Example:
    >>> from trustvision import models
    >>> net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
    >>> import torch
    >>> tuple(net(torch.rand(2, 1, 8, 8)).shape)
    (2, 10)
"""

from __future__ import annotations

import copy
import typing
from typing import Callable, Sequence

from trustvision._utils.registry import Registry
from trustvision.errors import TrustVisionError
from trustvision.models import _schema
from trustvision.models._base import GenerativeClassifier, ImageClassifier, is_generative

__all__ = [
    "ImageClassifier", "GenerativeClassifier", "create", "list_models", "register_model",
    "model_class", "save", "load", "check_compatible", "Ensemble", "list_zoo", "is_generative",
    "wrap",
]

# name -> factory(num_classes, in_chans, image_size, **kw) -> ImageClassifier
_MODELS: Registry[Callable[..., ImageClassifier]] = Registry("model", "`trustvision zoo --models`")
# prefix (e.g. "torchvision", "timm") -> factory(arg, num_classes, in_chans, image_size, **kw)
_PREFIXED: dict[str, Callable[..., ImageClassifier]] = {}


def register_model(name: str | None = None, *, prefix: bool = False):
    """Register ``factory(num_classes, in_chans, image_size, **kw) -> ImageClassifier``.

    With ``prefix=True`` the factory serves every ``"<name>:<arg>"`` and gets ``arg`` first.
    """

    def deco(fn):
        key = name or fn.__name__.replace("_", "-")
        if prefix:
            _PREFIXED[key] = fn
        else:
            _MODELS.add(key, fn)
        return fn

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`create` (prefixed entries shown as ``prefix:NAME``)."""
    return _MODELS.names() + [f"{p}:NAME" for p in sorted(_PREFIXED)]


def _factory(name: str) -> Callable[..., ImageClassifier] | None:
    if ":" in name and name.split(":", 1)[0] in _PREFIXED:
        return _PREFIXED[name.split(":", 1)[0]]
    return _MODELS.get(name) if name in _MODELS else None


def model_class(name: str) -> type | None:
    """The class that the factory of architecture ``name`` returns, read from its return
    annotation (e.g. ``IBINN`` for ``"ibinn-small"``), without building a model; None when the
    name is unknown or its factory has no resolvable class annotation.

    Example:
        >>> from trustvision import models
        >>> models.model_class("ibinn-small").__name__
        'IBINN'
    """
    fn = _factory(name)
    if fn is None:
        return None
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve
        return None
    return hint if isinstance(hint, type) else None


#: Exceptions a factory raises for arguments it cannot build (reported as one line by create).
_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError,
                 ZeroDivisionError, OverflowError, AssertionError)


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int | Sequence[int] = 32,
    **kwargs,
) -> ImageClassifier:
    """Build an untrained model by registry name; it records its config in ``model.tv_config``.

    Never downloads: ``pretrained=True``, torchvision's ``weights=`` and URL-valued keywords are
    refused (load pretrained weights yourself and pass the file to
    ``models.load(path, architecture=name, ...)``). Anything the architecture cannot be built
    from (sizes out of range, e.g. ``num_classes`` outside 1..100000, an image size the layout
    cannot divide, a wrong keyword) is a one-line :class:`~trustvision.errors.TrustVisionError`
    naming the architecture and what it needs.
    """
    if not isinstance(name, str) or not name:
        raise TrustVisionError(f"a model name must be a non-empty string, got {_schema.shown(name)}; "
                               "`trustvision zoo --models` lists them")
    bad = _schema.check_build_args(num_classes, in_chans, image_size)
    if bad:
        raise TrustVisionError(f"model {name!r} cannot be built: {bad}; pass a value in that range")
    found = _schema.network_kwarg(kwargs)
    if found:
        path, value = found
        raise TrustVisionError(
            f"model {name!r}: {path}={_schema.shown(value)} would download weights at run time, and "
            "trustvision never downloads models; fetch the weights yourself, save the state dict "
            f"to a file and load it with models.load(path, architecture={name!r}, num_classes=..., "
            f"in_chans=..., image_size=...) (drop {path.split('.')[0]} from --model-kw)"
        )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    shape = f"{int(in_chans)}x{int(size[0])}x{int(size[1])} images with {int(num_classes)} classes"
    bad = _schema.check_mean_std(kwargs, int(in_chans))
    if bad:
        raise TrustVisionError(f"model {name!r} cannot be built for {shape}: {bad}; pass one "
                               "value per channel (or leave mean/std out for the default)")
    factory = _factory(name)
    if factory is None:
        _MODELS.get(name)  # raises the one-line "unknown model ... (did you mean ...)" error
    prefixed = ":" in name and name.split(":", 1)[0] in _PREFIXED
    args = (name.split(":", 1)[1],) if prefixed else ()
    try:
        model = factory(*args, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                        **kwargs)
    except TrustVisionError:
        raise
    except _BUILD_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TrustVisionError(
            f"model {name!r} cannot be built for {shape}: {detail}; change the image size or the "
            "model keyword arguments (--model-kw), or pick an architecture that fits "
            "(`trustvision zoo --models`)"
        ) from None
    model.tv_config = {
        "architecture": name,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "image_size": [int(s) for s in size],
        "kwargs": copy.deepcopy(kwargs),
    }
    return model


# Importing the modules registers their models.
from trustvision.models import feedforward as _feedforward  # noqa: E402,F401
from trustvision.models import generative as _generative  # noqa: E402,F401
from trustvision.models.checkpoint import list_zoo, load, save  # noqa: E402
from trustvision.models.ensemble import Ensemble  # noqa: E402
from trustvision.models.validate import check_compatible  # noqa: E402
from trustvision.models.wrapped import wrap  # noqa: E402
