"""Every registered architecture honours the ImageClassifier contract (timm-style registry tests)."""

import importlib.util

import pytest
import torch

from trustvision import TrustVisionError, models
from trustvision.models import Ensemble, ImageClassifier

HAS_TIMM = importlib.util.find_spec("timm") is not None

# (name, extra kwargs) covering the whole registry; prefixed entries get a concrete model.
ARCHS = [
    pytest.param("small-cnn", {}, id="small-cnn"),
    pytest.param("resnet20", {}, id="resnet20"),
    pytest.param("ensemble", {"n": 2}, id="ensemble"),
    pytest.param("torchvision:shufflenet_v2_x0_5", {}, id="torchvision:shufflenet_v2_x0_5"),
    # timm zero-initialises the last BatchNorm of each residual block, which zeroes the gradient of
    # the conv before it at initialisation; switch that off to check every parameter is reached.
    pytest.param("timm:resnet18", {"zero_init_last": False}, id="timm:resnet18",
                 marks=pytest.mark.skipif(not HAS_TIMM, reason="timm not installed")),
]
SHAPES = [(1, 8), (3, 25), (2, 32)]


def test_registry_lists_everything():
    names = models.list_models()
    for n in ("small-cnn", "resnet20", "ensemble", "torchvision:NAME", "timm:NAME"):
        assert n in names
    # ARCHS covers every model registered by this package's feed-forward modules (generative
    # models have their own contract tests in tests/models/ of their owner).
    covered = {a.values[0] for a in ARCHS}
    ours = ("trustvision.models.feedforward", "trustvision.models.ensemble")
    for n in models._MODELS.names():
        if models._MODELS.get(n).__module__ in ours:
            assert n in covered, n
    for prefix, fn in models._PREFIXED.items():
        if fn.__module__ in ours:
            assert any(c.startswith(prefix + ":") for c in covered), prefix


@pytest.mark.parametrize("name,kw", ARCHS)
@pytest.mark.parametrize("chans,size", SHAPES)
def test_contract(name, kw, chans, size):
    torch.manual_seed(0)
    m = models.create(name, num_classes=5, in_chans=chans, image_size=size, **kw)
    assert isinstance(m, ImageClassifier)
    assert m.tv_config["architecture"] == name and m.tv_config["image_size"] == [size, size]
    x = torch.rand(3, chans, size, size)
    out = m(x)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    f = m.features(x)
    assert f.ndim == 2 and f.shape[0] == 3
    # every parameter gets a gradient
    m.zero_grad()
    m(x).logsumexp(-1).sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "fc.bias" not in n)


@pytest.mark.parametrize("name,kw", ARCHS)
def test_normalisation_inside(name, kw):
    torch.manual_seed(0)
    m = models.create(name, num_classes=4, in_chans=2, image_size=8, **kw).eval()
    x = torch.rand(2, 2, 8, 8)
    ref = m.features(x).detach()
    # The same net with a different mean/std gives different features; the input shift that
    # undoes the change gives the same ones. Compared relative to the feature scale, since an
    # untrained deep net in eval mode can have tiny activations.
    torch.manual_seed(0)
    m2 = models.create(name, num_classes=4, in_chans=2, image_size=8,
                       mean=[0.2, 0.3], std=[0.25, 0.5], **kw).eval()
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if "norm_" not in k}, strict=False)
    out2 = m2.features(x).detach()
    scale = float(ref.abs().max())
    assert scale > 0 and (ref - out2).abs().max() > 1e-3 * scale
    # (x - 0.2)/0.25 == (x' - 0.5)/0.5 with x' = 0.5 + 0.5*(x - 0.2)/0.25: same normalised input.
    mean, std = torch.tensor([0.2, 0.3]).view(1, 2, 1, 1), torch.tensor([0.25, 0.5]).view(1, 2, 1, 1)
    x_shift = 0.5 + 0.5 * (x - mean) / std
    assert torch.allclose(m.features(x_shift), out2, rtol=1e-4, atol=1e-5 * scale)
    assert torch.allclose(m(x_shift), m2(x), rtol=1e-4, atol=1e-5)


def test_small_cnn_is_small():
    m = models.create("small-cnn", num_classes=10, in_chans=3, image_size=32)
    n = sum(p.numel() for p in m.parameters())
    assert n < 200_000  # < 0.8 MB in float32, so a zoo of four stays a few MB


def test_resnet20_structure():
    m = models.create("resnet20", num_classes=10, in_chans=3, image_size=32)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3)]
    assert len(convs) == 19  # 1 stem + 3 stages x 3 blocks x 2 convs, + the fc = 20 layers
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert m.features(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert 0.26e6 < sum(p.numel() for p in m.parameters()) < 0.28e6  # the paper's 0.27M


def test_torchvision_adapts_stem_and_head():
    m = models.create("torchvision:resnet18", num_classes=7, in_chans=1, image_size=32)
    assert m.net.conv1.in_channels == 1 and m.fc.out_features == 7
    assert m.features(torch.rand(2, 1, 32, 32)).shape == (2, 512)
    assert torch.allclose(m.norm_mean.flatten(), torch.tensor([0.5]))
    m3 = models.create("torchvision:resnet18", num_classes=7, in_chans=3, image_size=32)
    assert torch.allclose(m3.norm_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_unknown_names_are_one_line_errors():
    with pytest.raises(TrustVisionError, match="did you mean 'small-cnn'") as e:
        models.create("small_cnn", 10, 1, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(TrustVisionError, match="unknown torchvision model") as e:
        models.create("torchvision:not_a_net", 10, 1, 8)
    assert "\n" not in str(e.value)


def test_timm_missing_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(TrustVisionError, match="pip install timm") as e:
        models.create("timm:resnet18", 10, 3, 32)
    assert "\n" not in str(e.value)


def test_ensemble_is_mean_of_member_probabilities():
    torch.manual_seed(0)
    ens = models.create("ensemble", num_classes=6, in_chans=1, image_size=8, member="small-cnn",
                        n=3, member_kwargs={"widths": [8, 16]}).eval()
    assert isinstance(ens, Ensemble) and isinstance(ens.members, torch.nn.ModuleList)
    x = torch.rand(5, 1, 8, 8)
    mean_p = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
    assert torch.allclose(ens(x).softmax(-1), mean_p, atol=1e-6)
    assert torch.allclose(ens(x).exp(), mean_p, atol=1e-6)  # already normalised log-probs
    # features are the concatenated member features; forward_head(features) == forward
    f = ens.features(x)
    assert f.shape == (5, 3 * 16)
    assert torch.allclose(f[:, 16:32], ens.members[1].features(x))
    assert torch.allclose(ens.forward_head(f), ens(x), atol=1e-6)
    # members are independently initialised
    assert not torch.equal(ens.members[0].fc.weight, ens.members[1].fc.weight)
    # training_loss sums the members' own cross-entropies
    y = torch.tensor([0, 1, 2, 3, 4])
    loss, logits = ens.training_loss(x, y)
    ref = sum(torch.nn.functional.cross_entropy(m(x), y) for m in ens.members)
    assert torch.allclose(loss, ref) and torch.allclose(logits, ens(x))
    with pytest.raises(TrustVisionError):
        models.create("ensemble", 3, 1, 8, n=0)
