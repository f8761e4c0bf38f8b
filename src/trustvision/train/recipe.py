"""Train a registered model on a registered dataset by name (what ``trustvision train`` runs)."""

from __future__ import annotations

import os
from typing import Any

import torch

from trustvision.errors import TrustVisionError
from trustvision.train.augment import parse_augment
from trustvision.train.ensemble import fit_ensemble
from trustvision.train.input_dropout import check_keep_prob
from trustvision.train.loop import TrainResult, check_train_args, fit, resolve_device

__all__ = ["build_model", "train_by_name"]


def build_model(name: str, dataset, seed: int = 0, ensemble: int | None = None, **model_kwargs):
    """Create model ``name`` sized for ``dataset`` (classes, channels, image size), seeded.

    With ``ensemble=N`` (N >= 2) returns ``models.create("ensemble", member=name, n=N, ...)``.
    The caller's global RNG state is left untouched.
    """
    from trustvision import models

    common = dict(num_classes=dataset.num_classes, in_chans=dataset.num_channels,
                  image_size=tuple(dataset.image_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ensemble is not None and ensemble > 1:
            if name == "ensemble":
                raise TrustVisionError("--ensemble N needs a member architecture, e.g. --model small-cnn")
            model = models.create("ensemble", **common, member=name, n=int(ensemble),
                                  member_kwargs=dict(model_kwargs))
        else:
            try:
                model = models.create(name, **common, **model_kwargs)
            except TypeError as exc:
                raise TrustVisionError(
                    f"model {name!r} does not accept these options ({exc}); check --model-kw"
                ) from None
    check = getattr(models, "check_compatible", None)
    if callable(check):
        check(model, dataset)
    return model


def train_by_name(
    data: str,
    model: str,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    opt: str = "adam",
    weight_decay: float = 0.0,
    input_dropout: float | None = None,
    ensemble: int | None = None,
    augment: str | None = None,
    sched: str = "cosine",
    grad_clip: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
) -> tuple[torch.nn.Module, TrainResult]:
    """Load ``data`` (train/val/test), build ``model`` and train it; returns ``(model, result)``.

    Under ``torchrun`` every process runs this and :func:`fit` trains data-parallel.
    """
    from trustvision import data as tv_data

    if ensemble is not None and (isinstance(ensemble, bool) or int(ensemble) < 1):
        raise TrustVisionError(f"--ensemble needs a number of members >= 1, got {ensemble}")
    if input_dropout is not None:
        check_keep_prob(input_dropout)
    check_train_args(epochs, lr, batch_size, opt, weight_decay, sched, grad_clip)
    resolve_device(device)
    from trustvision.train import distributed

    if ensemble is not None and ensemble > 1 and distributed.is_launched():
        raise TrustVisionError("--ensemble trains its members one after another in one process; "
                               "run it without torchrun")
    aug = parse_augment(augment)
    train_set = tv_data.load(data, split="train", root=data_root, download=download)
    val_set = tv_data.load(data, split="val", root=data_root, download=download)
    test_set = tv_data.load(data, split="test", root=data_root, download=download)
    net = build_model(model, train_set, seed=seed, ensemble=ensemble, **(model_kwargs or {}))
    kw = dict(epochs=epochs, lr=lr, batch_size=batch_size, device=device, out=out, resume=resume,
              opt=opt, weight_decay=weight_decay, input_dropout=input_dropout, progress=progress,
              test_set=test_set, augment=aug, sched=sched, grad_clip=grad_clip, seed=seed)
    if ensemble is not None and ensemble > 1:
        result = fit_ensemble(net, train_set, val_set, **kw)
    else:
        result = fit(net, train_set, val_set, **kw)
    return net, result
