"""SIS, SIS collections and Batched Gradient SIS (trustvision.explain.sis) on tiny inputs, against an
exhaustive backward selection written here; statuses, ties, patches, the registry and the errors."""

import json
import math

import pytest
import torch
from torch import nn

from trustvision import explain
from trustvision.errors import TrustVisionError
from trustvision.explain.sis import BatchedGradientSIS, SIS, SISResult, mask_images


def tiny_net(c: int, h: int, w: int, classes: int = 3, seed: int = 0, gain: float = 3.0) -> nn.Module:
    """A fixed conv + linear net (float64: exact comparisons are not at the mercy of rounding)."""
    g = torch.Generator().manual_seed(seed)
    conv, fc = nn.Conv2d(c, 3, 3, padding=1), nn.Linear(3 * h * w, classes)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(3, generator=g) * 0.1)
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * gain / math.sqrt(3 * h * w))
        fc.bias.zero_()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), fc).double().eval()


class Count(nn.Module):
    """Class 0 logit = a * sum(x) - b, class 1 = 0 (exact ties on 0/1 images)."""

    def __init__(self, a: float = 1.0, b: float = 0.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        v = self.a * x.flatten(1).sum(1) - self.b
        return torch.stack([v, torch.zeros_like(v)], 1)


class Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([[4.0, 0.0]], dtype=x.dtype).expand(x.shape[0], 2)


def f_of(model, x, t):
    with torch.no_grad():
        return float(torch.softmax(model(x[None]), 1)[0, t])


def groups(h, w, k):
    """Pixel groups (list of (rows, cols)) of the features, in feature order."""
    gw = math.ceil(w / k)
    out = [([], []) for _ in range(math.ceil(h / k) * gw)]
    for r in range(h):
        for c in range(w):
            out[(r // k) * gw + c // k][0].append(r)
            out[(r // k) * gw + c // k][1].append(c)
    return out


def exhaustive(model, x, t, base, k=1):
    """Backward selection by brute force, one candidate per forward pass: (order, values)."""
    feats = groups(*x.shape[-2:], k)
    cur, remaining, order, values = x.clone(), list(range(len(feats))), [], []
    while remaining:
        best, best_f = None, -1.0
        for j in remaining:  # ascending: a strict > keeps the lowest index on ties
            cand = cur.clone()
            rr, cc = feats[j]
            cand[:, rr, cc] = base[:, rr, cc]
            fj = f_of(model, cand, t)
            if fj > best_f:
                best, best_f = j, fj
        rr, cc = feats[best]
        cur[:, rr, cc] = base[:, rr, cc]
        remaining.remove(best)
        order.append(best)
        values.append(best_f)
    return order, values


def exhaustive_sis(order, values, fx, tau):
    """Walk back from the end of the order, adding features until f >= tau."""
    s = [fx] + values
    j = max(i for i in range(len(order) + 1) if s[i] >= tau)
    return sorted(order[j:])


def through(res: SISResult, keep=None) -> torch.Tensor:
    m = res.pixel_mask if keep is None else keep
    return torch.where(m.unsqueeze(0), res.image, res.mask_image)


def feature_pixels(res: SISResult, features) -> torch.Tensor:
    h, w = res.image.shape[-2:]
    k = 1 if res.features == "pixel" else int(res.features.split(":")[1])
    m = torch.zeros(h, w, dtype=torch.bool)
    for j in features:
        rr, cc = groups(h, w, k)[j]
        m[rr, cc] = True
    return m


def _tau_between(model, x, t, mask):
    """A threshold halfway between f on the fully masked input and f on the image."""
    fx = f_of(model, x, t)
    fe = f_of(model, mask_images(model, x[None], mask)[0], t)
    return fx, fe, (fx + fe) / 2


def calibrated_net(x: torch.Tensor, mask, seed: int = 0, f_image: float = 0.97,
                   f_masked: float = 0.15) -> nn.Module:
    """A fixed conv + softplus + linear net (float64) whose class 0 has probability ``f_image`` on
    ``x`` and ``f_masked`` on its fully masked version, so that a SIS at 0.9 needs many pixels."""
    c, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    conv, fc = nn.Conv2d(c, 3, 3, padding=1), nn.Linear(3 * h * w, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g).abs() - 0.3)
        conv.bias.copy_(torch.randn(3, generator=g) * 0.1)
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0] = torch.rand(3 * h * w, generator=g)
        net = nn.Sequential(conv, nn.Softplus(), nn.Flatten(), fc).double().eval()
        u1, u0 = net(x[None])[0, 0], net(mask_images(net, x[None], mask))[0, 0]
        l1, l0 = (math.log(2 * f / (1 - f)) for f in (f_image, f_masked))
        a = (l1 - l0) / (u1 - u0)
        fc.weight[0] *= a
        fc.bias[0] = l0 - a * u0
    return net


#: (channels, height, width, seed, mask, calibrated net or the random tiny_net)
CASES = [(1, 4, 4, 0, "zeros", True), (1, 4, 4, 1, "mean", True), (3, 5, 5, 2, "blur", True),
         (3, 5, 5, 3, "zeros", True), (1, 5, 5, 8, "zeros", True), (3, 5, 5, 2, "blur", False),
         (1, 5, 5, 4, "zeros", False)]


@pytest.mark.parametrize("c,h,w,seed,mask,calibrated", CASES)
def test_find_equals_exhaustive_backward_selection(c, h, w, seed, mask, calibrated):
    x = torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    net = calibrated_net(x, mask, seed) if calibrated else tiny_net(c, h, w, seed=seed)
    with torch.no_grad():  # explain the class the image raises most above the masked input
        gain = torch.softmax(net(x[None]), 1) - torch.softmax(net(mask_images(net, x[None], mask)), 1)
        t = int(gain.argmax())
    fx, fe, tau = _tau_between(net, x, t, mask)
    tau = 0.9 if calibrated else tau
    assert fx > tau > fe, "the test case needs a gap between the image and the masked input"
    sis = SIS(net, threshold=tau, mask=mask)
    bs = sis.backselect(x, target=t)
    order, values = exhaustive(net, x, t, mask_images(net, x[None], mask)[0])
    assert bs.order == order and bs.target == t
    torch.testing.assert_close(torch.tensor(bs.values), torch.tensor(values), atol=1e-10, rtol=0)
    res = sis.find(x, target=t)
    assert res.status == "ok" and res.order == order
    assert sorted(res.indices) == exhaustive_sis(order, values, fx, tau)
    assert res.mask.shape == (h, w) and res.mask.dtype == torch.bool and int(res.mask.sum()) == res.size
    assert res.evaluations == h * w * (h * w + 1) // 2 + 1
    # sufficient, and removing any one feature (the first added back included) drops below tau
    assert f_of(net, through(res), t) >= tau
    assert res.confidence == pytest.approx(f_of(net, through(res), t), abs=1e-10)
    for j in res.indices:
        rest = [q for q in res.indices if q != j]
        assert f_of(net, through(res, feature_pixels(res, rest)), t) < tau, j


def test_patch_features_equal_exhaustive():
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    net, t, tau = calibrated_net(x, "zeros", 5), 0, 0.9
    fx = f_of(net, x, t)
    res = SIS(net, threshold=tau, mask="zeros", features="patch:2").find(x, target=t)
    assert res.size >= 3
    order, values = exhaustive(net, x, t, torch.zeros_like(x), k=2)
    assert res.order == order and res.grid == (3, 3) and res.mask.shape == (3, 3)
    assert sorted(res.indices) == exhaustive_sis(order, values, fx, tau)
    assert res.evaluations == 9 * 10 // 2 + 1
    # the pixel mask covers whole patches (the last row / column of patches is 1 pixel wide)
    pm = res.pixel_mask
    assert pm.shape == (5, 5) and torch.equal(pm, feature_pixels(res, res.indices))
    assert f_of(net, through(res), t) >= tau
    assert res.to_json()["features"] == "patch:2"


def test_ties_go_to_the_lowest_feature_index():
    # every removal of a 0/1 image leaves the same count: exact ties at every step
    x = torch.ones(1, 4, 4)
    net = Count(a=1.0, b=6.0)  # f >= 0.9 needs sum >= 6 + ln 9 = 8.2, i.e. 9 pixels
    res = SIS(net, threshold=0.9, mask="zeros").find(x, target=0)
    assert res.order == list(range(16))
    assert sorted(res.indices) == list(range(7, 16)) and res.indices[0] == 15 and res.size == 9
    for r in SIS(net, threshold=0.9, mask="zeros").find_batch(torch.ones(2, 1, 4, 4), 0):  # the batched path
        assert r.order == list(range(16)) and r.indices == res.indices
    bg = BatchedGradientSIS(net, threshold=0.9, mask="zeros", noise=0.0, k=3).find(x, targets=0)[0]
    assert bg.order == list(range(16)) and bg.size == 9


def test_find_batch_equals_one_by_one_and_chunking_does_not_matter():
    net = tiny_net(3, 5, 5, seed=7)
    xs = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sis = SIS(net, threshold=0.6, mask="mean")
    batch = sis.find_batch(xs)
    small = SIS(net, threshold=0.6, mask="mean", internal_batch_size=7).find_batch(xs, [r.target for r in batch])
    chunked = SIS(net, threshold=0.6, mask="mean", internal_batch_size=7)
    for i, (b, s) in enumerate(zip(batch, small)):
        one, one_chunked = sis.find(xs[i]), chunked.find(xs[i], b.target)  # one image: its own loop
        for other in (one, one_chunked, s):
            assert other.order == b.order and torch.equal(other.mask, b.mask) and other.status == b.status
            assert other.values == pytest.approx(b.values, abs=1e-12)


def test_collection_is_disjoint_and_each_set_sufficient():
    x = 0.5 + 0.5 * torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(3))
    net = Count(a=1.0, b=2.0)  # any few bright pixels suffice: several disjoint SISes
    sis = SIS(net, threshold=0.9, mask="zeros")
    sets = sis.collection(x, target=0)
    assert len(sets) >= 3 and all(r.ok for r in sets)
    seen = torch.zeros(5, 5, dtype=torch.bool)
    for r in sets:
        assert not (seen & r.mask).any()
        seen |= r.mask
        assert f_of(net, through(r), 0) >= 0.9
    # what is left after the last SIS is no longer sufficient
    assert f_of(net, torch.where(seen.unsqueeze(0), torch.zeros_like(x), x), 0) < 0.9
    assert sets[0].indices == sis.find(x, target=0).indices
    assert len(sis.collection(x, target=0, max_sets=2)) == 2
    # the same on a tiny CNN: disjoint and sufficient
    cnn = tiny_net(1, 4, 4, seed=1, gain=6.0)
    xc = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = int(cnn(xc[None]).argmax())
    _, _, tau = _tau_between(cnn, xc, t, "zeros")
    col = SIS(cnn, threshold=tau, mask="zeros").collection(xc)
    masks = torch.stack([r.mask for r in col])
    assert all(r.ok for r in col) and int(masks.sum(0).max()) == 1
    assert all(f_of(cnn, through(r), t) >= tau for r in col)


def test_statuses_say_why_there_is_no_subset():
    x = torch.ones(1, 4, 4)
    low = SIS(Count(a=0.1, b=1.0), threshold=0.9, mask="zeros").find(x, target=0)
    assert low.status == "below-threshold" and low.size == 0 and not low.mask.any() and low.confidence is None
    assert "no subset can be sufficient" in low.reason
    none = SIS(Constant(), threshold=0.9, mask="zeros").find(x, target=0)
    assert none.status == "no-subset-needed" and none.size == 0 and not none.mask.any()
    assert none.confidence == pytest.approx(torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item())
    assert "fully masked input" in none.reason and "does not rest on any feature" in none.reason
    for r in (low, none):
        assert len(r.order) == 16  # the order is kept all the same
        json.dumps(r.to_json())
    assert [r.status for r in SIS(Constant(), mask="zeros").collection(x, target=0)] == ["no-subset-needed"]
    bg = BatchedGradientSIS(Count(a=0.1, b=1.0), mask="zeros").find(x, 0)[0]
    assert bg.status == "below-threshold"
    # the mean mask is the model's normalisation mean where it has one, else each image's mean
    norm = Count()
    norm.register_buffer("norm_mean", torch.tensor([0.25]).view(1, 1, 1, 1))
    assert torch.equal(mask_images(norm, x[None], "mean"), torch.full((1, 1, 4, 4), 0.25))
    xs = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mask_images(Count(), xs, "mean")[1], xs[1].mean().expand(1, 4, 4))


def test_bgsis_is_sufficient_and_batched_equals_one_by_one():
    xs = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net = calibrated_net(xs[0], "zeros", 2)
    t = torch.zeros(3, dtype=torch.long)
    bg = BatchedGradientSIS(net, threshold=0.9, mask="zeros", k=4, seed=1)
    batch = bg.find(xs, t)
    assert [r.status for r in batch] == ["ok", "below-threshold", "ok"] and batch[0].size > 4
    for i, r in enumerate(batch):
        one = bg.find(xs[i], int(t[i]))[0]
        assert one.order == r.order and torch.equal(one.mask, r.mask)
        assert sorted(r.order) == list(range(25)) and r.gradient_passes == math.ceil(25 / 4)
        if r.ok:
            assert f_of(net, through(r), int(t[i])) >= 0.9
            # removing the last feature added back drops below the threshold
            assert f_of(net, through(r, feature_pixels(r, r.indices[:-1])), int(t[i])) < 0.9
            assert r.evaluations <= r.gradient_passes + 1 + math.ceil(math.log2(4))
    # seeded: the same seed, the same noise; k defaults to ceil(HW / 100) (1 here)
    again = BatchedGradientSIS(net, threshold=0.9, mask="zeros", k=4, seed=1).find(xs, t)
    assert [r.order for r in again] == [r.order for r in batch]
    assert BatchedGradientSIS(net, threshold=0.9, mask="zeros").find(xs[:1], t[:1])[0].gradient_passes == 25
    assert bg.attribute(xs, t, seed=1)[0].order == batch[0].order


def test_registry_attribute_to_json_and_render(tmp_path):
    assert explain.get("sis") is SIS and explain.get("bgsis") is BatchedGradientSIS
    for name in ("sis", "bgsis"):
        cls = explain.get(name)
        assert cls.kind == "subset" and cls.in_audit is False and name not in explain.list_methods()
        assert name in explain.list_methods(kind="subset")
        assert explain.method_info(name)["keywords"]["threshold"] is None
    net = tiny_net(1, 4, 4, seed=1, gain=6.0).float()
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for name in ("sis", "bgsis"):
        res = explain.get(name)(net).attribute(x, target=None, threshold=0.5, mask="zeros")
        assert len(res) == 2 and all(isinstance(r, SISResult) for r in res)
        d = json.loads(json.dumps(res[0].to_json()))
        assert d["method"] == name and d["threshold"] == 0.5 and len(d["order"]) == 16
        assert set(res[0].summary()) == {"sis_status", "sis_size", "sis_fraction", "sis_confidence", "evaluations"}
        paths = res[0].render(tmp_path / name / "img0")
        assert [p.name for p in paths] == ["img0.png"] and paths[0].stat().st_size > 0
    with pytest.raises(TrustVisionError, match="sis has no keyword 'treshold'"):
        SIS(net).attribute(x, treshold=0.5)


@pytest.mark.parametrize("kw,match", [
    ({"threshold": 0.0}, "threshold must be in"), ({"threshold": 1.0}, "threshold must be in"),
    ({"threshold": 1.5}, "threshold must be in"), ({"threshold": "high"}, "threshold must be a number"),
    ({"features": "patch:0"}, "features must be"), ({"features": "patch:x"}, "features must be"),
    ({"features": "pixels"}, "features must be"), ({"mask": "gray"}, "unknown mask"),
    ({"mask": [0.5]}, "mask must be"), ({"internal_batch_size": 0}, "internal_batch_size"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(TrustVisionError, match=match) as err:
        SIS(Count(), **kw)
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line_errors():
    x = torch.rand(2, 1, 4, 4)
    errors = [
        lambda: SIS(Count(), mask=torch.zeros(1, 3, 3)).find(x[0]),  # wrong shape for (1, 4, 4)
        lambda: SIS(Count(), mask=torch.zeros(3, 1, 4, 4)).find_batch(x),  # 3 masks for 2 images
        lambda: SIS(Count()).find(x),  # a batch to the one-image verb
        lambda: SIS(Count()).collection(x[0], max_sets=0),
        lambda: BatchedGradientSIS(Count(), k=0),
        lambda: BatchedGradientSIS(Count(), noise=-1.0),
        lambda: SIS(Count()).attribute(x, threshold=2.0),
    ]
    for call in errors:
        with pytest.raises(TrustVisionError) as err:
            call()
        assert "\n" not in str(err.value)
    # masks that fit: one image's, per channel, one per image
    for m in (torch.zeros(1, 4, 4), torch.zeros(1, 1, 1), torch.zeros(2, 1, 4, 4), 0.25):
        assert len(SIS(Count(), mask=m).find_batch(x, 0)) == 2


def test_shortcut_digits_sis_contains_the_marker():
    """The zoo's shortcut model reads the marker: the exact SIS of >= 90% of the marked test images
    (a seeded sample of 24) contains the marker pixel; the clean digits model needs larger SISes."""
    from trustvision import data, models

    net = models.load("zoo:small-cnn-shortcut-digits").eval()
    ds = data.load("shortcut-digits", split="test", marked=True)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:24].tolist()
    x = torch.stack([ds[i][0] for i in idx])
    marker = ds.masks[idx, 0].bool()
    res = SIS(net, threshold=0.9).find_batch(x)
    ok = [i for i, r in enumerate(res) if r.ok]
    assert len(ok) >= 18
    hits = sum(bool((res[i].mask & marker[i]).any()) for i in ok)
    assert hits >= 0.9 * len(ok)
    clean_net = models.load("zoo:small-cnn-digits").eval()
    clean = data.load("digits", split="test")
    rc = SIS(clean_net, threshold=0.9).find_batch(torch.stack([clean[i][0] for i in idx]))
    sizes = sorted(res[i].size for i in ok)
    clean_sizes = sorted(r.size for r in rc if r.ok)
    assert sizes[len(sizes) // 2] < clean_sizes[len(clean_sizes) // 2]


def test_explain_cli_sis_masks_with_the_training_mean(tmp_path, capsys):
    """`trustvision explain --method sis`: mask="mean" is the training split's mean pixel (digits:
    0.3045), not the zoo model's fixed normalisation mean 0.5; every subset is written as PNG + JSON."""
    import json

    from trustvision import data
    from trustvision.cli import main

    out = tmp_path / "sis"
    assert main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "sis", "--n", "2",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "one subset per image (PNG, JSON)" in capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    x, _ = data.load("digits", split="train").tensors()
    assert scores["method_kw"]["mask"] == f"mean: the training-set mean pixel [{round(float(x.double().mean()), 4)}]"
    for row in scores["images"]:
        stem = out / "sis" / f"{scores['images'].index(row):03d}_idx{row['index']}"
        saved = json.loads(stem.with_suffix(".json").read_text())
        assert saved["status"] == row["sis_status"] and stem.with_suffix(".png").is_file()


def test_largest_first_is_the_stable_descending_sort():
    """BGSIS's top-k pick (topk where the values are distinct) equals a stable descending sort's
    first k on rows with ties, NaN and removed (-inf) features, on the CPU's topk path (more
    than 4,096 scores) and below it."""
    from trustvision.explain.sis import _largest_first

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        p = int(torch.randint(257, 1500, (1,), generator=g))
        rows = 1 if trial % 5 == 0 else int(torch.randint(4, 9, (1,), generator=g))  # 22 of 40 over 4,096: topk
        s = torch.randn(rows, p, generator=g, dtype=torch.float64)
        if trial % 4 == 1:
            s = s.round()  # many ties, at the top too
        elif trial % 4 == 2:
            s[:, : p - 5] = -math.inf  # nearly exhausted: fewer finite scores than take + 1
        elif trial % 4 == 3:
            s[0, 3] = float("nan")
        take = int(torch.randint(1, 20, (1,), generator=g))
        want = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :take]
        assert torch.equal(_largest_first(s, take), want), trial
