"""Property tests (hypothesis) for the metrics: bounds, identities and invariances."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustvision.evaluate import expected_calibration_error, maximum_calibration_error
from trustvision.evaluate.ood import auroc

settings.register_profile("trustvision", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("trustvision")


@st.composite
def predictions(draw):
    n = draw(st.integers(1, 40))
    k = draw(st.integers(2, 6))
    logits = draw(st.lists(st.floats(-6, 6), min_size=n * k, max_size=n * k))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    probs = torch.tensor(logits, dtype=torch.float64).view(n, k).softmax(-1)
    return probs, torch.tensor(labels)


@given(predictions(), st.integers(1, 20))
def test_ece_is_bounded_by_mce(pred, n_bins):
    probs, labels = pred
    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    mce = maximum_calibration_error(probs, labels, n_bins=n_bins)
    assert 0.0 <= ece <= mce + 1e-12 <= 1.0 + 1e-12


@given(predictions())
def test_one_bin_ece_is_the_confidence_accuracy_gap(pred):
    probs, labels = pred
    conf, pred_cls = probs.max(1)
    gap = abs(float(conf.mean()) - float((pred_cls == labels).double().mean()))
    assert abs(expected_calibration_error(probs, labels, n_bins=1) - gap) < 1e-9


scores = st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=30)


@given(scores, scores)
def test_auroc_is_a_probability_and_symmetric(s_in, s_out):
    a = auroc(s_in, s_out)
    assert 0.0 <= a <= 1.0
    assert abs(a + auroc(s_out, s_in) - 1.0) < 1e-9  # swapping positives and negatives


@given(scores, scores)
def test_auroc_matches_pairwise_definition_and_is_rank_invariant(s_in, s_out):
    i, o = np.array(s_in)[:, None], np.array(s_out)[None, :]
    expected = float(((i > o) + 0.5 * (i == o)).mean())
    assert abs(auroc(s_in, s_out) - expected) < 1e-9
    # scaling by 2 is exact in floating point: an increasing map that keeps distinct scores distinct
    assert abs(auroc(2.0 * np.array(s_in), 2.0 * np.array(s_out)) - expected) < 1e-9
