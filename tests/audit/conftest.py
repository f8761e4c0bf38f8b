"""Shared set-ups of the audit tests: the digits data as an image folder on disk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trustvision import data


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
