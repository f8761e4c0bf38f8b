"""The classifier contract: [0,1] images in, logits out, normalisation inside."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """Base class of every trustvision classifier.

    ``forward(x)`` takes images in [0, 1] of shape (N, C, H, W) and returns logits (N, num_classes);
    the per-channel normalisation ``(x - mean) / std`` happens inside. ``features(x)`` returns the
    penultimate-layer features (N, F). Subclasses implement ``forward_features`` (on normalised
    input) and ``forward_head``.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int | Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        mean = [0.5] * self.in_chans if mean is None else list(mean)
        std = [0.5] * self.in_chans if std is None else list(std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ValueError("mean and std need one value per input channel")
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Filled by trustvision.models.create / load: everything needed to rebuild the model.
        self.tv_config: dict = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))
