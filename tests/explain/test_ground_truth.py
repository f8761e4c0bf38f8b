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


def shortcut_model():
    """zoo:small-cnn-shortcut-digits; if the zoo is not built, the same recipe trained here
    (small-cnn, 15 epochs on the shortcut-digits train split, whose conflicting digits make the
    marker the reliable cue)."""
    from trustvision import models
    from trustvision.errors import TrustVisionError

    try:
        return models.load("zoo:small-cnn-shortcut-digits").eval(), "zoo"
    except TrustVisionError:
        from trustvision.train import fit

        torch.manual_seed(0)
        train = data.load("shortcut-digits", split="train")
        model = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
        fit(model, train, epochs=15, lr=3e-3, batch_size=64, seed=0, progress=False)
        return model.eval(), "trained in the test (zoo not built)"


@pytest.mark.slow
def test_ground_truth_on_the_shortcut_model():
    model, source = shortcut_model()
    fig = ground_truth_figures(model)
    fig["model"] = source
    if fig["accuracy_without_marker"] > 0.5:
        # Not a failure of the explanation methods: the model reads the digit, not the marker.
        pytest.xfail(
            "the shortcut-digits model does not rely on the marker (accuracy with the marker "
            f"blanked {fig['accuracy_without_marker']:.2f}); retrain it where the digit is "
            f"uninformative on part of the training set. Figures: {json.dumps(fig)}"
        )
    check_figures(fig)
