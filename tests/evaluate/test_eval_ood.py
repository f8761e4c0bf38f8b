"""OOD metrics against hand-computed values and sklearn; typicality test; OOD sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from trustvision.evaluate import ood
from trustvision.models import GenerativeClassifier


def test_metrics_hand_computed():
    s_in = torch.tensor([0.9, 0.8, 0.7, 0.3])
    s_out = torch.tensor([0.75, 0.2])
    # pairs (in > out): 0.9>both, 0.8>both, 0.7>0.2, 0.3>0.2 -> 6 of 8
    assert ood.auroc(s_in, s_out) == pytest.approx(6 / 8)
    # ranking: .9(+) .8(+) .75(-) .7(+) .3(+) .2(-): AP = (1 + 1 + 3/4 + 4/5) / 4
    assert ood.aupr(s_in, s_out) == pytest.approx((1 + 1 + 0.75 + 0.8) / 4)
    # 95% TPR needs all 4 ID samples -> threshold 0.3 -> OOD 0.75 accepted: FPR 1/2
    assert ood.fpr_at_tpr(s_in, s_out, 0.95) == 0.5
    # 75% TPR -> threshold 0.7 -> FPR 1/2 (0.75 >= 0.7); 50% -> 0.8 -> 0
    assert ood.fpr_at_tpr(s_in, s_out, 0.75) == 0.5 and ood.fpr_at_tpr(s_in, s_out, 0.5) == 0.0
    # ties count one half
    assert ood.auroc([1.0, 1.0], [1.0]) == 0.5


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s_in = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounding creates ties
    s_out = np.round(rng.normal(0.0, 1.0, 200), 1)
    y = np.r_[np.ones(300), np.zeros(200)]
    s = np.r_[s_in, s_out]
    assert ood.auroc(s_in, s_out) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert ood.aupr(s_in, s_out) == pytest.approx(metrics.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert ood.fpr_at_tpr(s_in, s_out) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    m = ood.ood_metrics(torch.tensor(s_in), torch.tensor(s_out))
    assert json.loads(json.dumps(m.to_dict()))["n_in"] == 300


class _Gauss(GenerativeClassifier):
    """A 'generative model' whose log p(x) is a standard normal density in pixel space (z = x)."""

    def __init__(self):
        super().__init__(num_classes=2, in_chans=1, image_size=4)
        self.w = nn.Parameter(torch.zeros(1))

    def log_px(self, x):
        d = x[0].numel()
        return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * d * np.log(2 * np.pi) + self.w

    def log_px_given_y(self, x):
        return (self.log_px(x) + np.log(2.0))[:, None].expand(-1, 2)

    def latent(self, x):
        return x.flatten(1), torch.zeros(len(x))

    def invert(self, z):
        return z.view(-1, 1, 4, 4)

    def sample(self, y, n=1, temperature=1.0, generator=None):
        return torch.randn(n, 1, 4, 4, generator=generator).mul(temperature).clamp(0, 1)

    def bits_per_dim(self, x):
        return 8 - self.log_px(x) / (x[0].numel() * np.log(2))

    def forward(self, x):
        return torch.stack([-x.flatten(1).pow(2).sum(1), x.flatten(1).sum(1)], 1)


def test_typicality_test_is_two_tailed():
    g = torch.Generator().manual_seed(0)
    model = _Gauss()
    x_train = torch.randn(4000, 1, 4, 4, generator=g)
    test = ood.TypicalityTest(model, alpha=0.05).fit(x_train)
    # standard-normal data: L_X = 0.5 E[x^2] + 0.5 log 2pi = 0.5 + 0.919
    assert test.mean == pytest.approx(0.5 + 0.5 * np.log(2 * np.pi), abs=0.02)
    x_id = torch.randn(2000, 1, 4, 4, generator=g)
    assert float(test.is_ood(x_id).float().mean()) == pytest.approx(0.05, abs=0.015)
    zeros = torch.zeros(10, 1, 4, 4)  # the *most likely* point is atypical: flagged
    wide = 3 * torch.randn(10, 1, 4, 4, generator=g)  # too unlikely: flagged
    assert test.is_ood(zeros).all() and test.is_ood(wide).all()
    assert ood.log_px_score(model, zeros).mean() > ood.log_px_score(model, x_id).mean()
    assert ood.auroc(test.score(x_id), test.score(zeros)) > 0.99
    with pytest.raises(RuntimeError):
        ood.TypicalityTest(model).score(zeros)


def test_png_bits_and_complexity_score():
    flat = torch.full((2, 1, 16, 16), 0.5)
    noisy = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    b_flat, b_noisy = ood.png_bits(flat), ood.png_bits(noisy)
    assert (b_noisy > b_flat + 8 * 150).all()  # 256 random bytes barely compress
    model = _Gauss()
    s = ood.complexity_corrected_score(model, flat)
    expected = b_flat - model.bits_per_dim(flat).detach().double() * 256
    assert torch.allclose(s, expected)


def test_build_ood_sets_match_id_shape():
    from trustvision import data

    digits = data.load("digits", split="test")
    sets = ood.build_ood_sets(digits, n=20, seed=0)
    assert set(sets) == set(ood.OOD_SETS)
    for name, x in sets.items():
        assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1, name
        assert len(x) == 20 or name in ("rotated", "inverted"), name
    x, _ = digits.tensors()
    full = ood.build_ood_sets(digits, names=["inverted", "rotated"])
    assert torch.equal(full["inverted"], 1 - x)
    assert torch.equal(full["rotated"][0, 0], torch.rot90(x[0, 0], 1))
    tex = ood.build_ood_sets(data.load("textures", split="test"), names=["faces", "textures"], n=5)
    assert list(tex) == ["faces"] and tex["faces"].shape == (5, 3, 32, 32)
    with pytest.raises(Exception, match="unknown OOD set"):
        ood.build_ood_sets(digits, names=["nope"])


def test_evaluate_ood_rows_and_convention():
    g = torch.Generator().manual_seed(0)
    model = _Gauss()
    x_train, x_test = torch.randn(500, 1, 4, 4, generator=g), torch.randn(100, 1, 4, 4, generator=g)
    res = ood.evaluate_ood(model, x_train, x_test, {"wide": 3 * torch.randn(50, 1, 4, 4, generator=g)},
                           compare=model)
    dets = {r["detector"] for r in res.rows}
    # this toy has no penultimate features: the logit detectors only (and no labels to fit others)
    assert dets == {"log_px", "typicality", "complexity", "max-softmax", "max-logit", "energy", "max-softmax (compare)"}
    assert res.get("typicality", "wide")["auroc"] > 0.95
    assert "positive" in res.convention
    json.dumps(res.to_dict())


def test_evaluate_ood_only_gives_generative_classifiers_the_likelihood_detectors():
    """A model with a log_px method that is not a GenerativeClassifier gets max-softmax only."""

    class _Duck(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Gauss()

        def log_px(self, x):
            return self.inner.log_px(x)

        def forward(self, x):
            return self.inner(x)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g)
    res = ood.evaluate_ood(_Duck(), x, x, {"u": torch.rand(20, 1, 4, 4, generator=g)})
    assert {r["detector"] for r in res.rows} == {"max-softmax", "max-logit", "energy"} and res.typicality == {}


def test_build_ood_sets_accepts_a_plain_torch_dataset():
    from torch.utils.data import TensorDataset

    from trustvision import data

    digits = data.load("digits", split="test")
    x, y = digits.tensors()
    plain = ood.build_ood_sets(TensorDataset(x, y), names=["inverted"])
    assert torch.equal(plain["inverted"], ood.build_ood_sets(digits, names=["inverted"])["inverted"])
