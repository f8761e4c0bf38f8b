"""Deletion / insertion: hand-computed curves and AUCs, the trapezoid rule on a partial last
step (the reference's off-by-one), batched == one image at a time."""

import pytest
import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.evaluate.faithfulness import deletion_insertion, trapezoid_auc


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MeanProb(nn.Module):
    """Two classes with p(class 0) = mean pixel value, exactly."""

    def forward(self, x):
        m = x.mean((1, 2, 3)).clamp(1e-9, 1 - 1e-9)
        return torch.stack([m.log(), (1 - m).log()], 1)


def by_hand(values, order, counts, n):
    """Deletion and insertion curves of MeanProb with a zero baseline, one pixel per cell."""
    dele, ins = [], []
    for k in counts:
        kept = [values[c] for c in order[k:]]
        shown = [values[c] for c in order[:k]]
        dele.append(sum(kept) / n)
        ins.append(sum(shown) / n)
    return dele, ins


def trapz(ys, xs):
    return sum((ys[i] + ys[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))


def test_linear_curve_with_a_partial_last_step_integrates_to_one_half():
    # 16 cells, steps=5 -> 3 cells per step: 0,3,...,15 and a partial last step to 16.
    x = torch.ones(1, 1, 4, 4)
    heat = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    r = deletion_insertion(MeanProb(), x, heat, target=0, baseline="zero", steps=5, cells=4)
    assert r.step == 3
    assert r.fractions == pytest.approx([0, 3 / 16, 6 / 16, 9 / 16, 12 / 16, 15 / 16, 1.0])
    assert r.deletion_curve[0] == pytest.approx([1 - f for f in r.fractions], abs=1e-6)
    assert r.deletion_auc[0] == pytest.approx(0.5, abs=1e-6)
    assert r.insertion_auc[0] == pytest.approx(0.5, abs=1e-6)
    # The reference's uniform-step rule counts the last (1-cell) step as a full step:
    curve = r.deletion_curve[0]
    reference = (sum(curve) - curve[0] / 2 - curve[-1] / 2) / (len(curve) - 1)
    assert abs(reference - 0.5) > 0.04  # ~0.448: the off-by-one we do not repeat


def test_curves_and_aucs_by_hand():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 3, 3, generator=g)
    heat = torch.rand(1, 1, 3, 3, generator=g)
    r = deletion_insertion(MeanProb(), x, heat, target=0, baseline="zero", steps=4, cells=3)
    values = x.flatten().tolist()
    order = sorted(range(9), key=lambda c: -heat.flatten()[c].item())
    counts = [0, 2, 4, 6, 8, 9]
    dele, ins = by_hand(values, order, counts, 9)
    fr = [k / 9 for k in counts]
    assert r.fractions == pytest.approx(fr)
    assert r.deletion_curve[0] == pytest.approx(dele, abs=1e-6)
    assert r.insertion_curve[0] == pytest.approx(ins, abs=1e-6)
    assert r.deletion_auc[0] == pytest.approx(trapz(dele, fr), abs=1e-6)
    assert r.insertion_auc[0] == pytest.approx(trapz(ins, fr), abs=1e-6)


def test_good_heatmap_beats_reversed_heatmap():
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    good = deletion_insertion(MeanProb(), x, x, target=0, baseline="zero", cells=4)
    bad = deletion_insertion(MeanProb(), x, -x, target=0, baseline="zero", cells=4)
    for i in range(2):
        assert good.deletion_auc[i] < bad.deletion_auc[i]
        assert good.insertion_auc[i] > bad.insertion_auc[i]


def test_batched_equals_one_at_a_time_and_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5))
    x = torch.rand(3, 3, 8, 8)
    heat = torch.rand(3, 1, 8, 8)
    full = deletion_insertion(model, x, heat, baseline="blur")
    chunked = deletion_insertion(model, x, heat, baseline="blur", internal_batch_size=7)
    singles = [deletion_insertion(model, x[i : i + 1], heat[i : i + 1], baseline="blur") for i in range(3)]
    for i in range(3):
        assert full.deletion_curve[i] == pytest.approx(singles[i].deletion_curve[0], abs=1e-5)
        assert full.insertion_auc[i] == pytest.approx(singles[i].insertion_auc[0], abs=1e-6)
        assert chunked.deletion_auc[i] == pytest.approx(full.deletion_auc[i], abs=1e-6)
    assert full.target == model(x).argmax(1).tolist()
    s = full.summary()
    assert s["n"] == 3 and 0 <= s["deletion_mean"] <= 1
    # endpoints: deletion starts at the full image, insertion ends at it
    p = torch.softmax(model(x), 1).max(1).values
    assert [c[0] for c in full.deletion_curve] == pytest.approx(p.tolist(), abs=1e-5)
    assert [c[-1] for c in full.insertion_curve] == pytest.approx(p.tolist(), abs=1e-5)


def test_trapezoid_auc_and_errors():
    fr = torch.tensor([0.0, 0.5, 1.0])
    assert float(trapezoid_auc(torch.tensor([1.0, 1.0, 0.0]), fr)) == pytest.approx(0.75)
    with pytest.raises(TrustVisionError, match="heatmaps must have shape"):
        deletion_insertion(MeanProb(), torch.rand(2, 1, 4, 4), torch.rand(3, 1, 4, 4))


def test_a_baseline_that_keeps_the_class_is_reported():
    """MeanProb (p(class 0) = mean pixel) on images of mean 0.8 and 1.0: a black baseline takes
    the class from both; a constant 0.45 image keeps it for the first (0.45 >= 0.5 * 0.8) and not
    for the second (0.45 < 0.5 * 1.0)."""
    x = torch.full((2, 1, 4, 4), 0.8)
    x[1] = 1.0
    heat = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = deletion_insertion(MeanProb(), x, heat, target=0, baseline="zero", cells=4)
    assert zero.baseline_probability == pytest.approx([1e-9, 1e-9], abs=1e-7)
    assert zero.baseline_keeps_class == [False, False] and zero.summary()["baseline_keeps_class"] == 0
    grey = deletion_insertion(MeanProb(), x, heat, target=0, baseline=0.45, cells=4)
    assert grey.baseline_probability == pytest.approx([0.45, 0.45], abs=1e-6)
    assert grey.baseline_keeps_class == [True, False]  # 0.45 >= 0.5 * 0.8, 0.45 < 0.5 * 1.0
    assert grey.summary()["baseline_keeps_class"] == 1
    assert grey.to_json()["baseline_keeps_class"] == [True, False]


def test_adaptive_blur_baseline_is_the_uninformative_one():
    """``baseline="adaptive-blur"`` scores against uninformative_baseline's images (the blur
    strengthened per image until the class is gone), exactly as passing them as a tensor."""
    from trustvision._utils.images import uninformative_baseline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5))
    x = torch.rand(4, 3, 8, 8)
    heat = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    t = p.argmax(1)
    base, p_base, _, _ = uninformative_baseline(model, x, t, p.max(1).values)
    auto = deletion_insertion(model, x, heat, baseline="adaptive-blur")
    given = deletion_insertion(model, x, heat, baseline=base)
    assert auto.deletion_auc == pytest.approx(given.deletion_auc, abs=1e-6)
    assert auto.insertion_auc == pytest.approx(given.insertion_auc, abs=1e-6)
    assert auto.baseline_probability == pytest.approx(p_base.tolist(), abs=1e-5)
