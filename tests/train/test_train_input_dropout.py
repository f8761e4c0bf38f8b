"""Input dropout drops whole pixels at rate 1 - keep_prob, only while training."""

from __future__ import annotations

import pytest
import torch

from trustvision.errors import TrustVisionError
from trustvision.train import InputDropout, drop_pixels, fit

from _train_toy import TinyNet, halves

FILL = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.2])
def test_fraction_of_dropped_pixels_and_whole_pixels(keep):
    x = torch.full((64, 3, 16, 16), 0.9)
    out = drop_pixels(x, keep, FILL, torch.Generator().manual_seed(0))
    dropped = out == FILL  # (N, 3, H, W)
    # whole pixels: all channels dropped together or none
    assert torch.equal(dropped.all(dim=1), dropped.any(dim=1))
    frac = dropped.all(dim=1).float().mean().item()
    n = 64 * 16 * 16
    sigma = (keep * (1 - keep) / n) ** 0.5
    assert abs(frac - (1 - keep)) < 4 * sigma
    assert torch.equal(out[~dropped], x[~dropped])  # kept pixels untouched, no rescaling
    assert torch.equal(x, torch.full_like(x, 0.9))  # input not modified


def test_dropped_pixels_are_zero_after_normalisation():
    net = TinyNet(in_chans=3, image_size=8, mean=[0.1, 0.2, 0.3])
    x = torch.full((8, 3, 8, 8), 0.9)
    out = drop_pixels(x, 0.5, net.norm_mean, torch.Generator().manual_seed(1))
    z = net.normalize(out)
    dropped = (out == net.norm_mean).all(dim=1, keepdim=True).expand_as(z)
    assert dropped.any() and torch.equal(z[dropped], torch.zeros(int(dropped.sum())))


def test_module_is_identity_in_eval_and_keep_one():
    drop = InputDropout(0.5, fill=FILL, generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(drop.eval()(x), x)
    assert not torch.equal(drop.train()(x), x)
    assert torch.equal(drop_pixels(x, 1.0, FILL), x)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "high"])
def test_bad_keep_prob(bad):
    with pytest.raises(TrustVisionError, match=r"\(0, 1\]"):
        InputDropout(bad)


def test_fit_drops_pixels_in_training_only():
    net = TinyNet(mean=[0.25])
    train = halves(64)
    train.images.clamp_(min=0.3)  # no natural pixel equals the fill value 0.25
    fit(net, train, train, epochs=2, lr=0.01, batch_size=32, input_dropout=0.7, progress=False)
    seen = torch.cat(net.seen_train)
    frac = (seen == 0.25).float().mean().item()
    assert abs(frac - 0.3) < 0.03
    evals = torch.cat(net.seen_eval)
    assert not (evals == 0.25).any()  # validation inputs are the clean images
    assert torch.equal(evals[:64], train.images)
