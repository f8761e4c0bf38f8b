"""Dataset registry: embedded sets, planted-shortcut sets and torchvision-backed sets.

Example:
    >>> from trustvision import data
    >>> ds = data.load("digits", split="test")
    >>> x, y = ds[0]
    >>> tuple(x.shape), ds.classes[y] in ds.classes
    ((1, 8, 8), True)
"""

from __future__ import annotations

import inspect
from typing import Callable

from trustvision._utils.registry import Registry
from trustvision.data._base import (SPLITS, ImageDataset, TensorImageDataset, dataset_indices, item_attribute,
                                    random_subset)
from trustvision.errors import TrustVisionError

__all__ = [
    "ImageDataset",
    "TensorImageDataset",
    "item_attribute",
    "dataset_indices",
    "SPLITS",
    "as_image_dataset",
    "random_subset",
    "load",
    "list_datasets",
    "register_dataset",
]

# name -> loader(split, root, download, **kwargs) -> ImageDataset
_DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset", "`trustvision data`")
# prefix (e.g. "imagefolder") -> loader(argument, split, root, download, **kwargs)
_PREFIXED: dict[str, Callable[..., ImageDataset]] = {}


def register_dataset(name: str, *, prefix: bool = False):
    """Register a loader ``fn(split, root, download, **kw)`` under ``name``.

    With ``prefix=True`` the loader serves every name ``"<name>:<argument>"`` and receives the
    argument as its first parameter (used by ``imagefolder:PATH``).
    """

    def deco(fn):
        if prefix:
            _PREFIXED[name] = fn
        else:
            _DATASETS.add(name, fn)
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`load` (prefixed entries are shown as ``prefix:ARG``)."""
    return _DATASETS.names() + [f"{p}:PATH" for p in sorted(_PREFIXED)]


def load(
    name: str,
    split: str = "train",
    root: str | None = None,
    download: bool = False,
    **kwargs,
) -> ImageDataset:
    """Load dataset ``name`` and return its ``split`` as an :class:`ImageDataset`.

    Images are float32 (C, H, W) in [0, 1]; labels are ints. Nothing is downloaded unless
    ``download=True``.
    """
    if split not in SPLITS:
        raise TrustVisionError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    args: tuple = ()
    loader = None
    if ":" in name:
        prefix, arg = name.split(":", 1)
        if prefix in _PREFIXED:
            loader, args = _PREFIXED[prefix], (arg,)
    if loader is None:
        loader = _DATASETS.get(name)
    try:
        inspect.signature(loader).bind(*args, split=split, root=root, download=download, **kwargs)
    except TypeError as exc:
        raise TrustVisionError(
            f"dataset {name!r} does not take these options ({exc}); "
            "see its docstring for the options it accepts"
        ) from None
    return loader(*args, split=split, root=root, download=download, **kwargs)


# Importing the modules registers their datasets.
from trustvision.data import embedded as _embedded  # noqa: E402,F401
from trustvision.data import shortcut  # noqa: E402,F401
from trustvision.data import torchvision_sets as _torchvision_sets  # noqa: E402,F401
from trustvision.data.adapt import as_image_dataset  # noqa: E402
