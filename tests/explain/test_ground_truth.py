"""Ground truth: on shortcut-digits the class is written as a one-pixel marker. For a model that
relies on the marker, I-GOS / iGOS++ must put >= 50% of their heatmap mass on the marker (its
mask dilated by one pixel) and SAG roots must contain the marker's patch for >= 80% of images.
Saliency, integrated gradients, Grad-CAM and occlusion are measured alongside (figures printed)."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from trustvision import data, explain
from trustvision.data.shortcut import MARKER_POSITIONS

N_IMAGES = 40
N_SAG = 24
SAG_GRID = 4  # 2x2-pixel patches on the 8x8 digits


def marker_reliance(model, x, y, masks) -> float:
    """Accuracy on marked images once the marker pixel is blanked (low = relies on the marker)."""
    with torch.no_grad():
        return float((model(x * (1 - masks)).argmax(1) == y).float().mean())


def ground_truth_figures(model) -> dict:
    torch.manual_seed(0)
    ds = data.load("shortcut-digits", split="test", marked=True, return_mask=True)
    x, y = ds.tensors()
    x, y, masks = x[:N_IMAGES], y[:N_IMAGES], ds.masks[:N_IMAGES]
    dilated = F.max_pool2d(masks, 3, stride=1, padding=1).flatten(1)
    out = {"n_images": N_IMAGES, "accuracy_without_marker": marker_reliance(model, x, y, masks)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ["igos", "igos++", "saliency", "integrated-gradients", "gradcam", "occlusion"]:
            h = explain.get(name)(model).attribute(x, target=y).clamp_min(0).flatten(1)
            frac = (h * dilated).sum(1) / h.sum(1).clamp_min(1e-12)
            out[name] = round(float(frac.mean()), 4)
    all_roots = first_root = 0
    sag = explain.SAG(model, grid=SAG_GRID)
    for i in range(N_SAG):
        res = sag.explain(x[i], target=int(y[i]))
        r, c = MARKER_POSITIONS[int(y[i])]
        patch = (r * SAG_GRID // 8) * SAG_GRID + c * SAG_GRID // 8
        all_roots += bool(res.roots) and all(patch in root for root in res.roots)
        first_root += bool(res.roots) and patch in res.roots[0]
    out["sag_all_roots_contain_marker"] = all_roots / N_SAG
    out["sag_first_root_contains_marker"] = first_root / N_SAG
    return out


def check_figures(fig: dict) -> None:
    print("ground truth figures:", json.dumps(fig))
    assert fig["igos"] >= 0.5, fig
    assert fig["igos++"] >= 0.5, fig
    assert fig["igos"] > fig["saliency"] and fig["igos++"] > fig["saliency"], fig
    assert fig["sag_all_roots_contain_marker"] >= 0.8, fig


@pytest.mark.slow
def test_ground_truth_on_the_shortcut_model():
    """The shipped zoo:small-cnn-shortcut-digits model (trained where the marker predicts the class)."""
    from trustvision import models

    model = models.load("zoo:small-cnn-shortcut-digits").eval()
    fig = ground_truth_figures(model)
    # The model must really read the marker (the ground truth the explanations are judged on).
    assert fig["accuracy_without_marker"] < 0.5, fig
    check_figures(fig)
