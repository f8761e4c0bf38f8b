"""OOD detectors: every score equals pytorch-ood's on the same features and logits (after the sign
convention: ours are higher = more in-distribution), known answers on hand-made features, and
the metrics agree with scikit-learn's."""

import numpy as np
import pytest
import torch
from torch import nn

from trustvision import models
from trustvision.errors import TrustVisionError
from trustvision.evaluate.detectors import has_features, model_outputs
from trustvision.evaluate.ood import auroc, aupr, get_detector, list_detectors

pod = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=4, in_chans=1, image_size=8).eval()
    g = torch.Generator().manual_seed(1)
    x_train = torch.rand(240, 1, 8, 8, generator=g)
    y_train = torch.arange(240) % 4
    x_test = torch.cat([torch.rand(40, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g) ** 3])
    return net, x_train, y_train, x_test


def test_registry_lists_every_detector_and_the_ones_a_model_can_use(net_and_data):
    net = net_and_data[0]
    assert list_detectors() == ["max-softmax", "max-logit", "energy", "mahalanobis", "knn", "vim"]
    assert list_detectors(net) == list_detectors() and has_features(net)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    assert list_detectors(plain) == ["max-softmax", "max-logit", "energy"]
    with pytest.raises(TrustVisionError, match="needs penultimate features") as err:
        get_detector("knn")().fit(plain, torch.rand(4, 1, 8, 8), torch.arange(4))
    assert "\n" not in str(err.value)
    with pytest.raises(TrustVisionError, match="did you mean 'energy'"):
        get_detector("enrgy")
    with pytest.raises(TrustVisionError, match="must be fitted first"):
        get_detector("mahalanobis")().score(net_and_data[0], torch.rand(2, 1, 8, 8))


def test_logits_equal_forward_and_features_are_the_heads_input(net_and_data):
    net, x, _, _ = net_and_data
    logits, feats = model_outputs(net, x[:10], batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x[:10]).double(), atol=1e-6, rtol=0)
    assert feats.shape == (10, net.fc.in_features)


@pytest.mark.parametrize("name,theirs", [
    ("max-softmax", lambda: pod.MaxSoftmax(None)),
    ("max-logit", lambda: pod.MaxLogit(None)),
    ("energy", lambda: pod.EnergyBased(None)),
])
def test_logit_detectors_equal_pytorch_ood(net_and_data, name, theirs):
    net, _, _, x = net_and_data
    logits, _ = model_outputs(net, x)
    ours = get_detector(name)().score(net, x)
    ref = -theirs().predict_logits(logits.float()).double()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_mahalanobis_equals_pytorch_ood_up_to_its_scale(net_and_data):
    net, xt, yt, x = net_and_data
    _, ft = model_outputs(net, xt)
    _, f = model_outputs(net, x)
    n = ft.shape[0]
    ours = get_detector("mahalanobis")(ridge=1e-6 / n).fit(net, xt, yt).score(net, x)
    ref = pod.Mahalanobis(None).fit_features(ft.float(), yt).predict_features(f.float()).double()
    # pytorch-ood: 0.5 x the smallest distance on its covariance (not divided by N), as an outlier score
    torch.testing.assert_close(-0.5 * ours / n, ref, atol=1e-5, rtol=1e-4)


def test_mahalanobis_known_answer():
    """Two classes at (+-1, 0) with unit within-class variance per axis: the distance of (0, 0) is 1
    to both means, of (1, 0) is 0."""
    det = get_detector("mahalanobis")(ridge=0.0)
    f = torch.tensor([[0.0, 1], [0, -1], [2, 1], [2, -1], [-2, 1], [-2, -1], [0, 1], [0, -1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    f[y == 0, 0] += 1 - f[y == 0, 0].mean()
    f[y == 1, 0] += -1 - f[y == 1, 0].mean()
    det.fit_outputs(None, f, y, None)
    det.fitted = True
    d = det.distances(torch.tensor([[1.0, 0], [0, 0]], dtype=torch.float64))
    var_x = float(((f[:, 0] - torch.where(y == 0, 1.0, -1.0)) ** 2).mean())
    torch.testing.assert_close(d, torch.tensor([[0, 4 / var_x], [1 / var_x, 1 / var_x]], dtype=torch.float64))


def test_knn_equals_pytorch_ood(net_and_data):
    net, xt, yt, x = net_and_data
    _, ft = model_outputs(net, xt)
    _, f = model_outputs(net, x)
    ours = get_detector("knn")().fit(net, xt, yt).score(net, x)
    ref = pod.KNN(None, k=50).fit_features(ft.float(), yt).predict_features(f.float()).double()
    torch.testing.assert_close(-ours, ref, atol=1e-5, rtol=1e-5)


def test_vim_equals_pytorch_ood(net_and_data):
    net, xt, yt, x = net_and_data
    _, ft = model_outputs(net, xt)
    _, f = model_outputs(net, x)
    det = get_detector("vim")().fit(net, xt, yt)
    torch.testing.assert_close(det.w.float(), net.fc.weight.detach(), atol=1e-5, rtol=0)  # the head read by probing
    ref = pod.ViM(None, d=det.d_used, w=net.fc.weight.detach(), b=net.fc.bias.detach())
    ref = -ref.fit_features(ft.float(), yt).predict_features(f.float()).double()
    torch.testing.assert_close(det.score(net, x), ref, atol=1e-4, rtol=1e-4)


def test_vim_refuses_a_head_that_is_not_affine(net_and_data):
    net = models.create("small-cnn", num_classes=4, in_chans=1, image_size=8).eval()
    net.forward_head = lambda f: torch.relu(net.fc(f))
    with pytest.raises(TrustVisionError, match="affine classifier head"):
        get_detector("vim")().fit(net, torch.rand(20, 1, 8, 8), torch.arange(20) % 4)


def test_feature_detectors_separate_far_ood_on_a_trained_model():
    """On the digits zoo model every detector ranks digits above uniform noise (AUROC > 0.9), and
    our AUROC / AUPR equal scikit-learn's on the same scores."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from trustvision import data

    net = models.load("zoo:small-cnn-digits").eval()
    xtr, ytr = data.load("digits", split="train").tensors()
    xte, _ = data.load("digits", split="test").tensors()
    noise = torch.rand(200, *xte.shape[1:], generator=torch.Generator().manual_seed(0))
    aurocs = {}
    for name in list_detectors(net):
        det = get_detector(name)().fit(net, xtr, ytr)
        s_in, s_out = det.score(net, xte).numpy(), det.score(net, noise).numpy()
        labels = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
        a = auroc(s_in, s_out)
        assert a == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]), abs=1e-12)
        assert aupr(s_in, s_out) == pytest.approx(average_precision_score(labels, np.r_[s_in, s_out]), abs=1e-9)
        aurocs[name] = a
    # the feature-space detectors find noise far better than the softmax (0.86 on this model)
    assert min(aurocs[n] for n in ("mahalanobis", "knn", "vim")) > 0.9 > aurocs["max-softmax"] > 0.8, aurocs
