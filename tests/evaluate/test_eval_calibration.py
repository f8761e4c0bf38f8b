"""Calibration metrics against hand-computed answers."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from trustvision.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    reliability_diagram,
)

# Four samples, top-1 confidences 0.90 (right), 0.88 (wrong), 0.70 (right), 0.55 (wrong).
PROBS = torch.tensor([[0.90, 0.10], [0.12, 0.88], [0.70, 0.30], [0.45, 0.55]])
LABELS = torch.tensor([0, 0, 0, 0])


def test_ece_hand_computed_15_bins():
    # bins of width 1/15: 0.90 and 0.88 share (13/15, 14/15]; 0.70 in (10/15, 11/15]; 0.55 in (8/15, 9/15].
    # ECE = 2/4*|0.5-0.89| + 1/4*|1-0.70| + 1/4*|0-0.55| = 0.195 + 0.075 + 0.1375 = 0.4075
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.4075, abs=1e-6)
    assert maximum_calibration_error(PROBS, LABELS) == pytest.approx(0.55, abs=1e-6)


def test_ece_hand_computed_2_bins():
    # all four in (0.5, 1]: accuracy 0.5, mean confidence 3.03/4 = 0.7575 -> ECE = MCE = 0.2575
    assert expected_calibration_error(PROBS, LABELS, n_bins=2) == pytest.approx(0.2575, abs=1e-6)
    assert maximum_calibration_error(PROBS, LABELS, n_bins=2) == pytest.approx(0.2575, abs=1e-6)


def test_reliability_bins_hand_computed():
    bins = reliability_bins(PROBS, LABELS, n_bins=15)
    assert bins.n == 4 and len(bins.count) == 15 and len(bins.edges) == 16
    assert [k for k, c in enumerate(bins.count) if c] == [8, 10, 13]
    assert bins.count[13] == 2
    assert bins.accuracy[13] == pytest.approx(0.5) and bins.confidence[13] == pytest.approx(0.89)
    assert bins.accuracy[10] == 1.0 and bins.accuracy[8] == 0.0
    assert bins.accuracy[0] is None and bins.confidence[0] is None
    assert bins.gaps[8] == pytest.approx(0.55)


def test_numpy_input_and_permutation_invariance():
    perm = torch.tensor([2, 0, 3, 1])
    assert expected_calibration_error(PROBS.numpy(), LABELS.numpy()) == pytest.approx(0.4075, abs=1e-6)
    assert expected_calibration_error(PROBS[perm], LABELS[perm]) == pytest.approx(0.4075, abs=1e-6)


def test_perfect_calibration_is_zero():
    # 10 samples at confidence 0.9 with 9 right, 5 at confidence 0.6 with 3 right.
    probs = torch.tensor([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 5, dtype=torch.float64)
    labels = torch.tensor([0] * 9 + [1] + [0] * 3 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_bin_edges_confidence_one_and_zero():
    bins = reliability_bins(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]), n_bins=15)
    assert bins.count[14] == 1 and bins.count[0] == 1  # 1.0 -> last bin, 0.0 -> first bin


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(20000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(z / t_true, dim=1), 1, generator=g).squeeze(1)
    t_hat = fit_temperature(z, labels)
    assert t_hat == pytest.approx(t_true, rel=0.05)
    nll = negative_log_likelihood(z, labels, t_hat)
    assert nll <= negative_log_likelihood(z, labels, t_hat * 1.05)
    assert nll <= negative_log_likelihood(z, labels, t_hat / 1.05)
    assert nll < negative_log_likelihood(z, labels, 1.0)


def test_temperature_scaling_reduces_ece_of_overconfident_logits():
    g = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(5000, 4, generator=g)
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    over = 3.0 * z  # three times too confident
    t = fit_temperature(over[:2500], labels[:2500])
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(torch.softmax(over[2500:], 1), labels[2500:])
    after = expected_calibration_error(torch.softmax(over[2500:] / t, 1), labels[2500:])
    assert after < 0.5 * before


def test_negative_log_likelihood_hand_computed():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 0])
    # -log(1/2) and -log(3/4), averaged
    assert negative_log_likelihood(z, y) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)


def test_reliability_diagram_bars_equal_bin_accuracy():
    fig = reliability_diagram(PROBS, LABELS, n_bins=15, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.containers[0]]
    assert len(heights) == 15
    assert heights[13] == pytest.approx(0.5) and heights[10] == pytest.approx(1.0) and heights[8] == 0.0
    assert "ECE 0.4075" in ax.get_legend().get_title().get_text()
    assert "15 equal-width bins" in ax.get_legend().get_title().get_text()
    np.testing.assert_allclose(ax.get_xlim(), (0, 1))
