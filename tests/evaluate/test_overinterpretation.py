"""Overinterpretation experiments (trustvision.evaluate.overinterpretation) with real values: the
shortcut-digits ground truth, backward-selection subsets vs random ones, retraining on them, the
border frame, input dropout off at evaluation, the default method and the per-image cache."""

import pytest
import torch

from trustvision import data, models
from trustvision.errors import TrustVisionError
from trustvision.evaluate import overinterpretation as oi
from trustvision.explain import sis as sis_mod
from trustvision.train import InputDropout

N = 40  # marked test images of the shortcut experiments (exact SIS: ~0.1 s each on one core)


def _sample(ds, n, seed=0):
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x, y = ds.tensors()
    return idx, x[idx], y[idx]


@pytest.fixture(scope="module")
def shortcut():
    """The shortcut model's backward selections of N marked test images (training-set mean mask)."""
    net = models.load("zoo:small-cnn-shortcut-digits").eval()
    train = data.load("shortcut-digits", split="train")
    test = data.load("shortcut-digits", split="test", marked=True)
    fill = oi.training_mean(train)
    idx, x, y = _sample(test, N)
    sel = oi.backward_selections(net, x, mask=fill)
    return {"net": net, "fill": fill, "idx": idx, "x": x, "y": y, "sel": sel, "marker": test.masks[idx, 0].bool(),
            "train": train}


def test_training_mean_is_the_data_mean_not_the_normalisation_mean(shortcut):
    x, _ = data.load("digits", split="train").tensors()
    m = oi.training_mean(data.load("digits", split="train"))
    assert m.shape == (1, 1, 1)
    assert float(m) == pytest.approx(float(x.double().mean()), abs=1e-6)
    assert abs(float(m) - 0.5) > 0.1  # the zoo models normalise with 0.5: not the data's mean
    t = oi.training_mean(data.load("textures", split="train"))
    assert t.shape == (3, 1, 1)


def test_shortcut_marker_is_in_the_sis_and_the_sis_is_smaller_than_the_clean_models(shortcut):
    res = [b.sis(0.9) for b in shortcut["sel"]]
    ok = [i for i, r in enumerate(res) if r.ok]
    assert len(ok) >= 0.75 * N
    hits = sum(bool((res[i].pixel_mask & shortcut["marker"][i]).any()) for i in ok)
    assert hits >= 0.9 * len(ok), f"marker in {hits} of {len(ok)} SISes"
    clean_net = models.load("zoo:small-cnn-digits").eval()
    _, xc, _ = _sample(data.load("digits", split="test"), N)
    clean = oi.backward_selections(clean_net, xc, mask=oi.training_mean(data.load("digits", split="train")))
    short_med = oi.sis_sizes(shortcut["sel"], 0.9)["median_fraction"]
    clean_med = oi.sis_sizes(clean, 0.9)["median_fraction"]
    assert short_med < clean_med, (short_med, clean_med)


def test_backward_selection_subsets_beat_random_subsets_on_the_shortcut_model(shortcut):
    rows = oi.subset_table(shortcut["net"], shortcut["x"], shortcut["y"], shortcut["sel"], shortcut["fill"],
                           [0.05, 0.2], seed=0)
    five = rows[0]
    assert five["pixels"] == 3 and five["n"] == N  # round(0.05 * 64)
    assert five["bs_accuracy"] >= 0.85
    assert five["bs_accuracy"] > five["random_accuracy"] + 0.4
    # the 5% kept last hold the marker: the model keeps its confidence on them
    kept = oi.kept_last_masks(shortcut["sel"], 0.05)
    assert kept.shape == (N, 8, 8) and bool((kept.sum((1, 2)) == 3).all())
    assert float((kept & shortcut["marker"]).any((1, 2)).double().mean()) >= 0.9


def test_retraining_on_backward_selection_subsets_keeps_the_signal(shortcut):
    """A fresh small-cnn trained on the 5% BS subsets of 48 marked training images (computed on
    those same images) classifies the test subsets far better than one trained on random 5%."""
    train = data.load("shortcut-digits", split="train", marked=True, conflict_fraction=0.0)
    _, xtr, ytr = _sample(train, 48, seed=1)
    net = shortcut["net"]
    tsel = oi.backward_selections(net, xtr, mask=shortcut["fill"])
    settings = {**oi.training_settings(net, epochs=30), "batch_size": 16}
    r = oi.retrain_on_subsets(net, (xtr, ytr), tsel, (shortcut["x"], shortcut["y"]), shortcut["sel"],
                              shortcut["fill"], fraction=0.05, settings=settings, seed=0)
    assert r["n_train"] == 48 and r["chance"] == 0.1
    assert r["bs_accuracy"] > r["random_accuracy"] + 0.3, r


def test_fresh_model_follows_the_stored_architecture():
    net = models.load("zoo:small-cnn-textures")
    fresh = oi.fresh_model(net)
    assert fresh.tv_config["architecture"] == "small-cnn" and tuple(fresh.tv_config["image_size"]) == (32, 32)
    assert torch.equal(fresh.norm_mean, net.norm_mean)
    assert not torch.equal(fresh.fc.weight, net.fc.weight)  # untrained
    s = oi.training_settings(net, epochs=3)
    assert s == {"epochs": 3, "lr": 0.003, "batch_size": 64, "opt": "adam", "weight_decay": 0.0, "sched": "cosine"}
    with pytest.raises(TrustVisionError, match="not a registered model") as err:
        oi.fresh_model(_odd())
    assert "\n" not in str(err.value)


def _odd():
    m = torch.nn.Linear(2, 2)
    m.tv_config = {"architecture": "odd", "num_classes": 2, "in_chans": 1, "image_size": [2, 2]}
    return m


def test_border_frame_holds_the_nearest_fraction_to_five_percent():
    assert oi.border_width(8, 8) == (1, 28 / 64)  # the thinnest frame already holds 43.8%
    d, f = oi.border_width(32, 32)
    assert (d, f) == (1, 124 / 1024)
    d, f = oi.border_width(299, 299)
    assert d == 4 and f == pytest.approx(1 - 291 ** 2 / 299 ** 2) and abs(f - 0.05) < 0.005
    d, f = oi.border_width(224, 224)
    assert d == 3 and abs(f - 0.05) < abs(oi.border_width(224, 224, 0.07)[1] - 0.05) + 1e-9
    m = oi.border_mask(8, 8, 1)
    assert int(m.sum()) == 28 and not bool(m[1:7, 1:7].any()) and bool(m[0].all())


def test_input_dropout_is_off_at_evaluation():
    drop = InputDropout(0.5, fill=torch.full((1, 1, 1, 1), 0.25), generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, 1, 8, 8) + 1.0
    assert torch.equal(drop.eval()(x), x)
    dropped = drop.train()(x)
    assert bool((dropped == 0.25).any()) and bool((dropped == x).any())
    # a model trained with input dropout: dropout lives in fit's loop, the model itself is deterministic
    train = data.load("digits", split="train")
    xtr, ytr = train.tensors()
    net = oi.train_model(models.load("zoo:small-cnn-digits"), xtr[:64], ytr[:64],
                         settings={**oi.training_settings(models.load("zoo:small-cnn-digits"), 1)},
                         input_dropout=0.8)
    assert not net.training and not any(isinstance(m, InputDropout) for m in net.modules())
    xt = data.load("digits", split="test").tensors()[0][:3]
    with torch.no_grad():
        assert torch.equal(net(xt), net(xt))
    a = oi.backward_selections(net, xt[:2], mask=0.3 * torch.ones(1, 1, 1))
    b = oi.backward_selections(net, xt[:2], mask=0.3 * torch.ones(1, 1, 1))
    assert [s.order for s in a] == [s.order for s in b]


def test_default_method_exact_up_to_256_features():
    assert oi.default_method((8, 8)) == "exact" and oi.default_method((16, 16)) == "exact"
    assert oi.default_method((16, 17)) == "bgsis" and oi.default_method((32, 32)) == "bgsis"
    assert oi.default_method((224, 224), "patch:8") == "bgsis" and oi.default_method((224, 224), "patch:16") == "exact"
    net = models.load("zoo:small-cnn-digits")
    assert type(oi.make_selector(net, (8, 8))) is sis_mod.SIS
    assert type(oi.make_selector(net, (32, 32))) is sis_mod.BatchedGradientSIS
    with pytest.raises(TrustVisionError, match="unknown SIS method"):
        oi.make_selector(net, (8, 8), method="fast")


def test_random_masks_are_seeded_and_sized():
    a = oi.random_masks(5, (8, 8), 0.05, seed=3)
    assert a.shape == (5, 8, 8) and bool((a.sum((1, 2)) == 3).all())
    assert torch.equal(a, oi.random_masks(5, (8, 8), 0.05, seed=3))
    assert not torch.equal(a, oi.random_masks(5, (8, 8), 0.05, seed=4))
    p = oi.random_masks(2, (10, 10), 0.25, seed=0, features="patch:4")  # 3 x 3 grid, 2 patches each
    assert p.shape == (2, 10, 10)
    x = torch.rand(2, 3, 10, 10)
    shown = oi.show_only(x, p, torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
    assert torch.equal(shown[:, :, p[0]][0], x[0][:, p[0]]) and float(shown[0, 2][~p[0]][0]) == pytest.approx(0.3)


def test_cache_stores_each_image_and_a_rerun_recomputes_nothing(monkeypatch):
    net = models.load("zoo:small-cnn-digits").eval()
    x = data.load("digits", split="test").tensors()[0][:6]
    fill = torch.full((1, 1, 1), 0.3)
    seen = []
    real = sis_mod.SIS._backselect

    def counting(self, xs, t, excluded=None):
        seen.append(xs.shape[0])
        return real(self, xs, t, excluded)

    monkeypatch.setattr(sis_mod.SIS, "_backselect", counting)
    cache: dict = {}
    first = oi.backward_selections(net, x[:4], mask=fill, cache=cache, chunk=2)
    assert seen == [2, 2] and len(cache) == 4
    again = oi.backward_selections(net, x, mask=fill, cache=cache, chunk=2)
    assert seen == [2, 2, 2]  # only the two new images
    assert [b.order for b in again[:4]] == [b.order for b in first]
    assert [b.values for b in again[:4]] == [b.values for b in first]
    assert again[0].sis(0.9).size == first[0].sis(0.9).size and again[0].image is not None
    # another mask value is another key
    oi.backward_selections(net, x[:2], mask=torch.full((1, 1, 1), 0.0), cache=cache, chunk=2)
    assert seen[-1] == 2 and len(cache) == 8
