"""The dataset contract every registered dataset follows.

Example:
    >>> import torch
    >>> from trustvision.data import TensorImageDataset
    >>> ds = TensorImageDataset(torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 0, 1, 1]), ["a", "b"],
    ...                         "toy", "test")
    >>> x, y = ds.subset([1, 3]).tensors()
    >>> tuple(x.shape), y.tolist()
    ((2, 1, 4, 4), [1, 1])
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["SPLITS", "ImageDataset", "TensorImageDataset", "SubsetImageDataset", "random_subset"]

#: The splits every registered dataset has.
SPLITS = ("train", "val", "test")


def _as_indices(indices: Iterable[int] | torch.Tensor, n: int) -> torch.Tensor:
    """``indices`` as a 1-D int64 tensor of positions in ``range(n)`` (negative ones count from
    the end); raises IndexError for positions outside."""
    idx = indices if torch.is_tensor(indices) else torch.as_tensor(list(indices), dtype=torch.long)
    if idx.dtype == torch.bool:
        raise TypeError("subset takes integer indices, not a boolean mask; use mask.nonzero()")
    idx = idx.long().flatten()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        bad = int(idx.min()) if int(idx.min()) < -n else int(idx.max())
        raise IndexError(f"index {bad} is out of range for a dataset of {n} items")
    return torch.where(idx < 0, idx + n, idx)


class ImageDataset(Dataset):
    """A dataset of ``(image, label)`` pairs.

    ``image`` is float32 of shape (C, H, W) with values in [0, 1]; ``label`` is an int in
    ``range(len(classes))``. Attributes: ``name``, ``split``, ``classes`` (list of str),
    ``image_size`` ((H, W) tuple), ``num_channels`` (C).

    ``tensors()`` returns the whole set as ``(images (N, C, H, W) float32, labels (N,) int64)``
    and ``subset(indices)`` a dataset of some of its items; in-memory sets make both cheap.
    """

    name: str
    split: str
    classes: list[str]
    image_size: tuple[int, int]
    num_channels: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, C, H, W) float32 and labels (N,) int64, read in order.

        This default reads the items in batches of 256 through
        :func:`trustvision.data.loading.image_batches` (a DataLoader with the worker processes of
        :func:`trustvision.data.loading.loader_options`: none unless the audit's
        ``--num-workers`` says; items may carry extras after the label, e.g. masks: they are
        dropped); in-memory datasets override it with their stored tensors.
        """
        from trustvision.data.loading import image_batches

        labels: list[int] = []
        images = [torch.as_tensor(xb).float() for xb in image_batches(self, 256, labels=labels)]
        if not images:
            return (torch.zeros(0, self.num_channels, *self.image_size),
                    torch.zeros(0, dtype=torch.long))
        return torch.cat(images), torch.tensor(labels, dtype=torch.long)

    def subset(self, indices: Iterable[int] | torch.Tensor) -> "ImageDataset":
        """The items at ``indices`` (in that order) as an :class:`ImageDataset` with the same
        ``name``, ``split``, ``classes``, ``image_size`` and ``num_channels``."""
        return SubsetImageDataset(self, _as_indices(indices, len(self)))


class SubsetImageDataset(ImageDataset):
    """Some items of another :class:`ImageDataset` (``parent``), read from it on access."""

    def __init__(self, parent: ImageDataset, indices: torch.Tensor):
        self.parent = parent
        self.indices = indices
        self.name = parent.name
        self.split = parent.split
        self.classes = list(parent.classes)
        self.image_size = tuple(parent.image_size)
        self.num_channels = int(parent.num_channels)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, idx: int):
        return self.parent[int(self.indices[idx])]

    @property
    def labels(self) -> torch.Tensor:
        """The labels (N,) int64, from the parent's ``labels`` without reading any image
        (AttributeError when the parent has none)."""
        parent = getattr(self.parent, "labels", None)
        if parent is None:
            raise AttributeError("labels")
        return torch.as_tensor(parent).long()[self.indices]

    def subset(self, indices: Iterable[int] | torch.Tensor) -> ImageDataset:
        return SubsetImageDataset(self.parent, self.indices[_as_indices(indices, len(self))])


class TensorImageDataset(ImageDataset):
    """An :class:`ImageDataset` held in memory as tensors (images (N,C,H,W) in [0,1], labels (N,)).

    Subclasses that store more per-item tensors name them in ``per_item`` so that
    :meth:`subset` (which returns the same class) cuts them as well.
    """

    #: names of extra attributes holding one entry per item (indexed by ``subset``)
    per_item: tuple[str, ...] = ()

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        name: str,
        split: str,
    ):
        if images.ndim != 4:
            raise ValueError(f"images must be (N,C,H,W), got {tuple(images.shape)}")
        self.images = images.float().contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.num_channels = int(images.shape[1])
        self.image_size = (int(images.shape[2]), int(images.shape[3]))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, idx: int):
        return self.images[idx], int(self.labels[idx])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels at once: the stored tensors themselves (not copies)."""
        return self.images, self.labels

    def subset(self, indices: Iterable[int] | torch.Tensor) -> "TensorImageDataset":
        """The items at ``indices`` as a dataset of the same class (tensors and ``per_item``
        attributes indexed, everything else shared)."""
        idx = _as_indices(indices, len(self))
        out = copy.copy(self)
        out.images, out.labels = self.images[idx], self.labels[idx]
        out.classes = list(self.classes)
        # where each item sits in the full split (what a subset of a streamed split keeps as ``indices``)
        parent_idx = getattr(self, "source_indices", None)
        pos = torch.where(idx < 0, idx + len(self), idx)
        out.source_indices = pos if parent_idx is None else parent_idx[pos]
        for attr in self.per_item:
            setattr(out, attr, getattr(self, attr)[idx])
        return out


def dataset_indices(ds) -> list[int]:
    """Each item's index in the full split: a subset's ``source_indices`` (in-memory sets) or
    ``indices`` (streamed sets), else its position."""
    idx = getattr(ds, "source_indices", None)
    if idx is None:
        idx = getattr(ds, "indices", None)
    return [int(i) for i in idx] if idx is not None and len(idx) == len(ds) else list(range(len(ds)))


def item_attribute(ds, name: str):
    """A per-item attribute of a dataset (e.g. ``marked`` or ``masks`` of ``shortcut-digits``),
    also through a subset of it (taken at the subset's indices); None when it has none."""
    v = getattr(ds, name, None)
    if v is None and getattr(ds, "parent", None) is not None and getattr(ds, "indices", None) is not None:
        parent = getattr(ds.parent, name, None)
        v = None if parent is None else torch.as_tensor(parent)[torch.as_tensor(ds.indices).long()]
    return v


def random_subset(
    ds: ImageDataset, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``min(n, len(ds))`` examples of ``ds`` drawn without replacement by ``generator``, in index
    order: images (n, C, H, W), labels (n,) and their indices (n,) in ``ds``.

    ``ds`` is an :class:`ImageDataset` or anything :func:`trustvision.data.as_image_dataset`
    accepts. Only the drawn items are read.
    """
    if not isinstance(ds, ImageDataset):
        from trustvision.data.adapt import as_image_dataset

        ds = as_image_dataset(ds)
    idx = torch.randperm(len(ds), generator=generator)[: min(n, len(ds))].sort().values
    images, labels = ds.subset(idx).tensors()
    return images, labels, idx
