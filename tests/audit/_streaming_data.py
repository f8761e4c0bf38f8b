"""Shared set-ups of the streaming tests: the digits data as an image folder on disk (fixture
``digits_folder``; import it into the test module) and the same images held in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trustvision import data
from trustvision.data._base import TensorImageDataset


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """digits as PNG files: PATH/{train,test}/<class>/<i>.png (grey, 8 x 8; 300 train, 120 test)."""
    root = tmp_path_factory.mktemp("digits-folder")
    for split, n in (("train", 300), ("test", 120)):
        x, y = data.load("digits", split=split).tensors()
        for i in range(n):
            d = root / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(d / f"{i:04d}.png")
    return root


def in_memory(spec: str) -> dict:
    """Every split of dataset ``spec`` read item by item into a TensorImageDataset."""
    out = {}
    for split in ("train", "val", "test"):
        ds = data.load(spec, split=split)
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), ds.labels.clone()
        out[split] = TensorImageDataset(x, y, classes=ds.classes, name=ds.name, split=split)
    return out
