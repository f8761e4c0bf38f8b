"""Suite-wide settings and shared toys.

One torch thread (tiny models run faster, results are reproducible), and a tiny linear classifier
with a 3-class toy dataset (4x4 images) used by the audit and report tests.
"""

import pytest
import torch
from torch import nn

from trustvision.data._base import TensorImageDataset
from trustvision.models._base import ImageClassifier

torch.set_num_threads(1)

class TinyLinear(ImageClassifier):
    """Linear classifier on 1x4x4 images; with ``strength`` > 0 it reads the class pixel (0, k)."""

    def __init__(self, strength: float = 4.0, num_classes: int = 3):
        super().__init__(num_classes, 1, 4, mean=[0.0], std=[1.0])
        self.lin = nn.Linear(16, num_classes)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()
            for k in range(num_classes):
                self.lin.weight[k, k] = strength
        self.tv_config = {"architecture": "tiny-linear", "num_classes": num_classes, "in_chans": 1,
                          "image_size": [4, 4], "kwargs": {"strength": strength}}

    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, feats):
        return self.lin(feats)


def make_split(split: str, n: int = 60, seed: int = 0, classes=("a", "b", "c"), name: str = "toy"):
    g = torch.Generator().manual_seed(seed + {"train": 0, "val": 1, "test": 2}[split])
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.5
    x[torch.arange(n), 0, 0, y] += 0.3  # class signal in row 0, column y (noisy)
    return TensorImageDataset(x.clamp(0, 1), y, list(classes), name, split)


def make_splits(**kw):
    return {s: make_split(s, **kw) for s in ("train", "val", "test")}


@pytest.fixture
def toy_splits():
    return make_splits()


@pytest.fixture
def tiny_model():
    return TinyLinear()


@pytest.fixture
def tiny_cls():
    return TinyLinear


@pytest.fixture
def splits_factory():
    return make_splits


@pytest.fixture
def no_tf32(monkeypatch):
    """Full fp32 on CUDA (no TF32 in matmuls and convolutions), so GPU and CPU answers compare."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
