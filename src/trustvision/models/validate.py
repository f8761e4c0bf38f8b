"""Check that a model fits a dataset before spending time on training or an audit."""

from __future__ import annotations

import torch
from torch import nn

from trustvision.data import ImageDataset, as_image_dataset
from trustvision.errors import TrustVisionError

__all__ = ["check_compatible"]


def _labels(dataset: ImageDataset) -> torch.Tensor:
    """All labels of ``dataset`` as a 1-D long tensor (fast path: a ``labels``/``targets``
    attribute, else ``dataset.tensors()``)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is not None:
        return torch.as_tensor(labels).long().flatten()
    return dataset.tensors()[1].long().flatten()


def _sample_batch(dataset: ImageDataset, n: int) -> torch.Tensor:
    return dataset.subset(range(min(n, len(dataset)))).tensors()[0].float()


def _size(s) -> tuple[int, int]:
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def check_compatible(model: nn.Module, dataset, n: int = 8) -> None:
    """Raise a one-line :class:`TrustVisionError` when ``model`` cannot classify ``dataset``.

    Checks, in order: channel count (``model.in_chans`` vs ``dataset.num_channels``), image size
    (``model.image_size`` vs ``dataset.image_size``), labels in ``range(model.num_classes)``
    (all labels are scanned, via ``dataset.labels`` when present, else ``dataset.tensors()``), and
    that the model maps a batch of ``n`` images (N, C, H, W) to logits of shape (N, num_classes).
    Attributes the model lacks are skipped; the model's train/eval mode is left unchanged.
    A dataset that is not an :class:`~trustvision.data.ImageDataset` goes through
    :func:`trustvision.data.as_image_dataset` first.
    """
    if not isinstance(dataset, ImageDataset):
        dataset = as_image_dataset(dataset)
    name = getattr(dataset, "name", "the dataset")
    in_chans = getattr(model, "in_chans", None)
    channels = getattr(dataset, "num_channels", None)
    if in_chans is not None and channels is not None and int(in_chans) != int(channels):
        raise TrustVisionError(
            f"dataset {name!r} has {channels}-channel images but the model expects {in_chans} "
            f"channels; use a model built with in_chans={channels}"
        )
    msize = getattr(model, "image_size", None)
    dsize = getattr(dataset, "image_size", None)
    if msize is not None and dsize is not None and _size(msize) != _size(dsize):
        (mh, mw), (dh, dw) = _size(msize), _size(dsize)
        raise TrustVisionError(
            f"dataset {name!r} has {dh}x{dw} images but the model was built for {mh}x{mw}; "
            f"use a model built with image_size=({dh}, {dw}) or resize the images"
        )
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    if len(dataset) == 0:
        raise TrustVisionError(f"dataset {name!r} is empty; check its path and split")
    labels = _labels(dataset)
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= int(num_classes):
            raise TrustVisionError(
                f"dataset {name!r} has labels {lo}..{hi} but the model has {num_classes} classes "
                f"(labels 0..{int(num_classes) - 1}); use a model built with "
                f"num_classes={max(hi + 1, int(num_classes))} or fix the labels"
            )
    x = _sample_batch(dataset, n)
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TrustVisionError(
            f"the model fails on a batch of shape {tuple(x.shape)} from {name!r} ({msg}); "
            "make forward accept (N, C, H, W) images in [0, 1]"
        ) from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out):
        raise TrustVisionError(
            f"the model returned {type(out).__name__}, not a tensor; make forward return logits "
            "of shape (N, num_classes)"
        )
    expected = (x.shape[0], int(num_classes)) if num_classes is not None else None
    if out.ndim != 2 or (expected is not None and tuple(out.shape) != expected):
        want = f"({expected[0]}, {expected[1]})" if expected else "(N, num_classes)"
        raise TrustVisionError(
            f"the model output has shape {tuple(out.shape)} but {want} logits are expected; make "
            "forward return logits of shape (N, num_classes), e.g. squeeze or flatten extra "
            "dimensions, and set num_classes to the number of classes"
        )
