"""No blank heatmap on a confidently classified test image of the shipped zoo models.

Today's blanks came from three causes (each has its own test in test_igos.py): the line search
judged steps at one noise-free point where a saturated softmax does not move, the default noise
(0.2 in normalised units) made the textures model see another class everywhere on the path, and
the scaled blur kept the class. Here every test image of ``zoo:small-cnn-digits`` (450) and
``zoo:small-cnn-textures`` (800) that the model classifies with p >= 0.5 must get a heatmap that is
not constant, from I-GOS and iGOS++ with their defaults except fewer iterations and IG points (4
and 4, so that the whole splits run in about a minute; a mask that moves in 4 iterations moves in
15). Any constant heatmap must be flagged unreliable with a reason.
"""

import os
import warnings

import pytest
import torch

from trustvision import data, explain, models


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TRUSTVISION_IGOS_TARGETS"),
                    reason="issue #10 target not met yet (one case fails, minutes per case): run with "
                           "TRUSTVISION_IGOS_TARGETS=1")
@pytest.mark.parametrize("name", ["digits", "textures"])
@pytest.mark.parametrize("method", ["igos", "igos++"])
def test_no_blank_heatmap_on_a_confident_test_image(name, method):
    net = models.load(f"zoo:small-cnn-{name}").eval()
    x, _ = data.load(name, split="test").tensors()
    blank, flagged, confident = [], 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, x.shape[0], 200):
            xb = x[start : start + 200]
            expl = explain.get(method)(net)
            heat, info = expl.attribute(xb, iterations=8, ig_steps=4, return_info=True)
            spread = heat.flatten(1).amax(1) - heat.flatten(1).amin(1)
            for i, (s, p) in enumerate(zip(spread.tolist(), info.target_probability)):
                if info.constant[i]:
                    assert info.unreliable[i] and info.reasons[i][0].startswith("heatmap is constant")
                    flagged += 1
                if p >= 0.5:
                    confident += 1
                    if s < 1e-4:
                        blank.append((start + i, p, info.reasons[i]))
    assert confident > 0.8 * x.shape[0]
    assert blank == [], f"{len(blank)} blank heatmaps on confident images: {blank[:5]}"
