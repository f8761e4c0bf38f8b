"""One dataset-to-tensors path (tensors(), subset(), random_subset) and as_image_dataset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from trustvision import TrustVisionError, data
from trustvision.data import ImageDataset, TensorImageDataset


class _Lazy(ImageDataset):
    """An ImageDataset without stored tensors: items computed on access."""

    def __init__(self, n=300):
        self.name, self.split, self.classes = "lazy", "val", ["a", "b", "c"]
        self.image_size, self.num_channels = (4, 5), 2
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(2, 4, 5, generator=g), i % 3


def test_tensors_of_a_non_tensor_dataset():
    ds = _Lazy()
    x, y = ds.tensors()
    assert x.shape == (300, 2, 4, 5) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == [i % 3 for i in range(300)]
    assert torch.equal(x[257], ds[257][0])  # more than one DataLoader batch, in order
    empty = _Lazy(0).tensors()
    assert empty[0].shape == (0, 2, 4, 5) and empty[1].shape == (0,)


def test_subset_keeps_metadata_and_order():
    ds = _Lazy()
    sub = ds.subset([5, 2, -1])
    assert isinstance(sub, ImageDataset) and len(sub) == 3
    assert (sub.name, sub.split, sub.classes, sub.image_size, sub.num_channels) == (
        "lazy", "val", ["a", "b", "c"], (4, 5), 2)
    x, y = sub.tensors()
    assert y.tolist() == [2, 2, 299 % 3] and torch.equal(x[0], ds[5][0])
    assert torch.equal(sub.subset([1]).tensors()[0][0], ds[2][0])  # subset of a subset
    with pytest.raises(IndexError):
        ds.subset([300])


def test_tensor_subset_is_a_tensor_dataset_of_the_same_kind():
    digits = data.load("digits", split="test")
    sub = digits.subset(torch.tensor([3, 1, 4]))
    assert type(sub) is TensorImageDataset and sub.name == "digits" and sub.split == "test"
    assert torch.equal(sub.tensors()[0], digits.tensors()[0][[3, 1, 4]])
    marked = data.load("shortcut-digits", split="test", marked=True, return_mask=True)
    part = marked.subset(range(2, 6))
    assert type(part) is type(marked) and part.return_mask
    assert torch.equal(part[1][2], marked[3][2]) and torch.equal(part.marked, marked.marked[2:6])
    tex = data.load("textures", split="val")
    assert torch.equal(tex.subset([7]).origins, tex.origins[[7]])
    assert len(digits) == 450  # the parent is untouched


def test_array_dataset_tensors_and_subset_match_items():
    from trustvision.data.torchvision_sets import ArrayImageDataset

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (10, 1, 3, 3), generator=g, dtype=torch.uint8)
    ds = ArrayImageDataset(pixels, torch.arange(10) % 2, [1, 4, 6, 9], ["x", "y"], "arr", "train")
    x, y = ds.tensors()
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(4)]))
    assert y.tolist() == [1, 0, 0, 1]
    sub = ds.subset([3, 0])
    assert type(sub) is ArrayImageDataset and torch.equal(sub.tensors()[0], x[[3, 0]])
    assert sub.labels.tolist() == [1, 1] and ds.labels.tolist() == [1, 0, 0, 1]


def test_random_subset_is_public_and_reads_only_the_drawn_items():
    from trustvision.data import _base

    assert data.random_subset is _base.random_subset
    digits = data.load("digits", split="test")
    x, y, idx = data.random_subset(digits, 5, torch.Generator().manual_seed(3))
    ref = torch.randperm(450, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(idx, ref) and torch.equal(x, digits.images[ref])
    assert torch.equal(y, digits.labels[ref])

    class _Counting(_Lazy):
        reads = 0

        def __getitem__(self, i):
            type(self).reads += 1
            return super().__getitem__(i)

    lazy = _Counting()
    x, y, idx = data.random_subset(lazy, 4, torch.Generator().manual_seed(0))
    assert _Counting.reads == 4 and torch.equal(x[2], _Lazy()[int(idx[2])][0])


def test_one_splits_constant():
    from trustvision.data import _base, embedded

    assert data.SPLITS == ("train", "val", "test")
    assert data.SPLITS is _base.SPLITS is embedded.SPLITS


# -- as_image_dataset --------------------------------------------------------------------------

def _xy(n=12, k=3, c=1):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, 8, 8, generator=g), torch.arange(n) % k


def test_image_dataset_is_returned_as_is():
    digits = data.load("digits", split="test")
    assert data.as_image_dataset(digits) is digits


def test_tensor_dataset_uses_its_tensors():
    x, y = _xy()
    ds = data.as_image_dataset(TensorDataset(x, y), name="toy", split="val")
    assert isinstance(ds, TensorImageDataset)
    assert (ds.name, ds.split, ds.classes, ds.image_size, ds.num_channels) == (
        "toy", "val", ["0", "1", "2"], (8, 8), 1)
    assert torch.equal(ds.tensors()[0], x) and torch.equal(ds.tensors()[1], y)
    assert data.as_image_dataset(TensorDataset(x, y)).split == "test"


def test_tuple_and_classes():
    x, y = _xy(k=2)
    ds = data.as_image_dataset((x, y), classes=["cat", "dog", "eel"])
    assert ds.classes == ["cat", "dog", "eel"] and ds.name == "tensors" and len(ds) == 12
    ds = data.as_image_dataset((x.numpy(), y.numpy()))
    assert torch.equal(ds.tensors()[0], x) and ds.classes == ["0", "1"]


class _Pairs(Dataset):
    classes = ["zero", "one", "two", "three"]

    def __init__(self):
        self.x, self.y = _xy(n=10, k=3, c=3)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_dataset_with_classes_attribute_and_dataloaders():
    ds = data.as_image_dataset(_Pairs())
    assert ds.classes == ["zero", "one", "two", "three"] and ds.name == "_Pairs"
    assert ds.num_channels == 3 and torch.equal(ds.tensors()[0], _Pairs().x)
    via_loader = data.as_image_dataset(DataLoader(_Pairs(), batch_size=4, shuffle=True))
    assert via_loader.classes == ds.classes  # the loader's dataset, in its own order
    assert torch.equal(via_loader.tensors()[0], ds.tensors()[0])
    x, y = _xy()
    assert torch.equal(data.as_image_dataset(DataLoader(TensorDataset(x, y), batch_size=5))
                       .tensors()[1], y)

    class _Stream(IterableDataset):
        def __iter__(self):
            return iter((x[i], int(y[i])) for i in range(len(y)))

    streamed = data.as_image_dataset(DataLoader(_Stream(), batch_size=5))
    assert torch.equal(streamed.tensors()[0], x) and streamed.classes == ["0", "1", "2"]


def _err(obj, match, **kw):
    with pytest.raises(TrustVisionError, match=match) as e:
        data.as_image_dataset(obj, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_errors_are_one_line_and_name_the_fix():
    x, y = _xy()
    msg = _err((x * 2 - 1, y), r"in \[0, 1\], got values in \[-")
    assert "normalisation belongs inside the model" in msg
    _err(TensorDataset(x + 0.5, y), r"in \[0, 1\]")
    _err((x.clone().fill_(float("nan")), y), r"in \[0, 1\]")
    assert "unsqueeze(1)" in _err((x[:, 0], y), r"must be \(N, C, H, W\), got shape \(12, 8, 8\)")
    assert "y.long()" in _err((x, y.float()), "labels .* must be integer class indices, got torch.float32")
    _err(TensorDataset(x, y.float()), "integer class indices")
    _err(((x * 255).to(torch.uint8), y), r"must be float in \[0, 1\], got torch.uint8.*/ 255")
    _err((x, y[:5]), "12 images but 5 labels")
    _err((x, y), r"in \[0, 2\) for its 2 classes", classes=["a", "b"])
    _err((x, y - 1), r"got -1\.\.1")
    _err((x, torch.nn.functional.one_hot(y)), r"argmax\(1\)")
    _err(TensorDataset(x), "TensorDataset\\(images, labels\\)")
    _err(42, "cannot use int as a dataset")
    _err((x[:0], y[:0]), "empty")
