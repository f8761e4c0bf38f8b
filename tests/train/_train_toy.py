"""Tiny models and data sets shared by the training tests."""

from __future__ import annotations

import torch
from torch import nn

from trustvision.data import TensorImageDataset
from trustvision.models import ImageClassifier


class TinyNet(ImageClassifier):
    """Linear classifier on flattened pixels (with optional dropout); records its last input."""

    def __init__(self, num_classes=2, in_chans=1, image_size=4, dropout=0.0, mean=None):
        super().__init__(num_classes, in_chans, image_size, mean=mean)
        d = in_chans * self.image_size[0] * self.image_size[1]
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(d, num_classes)
        self.seen_train: list[torch.Tensor] = []
        self.seen_eval: list[torch.Tensor] = []

    def forward(self, x):
        (self.seen_train if self.training else self.seen_eval).append(x.detach().clone())
        return super().forward(x)

    def forward_features(self, x):
        return self.drop(x.flatten(1))

    def forward_head(self, feats):
        return self.fc(feats)


def halves(n=96, size=4, seed=0, split="train") -> TensorImageDataset:
    """Class 1 iff the left half is brighter than the right half (linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    y = torch.arange(n) % 2
    x[y == 1, :, :, : size // 2] += 0.5
    x[y == 0, :, :, size // 2:] += 0.5
    return TensorImageDataset(x, y, ["right", "left"], "halves", split)
