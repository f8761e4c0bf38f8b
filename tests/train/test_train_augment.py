"""Augmentations are seeded, keep shapes and move pixels the way they claim."""

from __future__ import annotations

import pytest
import torch

from trustvision.errors import TrustVisionError
from trustvision.train import RandomFlip, RandomShift, parse_augment


def test_shift_is_a_translation_within_pad():
    x = torch.zeros(200, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = RandomShift(2)(x, torch.Generator().manual_seed(0))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.sum(dim=(1, 2, 3)).eq(1).all()  # one bright pixel, moved
    assert set(rows.tolist()) == set(range(2, 7)) and set(cols.tolist()) == set(range(2, 7))


def test_flip_and_seeding():
    x = torch.rand(100, 2, 5, 5)
    a = RandomFlip()(x, torch.Generator().manual_seed(0))
    b = RandomFlip()(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    same = (a == x).flatten(1).all(1)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and 30 < int(flipped.sum()) < 70


def test_parse_augment():
    assert parse_augment(None) is None and parse_augment("none") is None
    aug = parse_augment("shift:1,flip")
    assert tuple(aug(torch.rand(3, 1, 4, 4), torch.Generator().manual_seed(0)).shape) == (3, 1, 4, 4)
    with pytest.raises(TrustVisionError, match="unknown augmentation"):
        parse_augment("rotate")
    with pytest.raises(TrustVisionError, match="shift:2"):
        parse_augment("shift:x")
