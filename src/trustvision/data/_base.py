"""The dataset contract every registered dataset follows."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["ImageDataset", "TensorImageDataset", "random_subset"]


class ImageDataset(Dataset):
    """A dataset of ``(image, label)`` pairs.

    ``image`` is float32 of shape (C, H, W) with values in [0, 1]; ``label`` is an int in
    ``range(len(classes))``. Attributes: ``name``, ``split``, ``classes`` (list of str),
    ``image_size`` ((H, W) tuple), ``num_channels`` (C).
    """

    name: str
    split: str
    classes: list[str]
    image_size: tuple[int, int]
    num_channels: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TensorImageDataset(ImageDataset):
    """An :class:`ImageDataset` held in memory as tensors (images (N,C,H,W) in [0,1], labels (N,))."""

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
        """All images and labels at once (the fast path for small embedded sets)."""
        return self.images, self.labels


def random_subset(
    ds: Dataset, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``min(n, len(ds))`` examples of ``ds`` drawn without replacement by ``generator``, in index
    order: images (n, C, H, W), labels (n,) and their indices (n,) in ``ds``."""
    idx = torch.randperm(len(ds), generator=generator)[: min(n, len(ds))].sort().values
    if hasattr(ds, "tensors"):
        images, labels = ds.tensors()
        return images[idx], labels[idx], idx
    items = [ds[int(i)] for i in idx]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]), idx
