"""Training: a seeded, resumable loop with input dropout, augmentation and deep ensembles.

Example:
    >>> import torch
    >>> from trustvision import models
    >>> from trustvision.data import TensorImageDataset
    >>> from trustvision.train import fit
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(64, 1, 8, 8, generator=g)
    >>> y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    >>> ds = TensorImageDataset(x, y, ["low", "high"], "toy", "train")
    >>> net = models.create("small-cnn", num_classes=2, in_chans=1, image_size=8)
    >>> res = fit(net, ds, epochs=2, lr=1e-2, batch_size=16, progress=False)
    >>> len(res.history)
    2
"""

from trustvision.train.augment import RandomFlip, RandomShift, parse_augment
from trustvision.train.ensemble import fit_ensemble
from trustvision.train.input_dropout import InputDropout, drop_pixels
from trustvision.train.loop import EpochStats, TrainResult, evaluate_accuracy, fit, resolve_device
from trustvision.train.recipe import build_model, stored_run_settings, train_by_name

__all__ = [
    "fit",
    "fit_ensemble",
    "train_by_name",
    "stored_run_settings",
    "build_model",
    "evaluate_accuracy",
    "resolve_device",
    "TrainResult",
    "EpochStats",
    "InputDropout",
    "drop_pixels",
    "RandomShift",
    "RandomFlip",
    "parse_augment",
]
