"""models.wrap: a plain nn.Module as an ImageClassifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustvision import TrustVisionError, models


def _plain(k=4, c=1, hw=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, k))


def test_num_classes_and_shape_from_example():
    plain = _plain(k=4)
    x = torch.rand(3, 1, 8, 8)
    net = models.wrap(plain, example=x)
    assert isinstance(net, models.ImageClassifier)
    assert (net.num_classes, net.in_chans, net.image_size) == (4, 1, (8, 8))
    assert net.tv_config == {"architecture": "wrapped:Sequential", "num_classes": 4, "in_chans": 1,
                             "image_size": [8, 8], "kwargs": {}}
    assert torch.equal(net(x), plain(x))  # no normalisation without mean/std
    # without features() on the module the features are the logits and the head the identity
    assert torch.equal(net.features(x), plain(x)) and torch.equal(net.forward_head(plain(x)), plain(x))
    models.check_compatible(net, _ds(k=4))


def _ds(k):
    from trustvision.data import TensorImageDataset

    return TensorImageDataset(torch.rand(6, 1, 8, 8), torch.arange(6) % k,
                              [str(i) for i in range(k)], "toy", "test")


def test_image_classifier_is_returned_unchanged():
    net = models.create("small-cnn", 3, 1, 8)
    assert models.wrap(net) is net


def test_normalisation_happens_inside():
    plain = _plain(k=2, c=3, hw=4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    net = models.wrap(plain, in_chans=3, image_size=4, mean=mean, std=std)
    x = torch.rand(5, 3, 4, 4)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert net.num_classes == 2 and torch.allclose(net(x), plain(xn), atol=1e-6)
    assert net.norm_mean.flatten().tolist() == pytest.approx(mean)


class _WithFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 8, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_module_features_are_used_and_flattened():
    m = _WithFeatures()
    net = models.wrap(m, example=torch.rand(2, 1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    assert net.num_classes == 3 and net.features(x).shape == (4, 128)
    assert torch.equal(net.features(x), m.features(x).flatten(1))


def test_mode_is_kept_and_probe_has_no_side_effects():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3))
    m.eval()
    before = m[2].running_mean.clone()
    net = models.wrap(m, in_chans=1, image_size=8)
    assert not net.training and not m.training and torch.equal(m[2].running_mean, before)
    m.train()
    net = models.wrap(m, num_classes=3, example=torch.rand(2, 1, 8, 8))
    assert net.training and m.training and torch.equal(m[2].running_mean, before)


@pytest.mark.parametrize("out,match", [
    (lambda z: z[:, None, :], r"shape \(2, 1, 3\).*\(N, num_classes\)"),
    (lambda z: z.sum(1), r"shape \(2,\)"),
    (lambda z: (z, z), "returned tuple"),
])
def test_bad_output_is_a_one_line_error(out, match):
    class _Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 3)

        def forward(self, x):
            return out(self.lin(x.flatten(1)))

    with pytest.raises(TrustVisionError, match=match) as e:
        models.wrap(_Bad(), example=torch.rand(2, 1, 8, 8))
    assert "\n" not in str(e.value)


def test_other_errors_name_the_fix():
    with pytest.raises(TrustVisionError, match="example=.*in_chans="):
        models.wrap(_plain())
    with pytest.raises(TrustVisionError, match=r"logits \(2, 5\)"):
        models.wrap(_plain(k=4), num_classes=5, in_chans=1, image_size=8)
    with pytest.raises(TrustVisionError, match="fails on a batch of shape"):
        models.wrap(_plain(), in_chans=3, image_size=8)
    with pytest.raises(TrustVisionError, match="one value per input channel"):
        models.wrap(_plain(), in_chans=1, image_size=8, mean=[0.5, 0.5], std=[0.5, 0.5])
    with pytest.raises(TrustVisionError, match="not a torch.nn.Module|needs a torch.nn.Module"):
        models.wrap(lambda x: x, in_chans=1, image_size=8)
