"""IB-INN generative classifier: invertibility, exact log-densities, training hooks, configs."""

from __future__ import annotations

import math
import time

import pytest
import torch

from trustvision import models
from trustvision.models.generative import IBINN, IBINNFeedForward, is_generative


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _small(**kw) -> IBINN:
    kw.setdefault("widths", (8, 8, 8))
    kw.setdefault("fc_width", 16)
    return models.create("ibinn-small", num_classes=3, in_chans=1, image_size=8, **kw)


@pytest.mark.parametrize("chans,size", [(1, 8), (3, 16), (3, 32)])
def test_invert_forward_float32(chans, size):
    torch.manual_seed(0)
    net = models.create("ibinn-small", num_classes=4, in_chans=chans, image_size=size,
                        widths=(8, 8, 8), fc_width=16).eval()
    _perturb(net)
    x = torch.rand(3, chans, size, size)
    z, logdet = net.latent(x)
    assert z.shape == (3, chans * size * size) and logdet.shape == (3,)
    assert (net.invert(z) - x).abs().max() < 1e-4
    assert torch.equal(net.features(x), z)
    assert torch.allclose(net(x).exp().sum(1), torch.ones(3), atol=1e-5)  # log p(y|x)


def test_logdet_equals_autograd_slogdet_whole_model(f64):
    net = _small().eval()
    _perturb(net, 0.1)
    x = torch.rand(1, 1, 8, 8)
    _, logdet = net.latent(x)
    jac = torch.autograd.functional.jacobian(lambda t: net.latent(t)[0], x, vectorize=True)
    jac = jac.reshape(64, 64)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-9)
    assert (net.invert(net.latent(x)[0]) - x).abs().max() < 1e-12


def test_log_px_hand_computed_at_identity_init(f64):
    # At init every coupling is the identity and the rest is orthogonal, so ||z|| = ||x_n||.
    net = _small().eval()
    with torch.no_grad():
        net.gmm.mu.zero_()
    x = torch.rand(2, 1, 8, 8)
    xn = (x - 0.5) / 0.5
    d = 64
    expected = -0.5 * xn.pow(2).sum(dim=(1, 2, 3)) - 0.5 * d * math.log(2 * math.pi) + d * math.log(2.0)
    assert torch.allclose(net.log_px(x), expected, atol=1e-9)
    bpd = 8 - expected / (d * math.log(2))
    assert torch.allclose(net.bits_per_dim(x), bpd, atol=1e-9)


def test_bayes_consistency_and_class_conditionals(f64):
    net = _small(learn_weights=True).eval()
    _perturb(net, 0.1)
    x = torch.rand(4, 1, 8, 8)
    lpy = net.log_px_given_y(x)
    log_w = net.gmm.log_weights()
    assert torch.allclose(torch.logsumexp(lpy + log_w, 1), net.log_px(x), atol=1e-10)
    assert torch.allclose(net(x), torch.log_softmax(lpy + log_w, 1), atol=1e-10)
    # explicit Gaussian: log N(z; mu_y, I) + logdet
    z, logdet = net.latent(x)
    mu = net.gmm.means()
    direct = (-0.5 * (z[:, None] - mu[None]).pow(2).sum(-1) - 32 * math.log(2 * math.pi)
              + logdet[:, None])
    assert torch.allclose(lpy, direct, atol=1e-9)


def test_low_rank_means_match_explicit_distance(f64):
    net = models.create("ibinn-small", num_classes=3, in_chans=1, image_size=8, stages=(1, 1),
                        widths=(4, 4), fc_width=8, low_rank=2)
    assert net.gmm.full_dims == 16 and net.gmm.mu_basis.shape == (48, 2)
    z = torch.randn(5, 64)
    mu = net.gmm.means()
    direct = -0.5 * (z[:, None] - mu[None]).pow(2).sum(-1) + net.gmm.log_weights()
    assert torch.allclose(net.gmm.scores(z), direct, atol=1e-9)


def test_every_parameter_gets_a_gradient_from_training_loss():
    torch.manual_seed(0)
    net = _small(learn_weights=True, low_rank=None).train()
    _perturb(net)
    loss, logits = net.training_loss(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert logits.shape == (6, 3) and torch.isfinite(loss)
    loss.backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = _small(beta=2.0, learn_weights=True)
    _perturb(net)
    # give BatchNorm non-trivial running statistics
    net.after_training([(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))])
    net.eval()
    x = torch.rand(3, 1, 8, 8)
    models.save(net, tmp_path / "ck", classes=["a", "b", "c"])
    back = models.load(tmp_path / "ck").eval()
    assert isinstance(back, IBINN) and back.beta == 2.0
    assert torch.equal(back(x), net(x))
    assert torch.equal(back.log_px(x), net.log_px(x))
    assert torch.equal(back.invert(back.latent(x)[0]), net.invert(net.latent(x)[0]))


def test_non_finite_beta_is_stored_as_strict_json(tmp_path):
    import json

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    torch.manual_seed(0)
    net = _small(beta=float("inf"))
    x = torch.rand(2, 1, 8, 8)
    models.save(net.eval(), tmp_path / "ck", metrics={"nll": float("nan"), "acc": 0.5},
                training={"beta": float("-inf")})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text(), parse_constant=refuse)
    assert cfg["kwargs"]["beta"] == "inf" and cfg["metrics"]["nll"] == "nan"
    assert cfg["training"]["beta"] == "-inf"
    back = models.load(tmp_path / "ck")
    assert back.beta == float("inf") and isinstance(back.tv_config["kwargs"]["beta"], float)
    assert math.isnan(back.tv_config["metrics"]["nll"]) and back.tv_config["metrics"]["acc"] == 0.5
    assert torch.equal(back(x), net(x))
    # a checkpoint written by an older version (bare Infinity) still loads
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "kwargs": {**cfg["kwargs"],
                                                                               "beta": math.inf}}))
    assert models.load(tmp_path / "ck").beta == float("inf")


def test_sample_temperature_zero_is_the_mean_image():
    torch.manual_seed(0)
    net = _small().eval()
    s = net.sample(2, n=3, temperature=0.0)
    assert s.shape == (3, 1, 8, 8) and s.min() >= 0 and s.max() <= 1
    expected = net.invert(net.gmm.means()[2:3]).clamp(0, 1)
    assert torch.allclose(s, expected.expand(3, -1, -1, -1), atol=1e-6)
    # the un-clipped mean image is classified as its class
    assert net(net.invert(net.gmm.means())).argmax(1).tolist() == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    s2 = net.sample(torch.tensor([0, 1]), temperature=0.5, generator=g)
    assert s2.shape == (2, 1, 8, 8)


def test_param_groups_means_fast_without_weight_decay():
    net = _small(learn_weights=True, mean_lr=3.0)
    groups = net.param_groups(0.01)
    assert groups[1]["lr"] == pytest.approx(0.03) and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(net.gmm.mu), id(net.gmm.phi)}
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in net.parameters())


def test_after_training_reestimates_batchnorm_exactly():
    torch.manual_seed(0)
    net = _small().eval()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    h = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    batches = [(torch.rand(10, 1, 8, 8), torch.zeros(10)) for _ in range(3)]
    net.after_training(batches)
    h.remove()
    acts = torch.cat(seen)
    assert torch.allclose(bn.running_mean, acts.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and not net.training  # mode restored


def test_feed_forward_twin_shares_the_backbone():
    gc, ff = _small(), models.create("ibinn-small-ff", num_classes=3, in_chans=1, image_size=8,
                                     widths=(8, 8, 8), fc_width=16)
    assert isinstance(ff, IBINNFeedForward) and not is_generative(ff) and is_generative(gc)
    flow_keys = {k for k in gc.state_dict() if k.startswith("flow.")}
    assert flow_keys == {k for k in ff.state_dict() if k.startswith("flow.")}
    x = torch.rand(2, 1, 8, 8)
    ff.eval()
    assert ff(x).shape == (2, 3)
    assert (ff.invert(ff.latent(x)[0]) - x).abs().max() < 1e-4


def test_cifar_layout_shapes():
    net = models.create("ibinn-cifar", num_classes=10, in_chans=3, image_size=32,
                        stages=(2, 2, 2)).eval()  # reference widths, fewer blocks for speed
    shapes = []
    x = torch.rand(1, 3, 32, 32)
    h = x
    for block in net.flow.blocks:
        h, _ = block(h)
        shapes.append(tuple(h.shape[1:]))
    assert (12, 16, 16) in shapes and (48, 8, 8) in shapes and shapes[-1] == (3072,)
    assert (net.invert(net.latent(x)[0]) - x).abs().max() < 1e-4
    full = models.create("ibinn-cifar", num_classes=10)
    n_coupling = sum(1 for m in full.modules() if type(m).__name__ == "AffineCoupling")
    assert n_coupling == 8 + 24 + 24 + 1  # stages + FC coupling


@pytest.mark.slow
def test_imagenet_layout_forward_inverse_backward_on_cpu():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = models.create("ibinn-imagenet", num_classes=1000, in_chans=3, image_size=224)
    assert net.dim == 150528 and net.pooled_dims == 3072
    assert net.gmm.mu.shape == (1000, 3072) and net.gmm.mu_basis.shape == (150528 - 3072, 16)
    x = torch.rand(1, 3, 224, 224)
    net.eval()
    with torch.no_grad():
        z, logdet = net.latent(x)
        assert z.shape == (1, 150528) and torch.isfinite(logdet).all()
        assert (net.invert(z) - x).abs().max() < 1e-3
    net.train()
    loss, logits = net.training_loss(x, torch.tensor([7]))
    loss.backward()
    assert logits.shape == (1, 1000)
    assert net.gmm.mu.grad is not None and net.gmm.mu.grad[7].abs().sum() > 0
    assert time.perf_counter() - t0 < 120
