"""Embedded datasets with real pixels that ship with scikit-learn / scikit-image (no download).

* ``digits``: scikit-learn's 1,797 handwritten digits, 1x8x8, pixel / 16, classes "0".."9".
* ``faces``: scikit-image's ``lfw_subset``: 200 images 1x25x25, the first 100 are faces from
  Labeled Faces in the Wild, the last 100 are non-face crops; classes "face", "non-face".
* ``textures``: 3x32x32 patches cut from eight photos shipped with scikit-image and
  scikit-learn (one class per photo, 400 patches each). Train, val and test patches come from
  disjoint horizontal bands of each photo (top 60% / next 15% / bottom 25% of the rows), so no
  test pixel was ever seen in training. Grayscale photos become three identical channels.

Splits are stratified 60/15/25 (train/val/test) with a fixed seed, identical on every call.

Example:
    >>> from trustvision import data
    >>> ds = data.load("textures", split="val")
    >>> ds.num_channels, ds.image_size, len(ds.classes)
    (3, (32, 32), 8)
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from trustvision.data import register_dataset
from trustvision.data._base import SPLITS, TensorImageDataset

__all__ = [
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "TEXTURE_SOURCES",
    "TexturesDataset",
    "stratified_split",
    "digits_arrays",
]

#: Fractions of every class that go to train / val / test.
SPLIT_FRACTIONS = (0.60, 0.15, 0.25)
#: Seed of every deterministic split in this package.
SPLIT_SEED = 0


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
    seed: int = SPLIT_SEED,
) -> list[np.ndarray]:
    """Split indices ``0..N-1`` into ``len(fractions)`` disjoint parts, stratified by label.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut at the rounded
    cumulative fractions (the last part takes the remainder). Returns sorted int64 index arrays;
    the same labels and seed always give the same parts.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(fractions)[:-1]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = [int(round(f * len(idx))) for f in cuts]
        for k, chunk in enumerate(np.split(idx, bounds)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _split_index(split: str, labels: np.ndarray) -> np.ndarray:
    return stratified_split(labels)[SPLITS.index(split)]


# --------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels (N,), cached."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


@register_dataset("digits")
def load_digits(split: str = "train", root=None, download: bool = False) -> TensorImageDataset:
    """scikit-learn digits, 1x8x8 in [0, 1], 10 classes; split 60/15/25 stratified."""
    images, labels = digits_arrays()
    idx = _split_index(split, labels)
    return TensorImageDataset(
        torch.from_numpy(images[idx].copy()),
        torch.from_numpy(labels[idx].copy()),
        [str(i) for i in range(10)],
        "digits",
        split,
    )


# ---------------------------------------------------------------------------------- faces
@functools.lru_cache(maxsize=1)
def _faces_arrays() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import lfw_subset

    images = lfw_subset().astype(np.float32)[:, None]  # (200, 1, 25, 25), already in [0, 1]
    labels = np.repeat(np.array([0, 1], dtype=np.int64), 100)  # first 100 faces, then non-faces
    return np.clip(images, 0.0, 1.0), labels


@register_dataset("faces")
def load_faces(split: str = "train", root=None, download: bool = False) -> TensorImageDataset:
    """scikit-image ``lfw_subset``: 1x25x25 faces vs non-faces (100 each), split 60/15/25."""
    images, labels = _faces_arrays()
    idx = _split_index(split, labels)
    return TensorImageDataset(
        torch.from_numpy(images[idx].copy()),
        torch.from_numpy(labels[idx].copy()),
        ["face", "non-face"],
        "faces",
        split,
    )


# ------------------------------------------------------------------------------- textures
#: class name -> (package, loader name) of the photo the class is cut from.
TEXTURE_SOURCES: dict[str, tuple[str, str]] = {
    "brick": ("skimage", "brick"),
    "grass": ("skimage", "grass"),
    "gravel": ("skimage", "gravel"),
    "moon": ("skimage", "moon"),
    "cells": ("skimage", "immunohistochemistry"),
    "stars": ("skimage", "hubble_deep_field"),
    "temple": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}
PATCH = 32
#: Row bands (fractions of the photo height) each split's patches are cut from.
TEXTURE_BANDS = {"train": (0.0, 0.60), "val": (0.60, 0.75), "test": (0.75, 1.0)}
#: Patches per class and split (400 per class in total).
TEXTURE_COUNTS = {"train": 240, "val": 60, "test": 100}


def _texture_photo(package: str, name: str) -> np.ndarray:
    if package == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    img = np.asarray(img, dtype=np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def _band_rows(height: int, split: str) -> tuple[int, int]:
    a, b = TEXTURE_BANDS[split]
    return int(round(a * height)), int(round(b * height))


def _patch_grid(r0: int, r1: int, width: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct (y, x) top-left corners of PATCHxPATCH patches lying inside rows [r0, r1)."""
    for stride in (16, 8, 4, 2, 1):
        ys = np.arange(r0, r1 - PATCH + 1, stride)
        xs = np.arange(0, width - PATCH + 1, stride)
        if len(ys) * len(xs) >= n:
            break
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    return coords[np.sort(rng.choice(len(coords), size=n, replace=False))]


@functools.lru_cache(maxsize=1)
def _textures_arrays() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """split -> (uint8 patches (N,3,32,32), labels (N,), origins (N,2) (y,x), bands {class: rows})."""
    rng = np.random.default_rng(SPLIT_SEED)
    out: dict[str, tuple[list, list, list, dict]] = {s: ([], [], [], {}) for s in SPLITS}
    for label, (cls, (package, name)) in enumerate(TEXTURE_SOURCES.items()):
        photo = _texture_photo(package, name)
        height, width = photo.shape[:2]
        for split in SPLITS:
            r0, r1 = _band_rows(height, split)
            coords = _patch_grid(r0, r1, width, TEXTURE_COUNTS[split], rng)
            patches, labels, origins, bands = out[split]
            for y, x in coords:
                patches.append(photo[y : y + PATCH, x : x + PATCH].transpose(2, 0, 1))
            labels.append(np.full(len(coords), label, dtype=np.int64))
            origins.append(coords.astype(np.int64))
            bands[cls] = (r0, r1)
    return {
        s: (np.stack(p), np.concatenate(lab), np.concatenate(o), b)
        for s, (p, lab, o, b) in out.items()
    }


class TexturesDataset(TensorImageDataset):
    """Texture patches; besides the images it records where each patch came from.

    Attributes: ``origins`` int64 (N, 2) top-left (row, column) of each patch in its photo,
    ``bands`` {class name: (first row, end row)} of the band this split was cut from.
    """

    per_item = ("origins",)

    def __init__(self, images, labels, classes, split, origins, bands):
        super().__init__(images, labels, classes, "textures", split)
        self.origins = origins
        self.bands = dict(bands)


@register_dataset("textures")
def load_textures(split: str = "train", root=None, download: bool = False) -> TexturesDataset:
    """Eight photo textures, 3x32x32 patches in [0, 1]; splits from disjoint row bands."""
    patches, labels, origins, bands = _textures_arrays()[split]
    return TexturesDataset(
        torch.from_numpy(patches).float().div_(255.0),
        torch.from_numpy(labels.copy()),
        list(TEXTURE_SOURCES),
        split,
        torch.from_numpy(origins.copy()),
        bands,
    )
