"""Streaming a split batch by batch: :func:`image_batches` (slices of a split held in memory, a
torch ``DataLoader`` in order for anything else: workers, pinned memory on CUDA) and
:func:`loader_options` (the DataLoader processes every streamed pass uses, set by the audit's
``--num-workers``). Every layer above streams through these."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["image_batches", "loader_options"]


#: what :func:`image_batches` uses when its caller names no ``num_workers`` (see :func:`loader_options`)
_LOADER_DEFAULTS: dict[str, int] = {"num_workers": 0}


@contextlib.contextmanager
def loader_options(num_workers: int = 0) -> Iterator[None]:
    """Within the block, :func:`image_batches` (and so every streamed pass of the evaluate layer:
    model outputs, log p(x), the audit's predictions) decodes with ``num_workers`` DataLoader
    processes unless its caller names a number. The audit sets it from ``--num-workers``.

    Example:
        >>> with loader_options(num_workers=2):
        ...     _LOADER_DEFAULTS["num_workers"]
        2
    """
    old = dict(_LOADER_DEFAULTS)
    _LOADER_DEFAULTS["num_workers"] = max(0, int(num_workers))
    try:
        yield
    finally:
        _LOADER_DEFAULTS.clear()
        _LOADER_DEFAULTS.update(old)


def image_batches(data, batch_size: int = 256, *, num_workers: int | None = None,
                  device: torch.device | str = "cpu", labels: list | None = None):
    """Batches of images (B, C, H, W) from a tensor (slices), a dataset held in memory
    (:class:`~trustvision.data.TensorImageDataset`: slices of its tensors) or any dataset of
    (image, label, ...) items (a torch ``DataLoader`` in order, ``num_workers`` processes (default:
    :func:`loader_options`'), pinned memory when the model is on CUDA): a split is streamed, never
    held as one tensor. ``labels``: a list that receives the items' labels (datasets only)."""
    from trustvision.data._base import TensorImageDataset

    if isinstance(data, TensorImageDataset):
        images, ys = data.tensors()
        for i in range(0, len(data), batch_size):
            if labels is not None:
                labels.extend(ys[i: i + batch_size].tolist())
            yield images[i: i + batch_size]
        return
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i: i + batch_size]
        return
    from torch.utils.data import DataLoader

    workers = _LOADER_DEFAULTS["num_workers"] if num_workers is None else int(num_workers)
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                        persistent_workers=False)
    for item in loader:
        xb = item[0] if isinstance(item, (list, tuple)) else item
        if labels is not None and isinstance(item, (list, tuple)) and len(item) > 1:
            labels.extend(torch.as_tensor(item[1]).long().flatten().tolist())
        yield xb
