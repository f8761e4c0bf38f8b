"""check_compatible: one-line errors naming the problem and the fix."""

import pytest
import torch
from torch import nn

from trustvision import TrustVisionError, models
from trustvision.data._base import ImageDataset, TensorImageDataset


def _ds(n=12, c=1, h=8, w=8, k=3, labels=None):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k if labels is None else torch.as_tensor(labels)
    return TensorImageDataset(torch.rand(n, c, h, w, generator=g), y,
                              [str(i) for i in range(k)], "toy", "train")


def _err(model, ds, match):
    with pytest.raises(TrustVisionError, match=match) as e:
        models.check_compatible(model, ds)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_compatible_passes_and_keeps_mode():
    m = models.create("small-cnn", 3, 1, 8)
    assert m.training
    models.check_compatible(m, _ds())
    assert m.training  # mode restored
    m.eval()
    models.check_compatible(m, _ds())
    assert not m.training


def test_wrong_channels():
    msg = _err(models.create("small-cnn", 3, 3, 8), _ds(c=1), "1-channel images.*expects 3")
    assert "in_chans=1" in msg


def test_wrong_image_size():
    msg = _err(models.create("small-cnn", 3, 1, 32), _ds(h=8, w=8), "8x8 images.*32x32")
    assert "image_size=(8, 8)" in msg


def test_labels_out_of_range():
    msg = _err(models.create("small-cnn", 3, 1, 8), _ds(k=5, labels=[0, 1, 4, 2]),
               "labels 0..4.*3 classes")
    assert "num_classes=5" in msg
    _err(models.create("small-cnn", 3, 1, 8), _ds(labels=[0, -1, 2]), "labels -1..2")


class _ListDataset(ImageDataset):
    """No tensors(): exercises the .labels fast path and per-item fallback."""

    def __init__(self, labels, with_attr):
        self.name, self.split, self.classes = "plain", "test", ["a", "b"]
        self.image_size, self.num_channels = (8, 8), 1
        self._y = labels
        if with_attr:
            self.labels = labels

    def __len__(self):
        return len(self._y)

    def __getitem__(self, i):
        return torch.rand(1, 8, 8), self._y[i]


@pytest.mark.parametrize("with_attr", [True, False])
def test_label_scan_without_tensors(with_attr):
    m = models.create("small-cnn", 2, 1, 8)
    models.check_compatible(m, _ListDataset([0, 1, 1, 0], with_attr))
    _err(m, _ListDataset([0, 1, 7, 0], with_attr), "labels 0..7.*2 classes")


class _BadShape(nn.Module):
    """A user model returning (N, 1, num_classes) or the wrong class count."""

    def __init__(self, shape_fn, num_classes=3):
        super().__init__()
        self.num_classes, self.in_chans, self.image_size = num_classes, 1, (8, 8)
        self.lin = nn.Linear(64, 10)
        self.shape_fn = shape_fn

    def forward(self, x):
        return self.shape_fn(self.lin(x.flatten(1)))


def test_wrong_output_shape():
    ds = _ds(k=3)
    msg = _err(_BadShape(lambda z: z[:, None, :3]), ds, r"shape \(8, 1, 3\).*\(8, 3\)")
    assert "(N, num_classes)" in msg
    _err(_BadShape(lambda z: z), ds, r"shape \(8, 10\) but \(8, 3\)")
    _err(_BadShape(lambda z: (z, z)), ds, "returned tuple")
    _err(_BadShape(lambda z: z @ torch.ones(3, 3)), ds, "fails on a batch of shape")
