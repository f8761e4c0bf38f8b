"""RISE: the heatmap finds a planted square, exact answers where there is one, batched == one at a
time, seeded, one contract with the other methods, on the command line and in the audit."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from trustvision import explain
from trustvision.errors import TrustVisionError
from trustvision.explain import RISE
from trustvision.explain.rise import rise_masks

SQUARE = (slice(4, 8), slice(9, 13))  # rows 4..7, columns 9..12 of a 16 x 16 image


class Square(nn.Module):
    """p_0 = 0.1 + 0.8 * mean of the planted square of channel 0 (exactly: logits are log-probs)."""

    def forward(self, x):
        p = 0.1 + 0.8 * x[:, 0, SQUARE[0], SQUARE[1]].mean((1, 2))
        return torch.stack([p.log(), (1 - p).log()], 1)


def _square_mask():
    m = torch.zeros(16, 16, dtype=torch.bool)
    m[SQUARE] = True
    return m


def test_heatmap_mass_concentrates_on_the_planted_square():
    x = torch.ones(2, 1, 16, 16)
    heat = RISE(Square()).attribute(x, target=0, n_masks=2000, cells=4)
    assert heat.shape == (2, 1, 16, 16)
    h = heat[0, 0]
    sq = _square_mask()
    # Far from the square a pixel's mask is independent of p_0: S = E[p_0] / 1 = 0.1 + 0.8 p = 0.5.
    far = float(h[12:, :4].mean())
    assert far == pytest.approx(0.5, abs=0.03)
    assert float(h[sq].mean()) > far + 0.1
    # the 16 highest pixels are the square's 16, and the excess over the far level sits within
    # one cell (4 px) of the square
    assert sq.flatten()[h.flatten().topk(16).indices].all()
    excess = (h - far).clamp_min(0)
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[0:12, 5:16] = True
    assert float(excess[near].sum() / excess.sum()) > 0.85


def test_masks_that_keep_everything_give_the_class_probability():
    # keep_prob = 1: every mask is all ones, so S = p_c(I) * N / (N * 1) at every pixel.
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    heat = RISE(Square()).attribute(x, target=0, n_masks=7, keep_prob=1.0)
    p = torch.softmax(Square()(x), 1)[:, 0]
    torch.testing.assert_close(heat, p.view(3, 1, 1, 1).expand(3, 1, 16, 16), atol=1e-6, rtol=0)


def test_masks_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    m = rise_masks(500, 7, (8, 8), 0.5, g)
    assert m.shape == (500, 1, 8, 8) and m.min() >= 0 and m.max() <= 1
    assert float(m.mean()) == pytest.approx(0.5, abs=0.03)  # cells kept with p = 0.5
    # bilinear upsampling: smooth masks with values strictly between 0 and 1
    assert bool(((m > 0.05) & (m < 0.95)).any())
    m1 = rise_masks(4, 2, (6, 6), 0.5, torch.Generator().manual_seed(3))
    m2 = rise_masks(4, 2, (6, 6), 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)


def test_batched_equals_one_at_a_time_exactly(tiny_cnn):
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    r = RISE(Square())
    kw = dict(target=0, n_masks=300, seed=5)
    batched = r.attribute(x, **kw)
    single = torch.cat([r.attribute(x[i : i + 1], **kw) for i in range(4)])
    chunked = r.attribute(x, internal_batch_size=77, **kw)
    assert torch.equal(batched, single) and torch.equal(batched, chunked)
    # a real network: same masks, same per-image arithmetic
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    a = RISE(tiny_cnn).attribute(y, n_masks=200, seed=1)
    b = torch.cat([RISE(tiny_cnn).attribute(y[i : i + 1], n_masks=200, seed=1) for i in range(3)])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_deterministic_for_a_seed(tiny_cnn):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    a = RISE(tiny_cnn).attribute(x, n_masks=100, seed=7)
    b = RISE(tiny_cnn).attribute(x, n_masks=100, seed=7)
    c = RISE(tiny_cnn).attribute(x, n_masks=100, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_baselines_and_errors(tiny_cnn):
    x = torch.rand(2, 1, 8, 8)
    for b in (0.0, "blur", "zero", 0.5, torch.zeros(1, 1, 8, 8)):
        assert torch.isfinite(RISE(tiny_cnn).attribute(x, n_masks=10, baselines=b)).all()
    with pytest.raises(TrustVisionError, match="rise has no keyword 'n_mask'.*did you mean 'n_masks'"):
        RISE(tiny_cnn).attribute(x, n_mask=10)
    with pytest.raises(TrustVisionError, match="keep_prob"):
        RISE(tiny_cnn).attribute(x, keep_prob=0.0)
    with pytest.raises(TrustVisionError, match="n_masks"):
        RISE(tiny_cnn).attribute(x, n_masks=0)


def test_registered_as_a_heatmap_method_of_the_audit():
    from trustvision.audit.checks.explanations import ExplanationsCheck

    assert "rise" in explain.list_methods(kind="heatmap")
    assert explain.get("rise") is RISE
    info = explain.method_info("rise")
    assert info["title"] == "RISE" and info["kind"] == "heatmap" and info["in_audit"] and info["requires"] == ()
    assert info["keywords"]["n_masks"] == 1000 and info["keywords"]["cells"] == 7
    assert "rise" in ExplanationsCheck.options["methods"].resolved_default()


def test_cli_explain_rise(tmp_path, capsys):
    from trustvision.cli import main

    out = tmp_path / "rise"
    code = main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "rise",
                 "--n", "2", "--method-kw", "n_masks=50", "--method-kw", "cells=4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["method"] == "rise" and scores["method_kw"] == {"n_masks": 50, "cells": 4}
    assert len(scores["images"]) == 2 and all(0 <= r["insertion_auc"] <= 1 for r in scores["images"])
    assert np.load(out / "heatmaps.npy").shape == (2, 1, 8, 8)
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "rise on 2 images" in capsys.readouterr().out

    code = main(["explain", "--model", "zoo:small-cnn-digits", "--data", "digits", "--method", "rise",
                 "--n", "2", "--method-kw", "masks=50", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: rise has no keyword 'masks'") and err.count("\n") == 1
