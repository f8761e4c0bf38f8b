"""One generative-classifier type: the GenerativeClassifier contract and is_generative."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trustvision import models
from trustvision.models import GenerativeClassifier, ImageClassifier, is_generative
from trustvision.models.generative import IBINN, IBINNFeedForward


def _tiny(name="ibinn-small"):
    kw = dict(widths=(8, 8, 8), fc_width=16)
    return models.create(name, num_classes=3, in_chans=1, image_size=8, **kw)


class _DDPLike(nn.Module):
    """What DistributedDataParallel looks like from outside: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_is_generative_for_models_wrappers_and_names():
    gc, ff = _tiny(), _tiny("ibinn-small-ff")
    assert isinstance(gc, IBINN) and isinstance(gc, GenerativeClassifier) and is_generative(gc)
    assert isinstance(ff, IBINNFeedForward) and not isinstance(ff, GenerativeClassifier)
    assert not is_generative(ff)
    assert not is_generative(models.create("small-cnn", 3, 1, 8))
    wrapped = models.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), in_chans=1, image_size=8)
    assert not is_generative(wrapped)
    assert is_generative(_DDPLike(gc)) and not is_generative(_DDPLike(ff))
    # architecture names are answered from the class their factory returns
    assert is_generative("ibinn-small") and is_generative("ibinn-cifar")
    assert is_generative("ibinn-imagenet")
    for name in ("ibinn-small-ff", "small-cnn", "resnet20", "ensemble", "torchvision:resnet18",
                 "no-such-model"):
        assert not is_generative(name), name
    assert models.model_class("ibinn-small") is IBINN and models.model_class("nope") is None
    assert "GenerativeClassifier" in models.__all__ and "is_generative" in models.__all__


def test_is_generative_is_one_function_everywhere():
    from trustvision.models import _base, generative

    assert generative.is_generative is _base.is_generative is models.is_generative


class _Toy(GenerativeClassifier):
    """z = x, p(z|y) = N(mu_y, I) with mu_y = y * ones; uniform class weights."""

    def __init__(self):
        super().__init__(num_classes=2, in_chans=1, image_size=2, mean=[0.0], std=[1.0])
        self.w = nn.Parameter(torch.zeros(()))

    def forward_features(self, x):
        return x.flatten(1)

    def forward_head(self, z):
        return self.log_px_given_y_z(z).log_softmax(1)

    def log_px_given_y_z(self, z):
        mu = torch.arange(2, dtype=z.dtype)[:, None].expand(2, z.shape[1])
        return -0.5 * (z[:, None] - mu).pow(2).sum(-1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    def latent(self, x):
        return x.flatten(1) + self.w, torch.zeros(len(x))

    def invert(self, z):
        return z.view(-1, 1, 2, 2)

    def log_px_given_y(self, x):
        return self.log_px_given_y_z(self.latent(x)[0])

    def log_px(self, x):
        return torch.logsumexp(self.log_px_given_y(x) + math.log(0.5), 1)

    def sample(self, y, n=1, temperature=1.0, generator=None):
        z = float(y) + temperature * torch.randn(n, 4, generator=generator)
        return self.invert(z).clamp(0, 1)


def test_subclass_contract_and_generic_bits_per_dim():
    toy = _Toy()
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert is_generative(toy) and isinstance(toy, ImageClassifier)
    assert toy(x).shape == (5, 2) and toy.log_px(x).shape == (5,)
    assert toy.log_px_given_y(x).shape == (5, 2)
    expected = 8.0 - toy.log_px(x) / (4 * math.log(2.0))
    assert torch.equal(toy.bits_per_dim(x), expected)
    assert toy.sample(1, n=3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 2, 2)


def test_subclass_missing_a_method_cannot_be_built():
    class _NoSample(_Toy):
        sample = GenerativeClassifier.sample

    class _NoLogPx(_Toy):
        log_px = GenerativeClassifier.log_px

    for cls in (_NoSample, _NoLogPx):
        with pytest.raises(TypeError, match="abstract"):
            cls()
    abstract = GenerativeClassifier.__abstractmethods__
    assert abstract == {"log_px", "log_px_given_y", "latent", "invert", "sample"}


def test_ibinn_bits_per_dim_is_the_generic_one():
    net = _tiny().eval()
    assert "bits_per_dim" not in vars(IBINN)  # inherited from GenerativeClassifier
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net.bits_per_dim(x), 8.0 - net.log_px(x) / (64 * math.log(2.0)))
