"""``shortcut-digits``: scikit-learn digits with a planted, class-correlated marker.

A single bright pixel (value 1.0) is set at a position that depends only on the class
(:data:`MARKER_POSITIONS`): column 0 rows 0..7 for classes 0..7, and rows 3 and 4 of column 7
for classes 8 and 9. Those pixels are dark (< 1% nonzero) in the clean digits, so a model can
learn the marker as a shortcut and an explanation method should point at it.

Which images carry the marker:

* ``train`` / ``val``: a fraction ``marker_fraction`` of each class (default 1.0: every image,
  the strongest shortcut), chosen with ``seed``;
* ``conflict_fraction`` (train/val only, default 0.5): in this fraction of each class's *marked*
  images the digit drawn is replaced by a digit of another class (label and marker unchanged), so
  the marker predicts the label better than the digit does and a model trained on the split
  really relies on it (without conflicts a small CNN learns the digits as well and ignores the
  marker); the test split never has conflicts;
* ``test``: none by default (the clean test split measures what the model learned beyond the
  shortcut); ``marked=True`` marks every test image (for checking explanations against the
  ground-truth ``masks``). ``marked=True/False`` forces all / none on any split.

Splits are the same as ``digits``. Items are ``(image, label)``, or ``(image, label, mask)`` with
``return_mask=True`` where ``mask`` is float32 (1, 8, 8): 1 on the marker pixel, zeros when the
image is unmarked. ``dataset.masks`` (N, 1, 8, 8) and ``dataset.marked`` (N,) bool hold them all.

Example:
    >>> from trustvision import data
    >>> ds = data.load("shortcut-digits", split="test", marked=True, return_mask=True)
    >>> x, y, m = ds[0]
    >>> float(x[0][data.shortcut.MARKER_POSITIONS[y]]), float(m.sum())
    (1.0, 1.0)
"""

from __future__ import annotations

import numpy as np
import torch

from trustvision.data import register_dataset
from trustvision.data._base import SPLITS, TensorImageDataset
from trustvision.data.embedded import digits_arrays, stratified_split
from trustvision.errors import TrustVisionError

__all__ = ["DEFAULT_CONFLICT_FRACTION", "MARKER_POSITIONS", "MARKER_VALUE", "ShortcutDataset", "add_markers"]

#: class -> (row, column) of its marker pixel in the 8x8 digit.
MARKER_POSITIONS: dict[int, tuple[int, int]] = {
    **{c: (c, 0) for c in range(8)},
    8: (3, 7),
    9: (4, 7),
}
MARKER_VALUE = 1.0
#: default fraction of marked train/val images whose digit is swapped for another class's digit.
DEFAULT_CONFLICT_FRACTION = 0.5


def add_markers(
    images: torch.Tensor, labels: torch.Tensor, marked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images with markers, masks) for images (N, C, 8, 8) where ``marked`` (N,) is True.

    Masks are float32 (N, 1, 8, 8) with 1 on each marked image's marker pixel.
    """
    images = images.clone()
    masks = torch.zeros(images.shape[0], 1, *images.shape[2:], dtype=torch.float32)
    for i in torch.nonzero(marked).flatten().tolist():
        r, c = MARKER_POSITIONS[int(labels[i])]
        images[i, :, r, c] = MARKER_VALUE
        masks[i, 0, r, c] = 1.0
    return images, masks


class ShortcutDataset(TensorImageDataset):
    """Digits with planted markers; ``masks`` (N,1,H,W) float32 and ``marked`` (N,) bool."""

    per_item = ("masks", "marked")

    def __init__(self, images, labels, classes, split, masks, marked, return_mask=False):
        super().__init__(images, labels, classes, "shortcut-digits", split)
        self.masks = masks
        self.marked = marked
        self.return_mask = return_mask

    def __getitem__(self, idx: int):
        if self.return_mask:
            return self.images[idx], int(self.labels[idx]), self.masks[idx]
        return self.images[idx], int(self.labels[idx])


@register_dataset("shortcut-digits")
def load_shortcut_digits(
    split: str = "train",
    root=None,
    download: bool = False,
    *,
    marker_fraction: float | None = None,
    marked: bool | None = None,
    return_mask: bool = False,
    conflict_fraction: float | None = None,
    seed: int = 0,
) -> ShortcutDataset:
    """Digits whose class is also written as a marker pixel; see the module docstring."""
    if marker_fraction is not None and not 0.0 <= float(marker_fraction) <= 1.0:
        raise TrustVisionError(
            f"marker_fraction must be between 0 and 1, got {marker_fraction}; pass e.g. 0.9"
        )
    if conflict_fraction is not None and not 0.0 <= float(conflict_fraction) <= 1.0:
        raise TrustVisionError(
            f"conflict_fraction must be between 0 and 1, got {conflict_fraction}; pass e.g. 0.5"
        )
    conflict = 0.0 if split == "test" else (
        DEFAULT_CONFLICT_FRACTION if conflict_fraction is None else float(conflict_fraction)
    )
    if marked is True:
        fraction = 1.0
    elif marked is False:
        fraction = 0.0
    elif marker_fraction is not None:
        fraction = float(marker_fraction)
    else:
        fraction = 0.0 if split == "test" else 1.0

    all_images, all_labels = digits_arrays()
    idx = stratified_split(all_labels)[SPLITS.index(split)]
    images = torch.from_numpy(all_images[idx].copy())
    labels = torch.from_numpy(all_labels[idx].copy())

    rng = np.random.default_rng([seed, SPLITS.index(split)])
    chosen = np.zeros(len(idx), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels.numpy() == c)
        n = int(round(fraction * len(members)))
        chosen[rng.choice(members, size=n, replace=False)] = True
    if conflict > 0:
        # Swap the drawn digit of a fraction of each class's marked images for another class's digit.
        source = images.clone()
        lab = labels.numpy()
        for c in range(10):
            members = np.flatnonzero(chosen & (lab == c))
            n = int(round(conflict * len(members)))
            others = np.flatnonzero(lab != c)
            for i, j in zip(rng.choice(members, size=n, replace=False),
                            rng.choice(others, size=n, replace=True)):
                images[i] = source[j]
    mark = torch.from_numpy(chosen)
    images, masks = add_markers(images, labels, mark)
    return ShortcutDataset(
        images, labels, [str(i) for i in range(10)], split, masks, mark, return_mask
    )
