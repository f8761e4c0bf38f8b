"""Generative-classifier explanations against closed forms at the identity initialisation.

At initialisation every coupling of an IB-INN is the identity, so z = Q x_n with Q orthogonal
and x_n = 2x - 1. Then (exactly):
  * log p(x|y1) - log p(x|y2) has the constant gradient 2 Q^T (mu_1 - mu_2),
  * the latent counterfactual moved by mu_t - mu_s changes the image by 0.5 Q^T (mu_t - mu_s).
"""

from __future__ import annotations

import pytest
import torch

from trustvision import TrustVisionError, models
from trustvision.explain.generative import (
    LatentCounterfactual,
    LikelihoodRatioGradient,
    counterfactual_figure,
    sample_grid,
    sample_grid_figure,
)


@pytest.fixture
def net():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m = models.create("ibinn-small", num_classes=3, in_chans=1, image_size=8,
                          widths=(8, 8, 8), fc_width=16)
    finally:
        torch.set_default_dtype(old)
    return m.double().eval()


def _q_transpose(net, v):
    return net.flow(v, rev=True)[0]


def test_likelihood_ratio_gradient_closed_form(net):
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    mu = net.gmm.means()
    grad = LikelihoodRatioGradient(net).attribute(x, target=1, other=2, reduce=None)
    expected = 2 * _q_transpose(net, (mu[1] - mu[2]).unsqueeze(0)).expand(4, -1, -1, -1)
    assert torch.allclose(grad, expected.detach(), atol=1e-9)
    heat = LikelihoodRatioGradient(net).attribute(x, target=[0, 1, 2, 0])
    assert heat.shape == (4, 1, 8, 8)
    # default "other" = most likely other class; target default = predicted class
    auto = LikelihoodRatioGradient(net).attribute(x, reduce=None)
    pred = net(x).argmax(1)
    assert auto.shape == x.shape and torch.isfinite(auto).all()
    logits = net(x).detach().clone()
    logits.scatter_(1, pred.view(-1, 1), float("-inf"))
    other = logits.argmax(1)
    for i in range(4):
        exp_i = 2 * _q_transpose(net, (mu[pred[i]] - mu[other[i]]).unsqueeze(0))[0]
        assert torch.allclose(auto[i], exp_i.detach(), atol=1e-9)


def test_latent_counterfactual_closed_form(net):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    cf = LatentCounterfactual(net).attribute(x, target=2, source=0, steps=4)
    assert cf.images.shape == (2, 5, 1, 8, 8) and cf.probs.shape == (2, 5)
    mu = net.gmm.means().detach()
    expected = 0.5 * _q_transpose(net, (mu[2] - mu[0]).unsqueeze(0)).detach()
    assert torch.allclose(cf.diff, expected.expand(2, -1, -1, -1), atol=1e-9)
    assert (cf.probs[:, -1] > cf.probs[:, 0]).all()
    # step 0 reconstructs the input
    assert torch.allclose(cf.images[:, 0], x, atol=1e-9)
    fig = counterfactual_figure(cf, x, class_names=["a", "b", "c"])
    assert len(fig.axes) == 2 * 7
    assert cf.to_dict()["target"] == [2, 2]


def test_sample_grid_seeded(net):
    a = sample_grid(net, n=3, temperature=0.5, seed=1)
    b = sample_grid(net, n=3, temperature=0.5, seed=1)
    assert a.shape == (3, 3, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert len(sample_grid_figure(a, ["a", "b", "c"]).axes) == 9


def test_feed_forward_model_is_refused():
    ff = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8)
    with pytest.raises(TrustVisionError, match="generative classifier"):
        LatentCounterfactual(ff)


def test_likelihood_ratio_is_registered_with_the_common_signature(net):
    from trustvision import explain

    assert explain.get("likelihood-ratio") is LikelihoodRatioGradient
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    heat = explain.attribute(net, x, method="likelihood-ratio", target=1, other=2)
    mu = net.gmm.means()
    expected = 2 * _q_transpose(net, (mu[1] - mu[2]).unsqueeze(0)).sum(1, keepdim=True)
    assert heat.shape == (3, 1, 8, 8)
    assert torch.allclose(heat, expected.expand(3, -1, -1, -1).detach(), atol=1e-9)
    same = explain.get("likelihood-ratio")(net).attribute(x, target=None)
    assert same.shape == (3, 1, 8, 8) and torch.isfinite(same).all()
    ff = models.create("ibinn-small-ff", num_classes=3, in_chans=1, image_size=8,
                       widths=(8, 8, 8), fc_width=16)
    with pytest.raises(TrustVisionError, match="needs a generative classifier") as err:
        explain.attribute(ff, torch.rand(2, 1, 8, 8), method="likelihood-ratio")
    assert "\n" not in str(err.value)
