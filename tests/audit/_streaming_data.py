"""The same images held in memory as a dataset streams them (the streaming tests compare the two)."""

from __future__ import annotations

import torch

from trustvision import data
from trustvision.data._base import TensorImageDataset


def in_memory(spec: str) -> dict:
    """Every split of dataset ``spec`` read item by item into a TensorImageDataset."""
    out = {}
    for split in ("train", "val", "test"):
        ds = data.load(spec, split=split)
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), ds.labels.clone()
        out[split] = TensorImageDataset(x, y, classes=ds.classes, name=ds.name, split=split)
    return out
