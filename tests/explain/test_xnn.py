"""XNN (trustvision.explain.xnn): the loss terms on hand tensors, recovery of a known linear model
of three non-negative features, save/load and resumed training, heatmaps, the registered
explainer, and the targets on the zoo models (digits agreement, the shortcut-digits marker)."""

import itertools
import json
import math

import pytest
import torch
from torch import nn

from trustvision import data, explain, models
from trustvision._utils.progress import line_tracker
from trustvision.errors import TrustVisionError
from trustvision.explain.xnn import (XNN, XNNExplainer, XNNMetrics, XNNResult, faithfulness_loss,
                                     pull_away_loss, sparse_reconstruction_loss)

#: the three 3 x 3 blocks of a 6 x 6 image whose means are the known features
BLOCKS = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 6)), (slice(3, 6), slice(0, 3))]


class Linear3(nn.Module):
    """Logits = W f exactly, f (N, 3) >= 0 the means of three image blocks; ``features`` = A f, a
    random 6-dimensional mixing of them (what the XNN sees)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("A", torch.randn(6, 3, generator=g))
        self.register_buffer("W", torch.randn(4, 3, generator=g) * 2)

    def concepts(self, x):
        return torch.stack([x[:, 0, r, c].mean((1, 2)) for r, c in BLOCKS], 1)

    def features(self, x):
        return self.concepts(x) @ self.A.t()

    def forward(self, x):
        return self.concepts(x) @ self.W.t()


def block_images(n: int, seed: int, p: float = 0.3) -> torch.Tensor:
    """6 x 6 images: faint noise, each block independently lit (0.3 .. 1) with probability p."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g) * 0.05
    for r, c in BLOCKS:
        on = (torch.rand(n, generator=g) < p).float()
        x[:, 0, r, c] = (on * (0.3 + 0.7 * torch.rand(n, generator=g)))[:, None, None]
    return x


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    diff = pos.flatten()[:, None] - neg.flatten()[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


@pytest.fixture(scope="module")
def linear3():
    net = Linear3().eval()
    xtr, xte = block_images(1024, 1), block_images(512, 2)
    return net, xtr, xte, XNN(net, n_concepts=3).fit(xtr, seed=0)


@pytest.fixture(scope="module")
def digits():
    net = models.load("zoo:small-cnn-digits")
    return net, XNN(net, n_concepts=5).fit(data.load("digits", split="train"), seed=0)


# -- the loss terms --------------------------------------------------------------------------


def test_pull_away_known_answers():
    orthogonal = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    assert float(pull_away_loss(orthogonal, eta=0.7)) == 0.0
    identical = torch.tensor([0.5, 1.0, 2.0, 0.1])[:, None].repeat(1, 4)
    assert math.isclose(float(pull_away_loss(identical, eta=0.7)), 0.7, rel_tol=1e-6)
    # two columns at 60 degrees: cos^2 = 1/4 for both ordered pairs
    e = torch.tensor([[1.0, 0.5], [0.0, math.sqrt(3) / 2]])
    assert math.isclose(float(pull_away_loss(e, eta=2.0)), 2.0 * 2 * 0.25 / 2, rel_tol=1e-6)
    assert float(pull_away_loss(torch.rand(5, 1))) == 0.0  # L = 1: no pairs
    assert float(pull_away_loss(torch.zeros(4, 3))) == 0.0  # zero columns are guarded


def test_sparse_reconstruction_known_answer():
    z = torch.zeros(3, 2)
    z_hat = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0]])  # per-dimension MSE 1 and 4/3
    got = float(sparse_reconstruction_loss(z, z_hat, beta=2.0, q=3.0))
    assert math.isclose(got, math.log(1 + 3 * 1) + math.log(1 + 3 * 4 / 3), rel_tol=1e-6)  # log 20
    assert float(sparse_reconstruction_loss(z, z)) == 0.0
    # a large error on one dimension costs less than the same squared error spread over two
    one = sparse_reconstruction_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]))
    spread = sparse_reconstruction_loss(torch.zeros(1, 2), torch.tensor([[math.sqrt(8), math.sqrt(8)]]))
    assert float(one) < float(spread)


def test_faithfulness_known_answer():
    logits, zero = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert math.isclose(float(faithfulness_loss(logits, zero)), 1.25, rel_tol=1e-6)
    assert math.isclose(float(faithfulness_loss(logits, zero, alpha=2.0, scale=2.0)), 2 * 1.25 / 4, rel_tol=1e-6)
    p = 1 / (1 + math.exp(-1.0))  # softmax([1, 2])[1]; the second row has no error
    want = 2 * (p - 0.5) ** 2 / 2
    assert math.isclose(float(faithfulness_loss(logits, zero, alpha=0.0, gamma=1.0)), want, rel_tol=1e-5)
    assert float(faithfulness_loss(logits, logits, gamma=1.0)) == 0.0


# -- known answer: a linear model of three non-negative features ------------------------------


def test_recovers_three_linear_features_up_to_permutation_and_scale(linear3):
    net, _, xte, xnn = linear3
    e, f = xnn.features_of(xte), net.concepts(xte)
    corr = torch.corrcoef(torch.cat([e, f], 1).t())[:3, 3:]
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(float(corr[i, p[i]]) for i in range(3)))
    matched = [float(corr[i, perm[i]]) for i in range(3)]
    assert min(matched) > 0.95, matched
    m = xnn.metrics(xte)
    assert m.agreement > 0.99 and m.dead == 0 and m.reference == "model"
    # each x-feature's heatmap lies on the block of its feature
    heat = xnn.heatmaps(xte[:64]).clamp_min(0)
    for l, j in enumerate(perm):
        r, c = BLOCKS[j]
        on = heat[:, l, r, c].sum() / heat[:, l].sum()
        assert float(on) > 0.9, (l, j, float(on))


def test_explanations_add_up_and_top_activating(linear3):
    net, _, xte, xnn = linear3
    res = xnn.explain(xte[:6], target=2)
    assert len(res) == 6 and all(isinstance(r, XNNResult) for r in res)
    e = xnn.features_of(xte[:6])
    for i, r in enumerate(res):
        assert r.target == 2 and r.bias == 0.0 and r.heatmaps.shape == (3, 6, 6)
        torch.testing.assert_close(torch.tensor(r.values), e[i])
        torch.testing.assert_close(torch.tensor(r.contributions), xnn.V[2].detach() * e[i])
        assert abs(sum(r.contributions) + r.bias - r.estimate) < 1e-4
        assert abs(r.estimate - r.logit) < 0.5  # faithful: the logit is rebuilt from the x-features
    assert [r.predicted for r in xnn.explain(xte[:6])] == net(xte[:6]).argmax(1).tolist()
    idx, val = xnn.top_activating(xte, k=4)
    ea = xnn.features_of(xte)
    assert idx.shape == val.shape == (3, 4)
    for l in range(3):
        assert torch.equal(ea[idx[l], l], val[l]) and bool((val[l][:-1] >= val[l][1:]).all())
        assert float(val[l, -1]) >= float(ea[:, l].topk(4).values[-1])


# -- heatmaps --------------------------------------------------------------------------------


def test_heatmaps_are_gradient_times_input_and_batch_independent(digits):
    net, xnn = digits
    x = data.load("digits", split="test").tensors()[0][:5]
    heat = xnn.heatmaps(x)
    assert heat.shape == (5, 5, 8, 8)
    one_by_one = torch.cat([xnn.heatmaps(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(heat, one_by_one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xnn.heatmaps(x, internal_batch_size=2), heat, atol=1e-5, rtol=1e-4)
    xi = x[3:4].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(xnn(xi)[0, 2], xi)
    torch.testing.assert_close(heat[3, 2], (g * xi).sum(1)[0].detach(), atol=1e-6, rtol=1e-5)


# -- saving, loading, resuming ---------------------------------------------------------------


def test_save_load_round_trip(linear3, tmp_path):
    net, _, xte, xnn = linear3
    folder = xnn.save(tmp_path / "xnn")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "xnn.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "trustvision-xnn" and cfg["n_concepts"] == 3 and cfg["epochs_done"] == 150
    back = XNN.load(folder, net)
    assert torch.equal(back.features_of(xte), xnn.features_of(xte))
    assert torch.equal(back.heatmaps(xte[:4]), xnn.heatmaps(xte[:4]))
    assert back.metrics(xte) == xnn.metrics(xte)
    with pytest.raises(TrustVisionError, match="fitted on another model") as err:
        XNN.load(folder, Linear3(seed=1))
    assert "\n" not in str(err.value)
    with pytest.raises(TrustVisionError, match="no saved XNN"):
        XNN.load(tmp_path / "nothing", net)


def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    net, x = Linear3().eval(), block_images(300, 3)
    kw = {"epochs": 12, "seed": 4, "batch_size": 128}
    whole = XNN(net, n_concepts=3).fit(x, **kw)
    lines: list[str] = []
    XNN(net, n_concepts=3).fit(x, **kw, stop_after=5, checkpoint=tmp_path / "ck", checkpoint_every=2,
                               track=line_tracker(lines.append))
    assert len(lines) == 5 and lines[-1].startswith("xnn fit: 5/5")
    assert (tmp_path / "ck" / "optimizer.safetensors").exists()
    resumed = XNN(net, n_concepts=3).fit(x, **kw, resume_from=tmp_path / "ck")
    assert resumed.epochs_done == whole.epochs_done == 12
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert resumed.history == whole.history
    # the same seed, the same XNN; another seed, another one
    assert torch.equal(XNN(net, n_concepts=3).fit(x, **kw).V, whole.V)
    assert not torch.equal(XNN(net, n_concepts=3).fit(x, **{**kw, "seed": 5}).V, whole.V)
    with pytest.raises(TrustVisionError, match="lr=0.003, not 0.01"):
        XNN(net, n_concepts=3).fit(x, **kw, lr=0.01, resume_from=tmp_path / "ck")
    with pytest.raises(TrustVisionError, match="no optimizer state"):
        XNN(net, n_concepts=3).fit(x, **kw, resume_from=whole.save(tmp_path / "saved"))


def test_layers_and_errors():
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8, widths=(4, 6)).eval()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    conv = XNN(net, layer="body.0", n_concepts=2)  # conv-BN-ReLU (N, 4, 8, 8): global-average-pooled
    z, logits = conv.activations(x)
    assert z.shape == (40, 4) and torch.allclose(logits, net(x))
    conv.fit(x, epochs=2)
    assert conv.heatmaps(x[:2]).shape == (2, 2, 8, 8)
    with pytest.raises(TrustVisionError, match="did you mean 'body.0'"):
        XNN(net, layer="bdy.0")
    with pytest.raises(TrustVisionError, match="has no features"):
        XNN(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(TrustVisionError, match="not fitted"):
        XNN(net).heatmaps(x[:1])
    with pytest.raises(TrustVisionError, match="n_concepts"):
        XNN(net, n_concepts=0)


# -- the registered explainer ----------------------------------------------------------------


def test_registered_concepts_explainer(linear3, tmp_path):
    net, xtr, xte, xnn = linear3
    assert explain.get("xnn") is XNNExplainer
    info = explain.method_info("xnn")
    assert info["kind"] == "concepts" and info["in_audit"] is False and "xnn" not in explain.list_methods()
    assert "xnn" in explain.list_methods(kind="concepts")
    with pytest.raises(TrustVisionError, match="fit_on=") as err:
        XNNExplainer(net).attribute(xte[:2])
    assert "\n" not in str(err.value)
    res = XNNExplainer(net, xnn=xnn).attribute(xte[:3], target=None)
    assert len(res) == 3
    torch.testing.assert_close(torch.tensor(res[0].values), torch.tensor(xnn.explain(xte[:1])[0].values))
    d = json.loads(json.dumps(res[0].to_json()))
    assert d["method"] == "xnn" and len(d["values"]) == 3 and len(d["heatmaps"]) == 3
    assert set(res[0].summary()) == {"xnn_top_feature", "xnn_top_contribution", "xnn_top_value", "xnn_estimate",
                                     "xnn_logit"}
    paths = res[0].render(tmp_path / "img0")
    assert [p.name for p in paths] == ["img0.png"] and paths[0].stat().st_size > 0
    # a saved folder works as well; fitting on demand is cached per explainer
    saved = XNNExplainer(net).attribute(xte[:3], xnn=xnn.save(tmp_path / "x"))
    assert [r.values for r in saved] == [r.values for r in res]
    ex = XNNExplainer(net)
    a = ex.attribute(xte[:2], fit_on=xtr[:256], n_concepts=2)
    first = ex._fitted_on[3]
    ex.attribute(xte[:2], fit_on=ex._fitted_on[0], n_concepts=2)
    assert ex._fitted_on[3] is first and len(a[0].values) == 2
    with pytest.raises(TrustVisionError, match="xnn has no keyword 'n_concept'"):
        ex.attribute(xte[:2], n_concept=2)
    # through the shared sample helper (the command line's and the audit's path)
    ds = data.TensorImageDataset(xte[:8], net(xte[:8]).argmax(1), ["a", "b", "c", "d"], "blocks", "test")
    out = explain.explain_sample(net, ds, "xnn", 4, method_kw={"xnn": xnn})
    assert out.heatmaps is None and len(out.results) == 4 and "xnn_top_feature" in out.rows()[0]


# -- the zoo models --------------------------------------------------------------------------


def test_digits_agreement_with_five_x_features(digits):
    _, xnn = digits
    m = xnn.metrics(data.load("digits", split="test"))
    assert isinstance(m, XNNMetrics) and m.n == 450 and m.reference == "labels"
    assert m.agreement >= 0.95, m
    assert len(m.ablation) == 5 and all(a < m.accuracy for a in m.ablation)  # every x-feature matters
    assert 0.0 <= m.sparsity <= 1.0 and 0.0 <= m.mean_abs_cos < 0.6 and m.dead == 0
    assert json.loads(json.dumps(m.to_json()))["agreement"] == m.agreement


def test_shortcut_digits_marker_x_features():
    """Ground truth: the zoo model reads a class-specific marker pixel. Each x-feature detects the
    markers of some classes: the x-feature credited with a class (largest mean contribution to its
    logit on the class's marked *training* images) puts >= 50% of its positive heatmap mass on the
    marker pixel of marked test images, and its value separates marked from unmarked test images of
    its classes (AUROC >= 0.9)."""
    net = models.load("zoo:small-cnn-shortcut-digits")
    train = data.load("shortcut-digits", split="train")  # every image marked (half with a conflicting digit)
    xnn = XNN(net, n_concepts=5).fit(train, seed=0)
    xt, yt = train.tensors()
    contrib = xnn.V.detach()[yt] * xnn.features_of(xt)
    credited = torch.stack([contrib[yt == c].mean(0).argmax() for c in range(10)])
    marked = data.load("shortcut-digits", split="test", marked=True)
    clean = data.load("shortcut-digits", split="test")
    (xm, ym), (xu, yu) = marked.tensors(), clean.tensors()
    heat = xnn.heatmaps(xm).clamp_min(0)
    mass = (heat * marked.masks).sum((2, 3)) / heat.sum((2, 3)).clamp_min(1e-12)  # (N, L)
    em, eu = xnn.features_of(xm), xnn.features_of(xu)
    n = torch.arange(len(ym))
    pooled_mass = float(mass[n, credited[ym]].mean())
    pooled_auroc = auroc(em[n, credited[ym]], eu[n, credited[yu]])
    assert pooled_mass >= 0.5 and pooled_auroc >= 0.9, (pooled_mass, pooled_auroc)
    aligned = []
    for l in credited.unique().tolist():
        classes = (credited == l).nonzero().flatten()
        sm, su = torch.isin(ym, classes), torch.isin(yu, classes)
        if float(mass[sm, l].mean()) >= 0.5 and auroc(em[sm, l], eu[su, l]) >= 0.9:
            aligned.append(l)
    assert aligned, "no x-feature aligns with the marker"


def _marker_scores(xnn, ds):
    """Per x-feature: AUROC of its value, marked vs unmarked images of ``ds``, and the mean share
    of its positive heatmap mass on the marker pixel of the marked ones."""
    x, m = ds.tensors()[0], ds.marked
    e = xnn.features_of(x)
    heat = xnn.heatmaps(x[m]).clamp_min(0)
    mass = ((heat * ds.masks[m]).sum((2, 3)) / heat.sum((2, 3)).clamp_min(1e-12)).mean(0)
    return torch.tensor([auroc(e[m, l], e[~m, l]) for l in range(e.shape[1])]), mass


def test_shortcut_digits_one_x_feature_for_all_markers():
    """The literal ground-truth target: ONE x-feature whose heatmap mass on the marker is >= 0.5 on
    marked test images and whose value separates all marked from all unmarked test images (AUROC
    >= 0.9). Met by the documented configuration (module docstring: 11 x-features, a read-out bias,
    no pull-away, fitted on a half-marked training split; 5 of 5 seeds, this is seed 0), the
    x-feature chosen on the validation split, not on the test split. The defaults do not meet it."""
    net = models.load("zoo:small-cnn-shortcut-digits")
    train = data.load("shortcut-digits", split="train", marker_fraction=0.5)
    val = data.load("shortcut-digits", split="val", marker_fraction=0.5, return_mask=True)
    test = data.load("shortcut-digits", split="test", marker_fraction=0.5, return_mask=True)
    assert 0.4 < float(test.marked.float().mean()) < 0.6 and 0.4 < float(train.marked.float().mean()) < 0.6
    xnn = XNN(net, n_concepts=11, bias=True, eta=0.0).fit(train, seed=0)
    a_val, m_val = _marker_scores(xnn, val)
    chosen = int(torch.minimum(a_val, 2 * m_val).argmax())
    a_test, m_test = _marker_scores(xnn, test)
    assert float(a_test[chosen]) >= 0.9 and float(m_test[chosen]) >= 0.5, (chosen, a_test, m_test)
    assert xnn.metrics(test).agreement >= 0.95
    # the defaults (pull-away on, no bias, L = 5) on the same data: no x-feature does
    plain = XNN(net, n_concepts=5).fit(train, seed=0)
    a, m = _marker_scores(plain, test)
    assert not bool(((a >= 0.9) & (m >= 0.5)).any()), (a, m)
