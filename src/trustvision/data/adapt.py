"""Turn what Captum, Quantus and Deepchecks users hold (a torch Dataset, a DataLoader, a tuple of
tensors) into a validated :class:`~trustvision.data.ImageDataset`.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from trustvision import data
    >>> ds = data.as_image_dataset(TensorDataset(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2] * 2)))
    >>> len(ds), ds.classes, ds.image_size, ds.num_channels
    (6, ['0', '1', '2'], (8, 8), 1)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trustvision.data._base import ImageDataset, TensorImageDataset
from trustvision.errors import TrustVisionError

__all__ = ["as_image_dataset"]

_ACCEPTS = ("an ImageDataset, a torch Dataset of (image, label) pairs, a DataLoader or a tuple "
            "(images, labels)")


def _has_pairs(ds: Any) -> bool:
    """True when ``ds`` is indexable and ``ds[0]`` is an (image, label, ...) sequence."""
    if isinstance(ds, ImageDataset):
        return True
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        return False
    try:
        if len(ds) == 0:
            return False
        item = ds[0]
    except Exception:  # iterable-style or otherwise not indexable: iterate the loader instead
        return False
    return isinstance(item, (tuple, list)) and len(item) >= 2


def _concat(batches, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the (images, labels, ...) batches of an iterable (a DataLoader)."""
    images, labels = [], []
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TrustVisionError(
                    f"{what} yields {type(batch).__name__} batches, not (images, labels); make it "
                    "yield (image, label) pairs")
            images.append(torch.as_tensor(batch[0]))
            labels.append(torch.as_tensor(batch[1]))
    except TrustVisionError:
        raise
    except (TypeError, RuntimeError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:160]
        raise TrustVisionError(
            f"cannot read {what} as batches of images ({msg}); it must yield (image tensor "
            "(C, H, W), int label) pairs, e.g. with torchvision's transforms.ToTensor()") from None
    if not images:
        raise TrustVisionError(f"{what} is empty; pass a dataset with images")
    try:
        return torch.cat(images), torch.cat(labels)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:160]
        raise TrustVisionError(f"the batches of {what} do not fit together ({msg}); give every "
                               "image the same shape (C, H, W)") from None


def _read(ds: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, TensorDataset):  # the tensors themselves, no item-by-item reading
        if len(ds.tensors) < 2:
            raise TrustVisionError(f"{what} holds {len(ds.tensors)} tensor(s); pass "
                                   "TensorDataset(images, labels)")
        return ds.tensors[0], ds.tensors[1]
    return _concat(DataLoader(ds, batch_size=256, shuffle=False, num_workers=0), what)


def _check(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None,
           what: str) -> list[str]:
    """Validate images and labels (one-line errors); returns the class names."""
    if not images.dtype.is_floating_point:
        hint = "; for 8-bit images use x.float() / 255" if images.dtype == torch.uint8 else ""
        raise TrustVisionError(f"images of {what} must be float in [0, 1], got {images.dtype}"
                               f"{hint}")
    if images.ndim != 4:
        hint = ("; add the channel dimension, e.g. x.unsqueeze(1)" if images.ndim == 3
                else "; pass a batch of images (N, C, H, W)")
        raise TrustVisionError(f"images of {what} must be (N, C, H, W), got shape "
                               f"{tuple(images.shape)}{hint}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TrustVisionError(f"labels of {what} must be integer class indices, got "
                               f"{labels.dtype}; pass e.g. y.long()")
    if labels.ndim != 1:
        raise TrustVisionError(f"labels of {what} must be (N,) class indices, got shape "
                               f"{tuple(labels.shape)}; for one-hot labels pass y.argmax(1)")
    if len(images) != len(labels):
        raise TrustVisionError(f"{what} has {len(images)} images but {len(labels)} labels; pass "
                               "one label per image")
    if len(images) == 0:
        raise TrustVisionError(f"{what} is empty; pass a dataset with images")
    lo, hi = float(images.min()), float(images.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise TrustVisionError(
            f"images of {what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; pass "
            "unnormalised images: normalisation belongs inside the model (wrap it with "
            "trustvision.models.wrap(module, mean=..., std=...))")
    lmin, lmax = int(labels.min()), int(labels.max())
    if classes is None:
        classes = [str(i) for i in range(lmax + 1)]
    classes = [str(c) for c in classes]
    if lmin < 0 or lmax >= len(classes):
        raise TrustVisionError(
            f"labels of {what} must be in [0, {len(classes)}) for its {len(classes)} classes, got "
            f"{lmin}..{lmax}; pass one name per class in classes= or fix the labels")
    return classes


def as_image_dataset(obj: Any, *, classes: Sequence[str] | None = None, name: str | None = None,
                     split: str = "test") -> ImageDataset:
    """``obj`` as an :class:`ImageDataset` (an ImageDataset is returned as it is).

    Accepts a torch ``Dataset`` yielding ``(image (C, H, W), label)`` pairs (a ``TensorDataset``
    is used through its tensors), a ``DataLoader`` (its ``dataset`` when that has ``(x, y)``
    items, else its batches concatenated) or a tuple ``(images (N, C, H, W), labels (N,))`` of
    tensors or arrays. Everything is read once into memory (a
    :class:`~trustvision.data.TensorImageDataset` on the CPU) and validated with one-line
    :class:`TrustVisionError`: images float in [0, 1] (normalisation belongs inside the model),
    4-D, labels integers in ``[0, K)``.

    ``classes`` defaults to the dataset's ``classes`` attribute when it has one, else
    ``["0", ..., str(max label)]``; ``name`` to the dataset's ``name`` or its class name;
    ``image_size`` and ``num_channels`` come from the images.
    """
    if isinstance(obj, ImageDataset):
        return obj
    if isinstance(obj, DataLoader):
        inner = getattr(obj, "dataset", None)
        if inner is not None and _has_pairs(inner):
            return as_image_dataset(inner, classes=classes, name=name, split=split)
        what = f"the DataLoader of {type(inner).__name__}" if inner is not None else "the DataLoader"
        images, labels = _concat(obj, what)
        source = inner
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[1], str):
        what = "the (images, labels) tuple"
        try:
            images, labels = torch.as_tensor(obj[0]), torch.as_tensor(obj[1])
        except (TypeError, ValueError, RuntimeError):
            raise TrustVisionError(f"{what} must hold two tensors or arrays, got "
                                   f"{type(obj[0]).__name__} and {type(obj[1]).__name__}") from None
        source = None
    elif isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                      and not isinstance(obj, (str, bytes, dict, torch.Tensor))):
        what = f"the {type(obj).__name__}"
        images, labels = _read(obj, what)
        source = obj
    else:
        raise TrustVisionError(f"cannot use {type(obj).__name__} as a dataset; pass {_ACCEPTS}")
    if classes is None and source is not None and getattr(source, "classes", None) is not None:
        classes = list(source.classes)
    images, labels = torch.as_tensor(images).detach().cpu(), torch.as_tensor(labels).detach().cpu()
    classes = _check(images, labels, classes, what)
    if name is None:
        name = getattr(source, "name", None) if source is not None else None
        name = str(name) if name else (type(source).__name__ if source is not None else "tensors")
    return TensorImageDataset(images.float(), labels.long(), classes, name, split)
