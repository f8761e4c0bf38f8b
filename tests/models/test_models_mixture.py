"""The Gaussian-mixture density and the IB loss of trustvision.models.mixture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from trustvision import models
from trustvision.models import mixture


def _case(low_rank: bool = False):
    g = torch.Generator().manual_seed(0)
    n, k, d, full = 7, 3, 5, (2 if low_rank else 5)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu = torch.randn(k, full, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    logdet = torch.randn(n, generator=g, dtype=torch.float64)
    basis = torch.randn(d - full, 2, generator=g, dtype=torch.float64) if low_rank else None
    coef = torch.randn(k, 2, generator=g, dtype=torch.float64) if low_rank else None
    means = mu if not low_rank else torch.cat([mu, coef @ basis.t()], 1)
    return z, mu, log_w, logdet, basis, coef, means


@pytest.mark.parametrize("low_rank", [False, True])
def test_mixture_log_density_equals_torch_distributions(low_rank):
    z, mu, log_w, logdet, basis, coef, means = _case(low_rank)
    dens = mixture.mixture_log_density(z, mu, log_w, logdet, mu_basis=basis, mu_coef=coef)
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    comp = D.MultivariateNormal(means, scale_tril=eye.expand(len(means), -1, -1))
    mix = D.MixtureSameFamily(D.Categorical(logits=log_w), comp)
    assert torch.allclose(dens.log_px, mix.log_prob(z) + logdet, atol=1e-12)
    per_class = comp.log_prob(z[:, None, :]) + logdet[:, None]  # (N, K)
    assert torch.allclose(dens.log_px_given_y, per_class, atol=1e-12)
    direct = -0.5 * (z[:, None] - means[None]).pow(2).sum(-1) + log_w
    assert torch.allclose(dens.scores, direct, atol=1e-12)
    # p(y|x) = softmax of the scores is Bayes' rule on the class-conditional densities
    posterior = (per_class + log_w).log_softmax(1)
    assert torch.allclose(dens.scores.log_softmax(1), posterior, atol=1e-12)


def test_without_logdet_only_the_scores():
    z, mu, log_w, *_ = _case()
    dens = mixture.mixture_log_density(z, mu, log_w)
    assert dens.log_px is None and dens.log_px_given_y is None and dens.scores.shape == (7, 3)


def test_ibinn_and_its_head_use_the_mixture():
    net = models.create("ibinn-small", num_classes=3, in_chans=1, image_size=8, widths=(8, 8, 8),
                        fc_width=16, low_rank=2, learn_weights=True).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z, logdet = net.latent(x)
        dens = mixture.mixture_log_density(z, net.gmm.mu, net.gmm.log_weights(), logdet,
                                           mu_basis=net.gmm.mu_basis, mu_coef=net.gmm.mu_coef)
        assert torch.equal(net.gmm.scores(z), dens.scores)
        assert torch.equal(net.log_px_given_y(x), dens.log_px_given_y)
        assert torch.equal(net.log_px(x), dens.log_px)
        assert torch.equal(net(x), dens.scores.log_softmax(1))


# Values of trustvision.train.ib_loss.ib_loss before it moved to trustvision.models.mixture.
PINNED = [
    (1.0, 0.05, 0.7402758363207343, -0.1481621439333276, -0.888437980254062),
    (0.25, 0.0, 0.13182341457632327, -0.1481621439333276, -0.9222071121741185),
    (float("inf"), 0.1, 1.7093376966680116, -0.1481621439333276, -0.8546688483340058),
    (0.0, 0.05, -0.2963242878666552, -0.1481621439333276, -0.888437980254062),
]


@pytest.mark.parametrize("beta,smoothing,loss,l_x,l_y", PINNED)
def test_ib_loss_keeps_its_values(beta, smoothing, loss, l_x, l_y):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 4, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
    logdet = torch.randn(6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    out = mixture.ib_loss(scores, log_w, logdet, y, dim=10, beta=beta, label_smoothing=smoothing)
    assert float(out.loss) == pytest.approx(loss, abs=1e-14)
    assert out.l_x == pytest.approx(l_x, abs=1e-14) and out.l_y == pytest.approx(l_y, abs=1e-14)


def test_l_x_is_the_mixture_nll_per_dimension():
    """L_X = -(log p(x) + D/2 ln 2 pi) / D: the loss is written on the same density."""
    z, mu, log_w, logdet, *_ = _case()
    dens = mixture.mixture_log_density(z, mu, log_w, logdet)
    out = mixture.ib_loss(dens.scores, log_w, logdet, torch.zeros(7, dtype=torch.long), dim=5,
                          beta=0.0)
    expected = (-(dens.log_px + 2.5 * math.log(2 * math.pi)) / 5).mean()
    assert out.l_x == pytest.approx(float(expected), abs=1e-12)


def test_train_ib_loss_is_a_re_export():
    from trustvision.train import ib_loss as old

    for name in ("ib_loss", "ib_weights", "smooth_labels", "perturb_inputs", "IBLoss"):
        assert getattr(old, name) is getattr(mixture, name)


def test_zoo_generative_classifier_keeps_its_likelihoods():
    """zoo:ibinn-small-digits on the digits test set: log p(x) as before the refactoring."""
    from trustvision import data

    if "zoo:ibinn-small-digits" not in [e["name"] for e in models.list_zoo()]:
        pytest.skip("zoo entry not built")
    net = models.load("zoo:ibinn-small-digits").eval()
    x, _ = data.load("digits", split="test").tensors()
    with torch.no_grad():
        lp = net.log_px(x)
        bpd = net.bits_per_dim(x)
    assert lp[:3].tolist() == pytest.approx([30.5050048828125, 27.545581817626953,
                                             32.60132598876953], abs=1e-3)
    assert float(lp.double().mean()) == pytest.approx(35.6437616888682, abs=1e-4)
    assert float(bpd.double().mean()) == pytest.approx(7.196514407263861, abs=1e-5)
