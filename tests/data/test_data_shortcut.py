"""shortcut-digits: marker position per class, fractions, masks, the clean test split."""

import pytest
import torch

from trustvision import data
from trustvision.data.shortcut import MARKER_POSITIONS
from trustvision.errors import TrustVisionError


def test_marker_positions_are_distinct_and_dark_in_clean_digits():
    assert len(set(MARKER_POSITIONS.values())) == 10
    clean = torch.cat([data.load("digits", s).images for s in ("train", "val", "test")])
    for r, c in MARKER_POSITIONS.values():
        assert (clean[:, 0, r, c] > 0).float().mean() < 0.02


def test_train_images_carry_their_class_marker_and_masks_match():
    ds = data.load("shortcut-digits", split="train", return_mask=True, conflict_fraction=0.0)
    clean = data.load("digits", split="train")
    assert torch.equal(ds.labels, clean.labels) and ds.marked.all()
    assert ds.masks.shape == (len(ds), 1, 8, 8) and ds.masks.dtype == torch.float32
    for i in range(len(ds)):
        x, y, m = ds[i]
        r, c = MARKER_POSITIONS[y]
        assert x[0, r, c] == 1.0 and m[0, r, c] == 1.0 and m.sum() == 1.0
        # every other pixel is the clean digit
        assert torch.equal(x * (1 - m), clean.images[i] * (1 - m))


@pytest.mark.parametrize("split", ["train", "val"])
def test_conflicting_digits_make_the_marker_the_only_reliable_cue(split):
    ds = data.load("shortcut-digits", split=split)  # default conflict_fraction 0.5
    clean = data.load("digits", split=split)
    assert torch.equal(ds.labels, clean.labels) and ds.marked.all()
    pool = clean.images.flatten(1)
    swapped = torch.zeros(len(ds), dtype=torch.bool)
    for i in range(len(ds)):
        x = (ds.images[i] * (1 - ds.masks[i])).flatten()
        if torch.equal(x, (clean.images[i] * (1 - ds.masks[i])).flatten()):
            continue
        swapped[i] = True
        # a swapped image shows the digit of some image of another class (marker pixel aside)
        keep = (1 - ds.masks[i]).flatten().bool()
        same = (pool[:, keep] == x[keep]).all(dim=1)
        assert (clean.labels[same] != ds.labels[i]).any()
    for c in range(10):
        in_class = ds.labels == c
        assert abs(swapped[in_class].float().mean().item() - 0.5) <= 0.5 / in_class.sum() + 1e-6
    # every image still carries the marker of its label
    for i in range(len(ds)):
        r, c = MARKER_POSITIONS[int(ds.labels[i])]
        assert ds.images[i, 0, r, c] == 1.0


def test_conflict_fraction_is_validated():
    with pytest.raises(TrustVisionError, match="conflict_fraction"):
        data.load("shortcut-digits", conflict_fraction=2)


def test_clean_test_split_has_no_marker_and_marked_test_has_all():
    clean = data.load("shortcut-digits", split="test")
    ref = data.load("digits", split="test")
    assert not clean.marked.any() and clean.masks.sum() == 0
    assert torch.equal(clean.images, ref.images)
    assert len(clean[0]) == 2
    marked = data.load("shortcut-digits", split="test", marked=True, return_mask=True)
    assert marked.marked.all()
    diff = (marked.images != ref.images).float()
    assert torch.all(diff <= marked.masks)  # only marker pixels changed
    for i, y in enumerate(marked.labels.tolist()):
        r, c = MARKER_POSITIONS[y]
        assert marked.images[i, 0, r, c] == 1.0 and marked.masks[i, 0, r, c] == 1.0


def test_marker_fraction_is_per_class_and_seeded():
    a = data.load("shortcut-digits", split="train", marker_fraction=0.5, seed=1)
    b = data.load("shortcut-digits", split="train", marker_fraction=0.5, seed=1)
    c = data.load("shortcut-digits", split="train", marker_fraction=0.5, seed=2)
    assert torch.equal(a.marked, b.marked) and torch.equal(a.images, b.images)
    assert not torch.equal(a.marked, c.marked)
    for k in range(10):
        members = a.labels == k
        assert abs(a.marked[members].float().mean().item() - 0.5) < 0.01
    assert torch.equal(a.masks.flatten(1).sum(1) > 0, a.marked)
    none = data.load("shortcut-digits", split="val", marked=False)
    assert not none.marked.any()


def test_bad_marker_fraction_is_a_one_line_error():
    with pytest.raises(TrustVisionError) as e:
        data.load("shortcut-digits", marker_fraction=1.5)
    assert "marker_fraction" in str(e.value) and "\n" not in str(e.value)
