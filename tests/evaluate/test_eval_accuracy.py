"""Accuracy metrics against hand-computed answers."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from trustvision.evaluate.accuracy import confusion_matrix, confusion_matrix_figure, per_class_accuracy, top1_accuracy

SCORES = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
LABELS = torch.tensor([0, 1, 1, 0, 1])  # predictions 0, 1, 0, 2, 1


def test_top1_accuracy_hand_computed():
    assert top1_accuracy(SCORES, LABELS) == pytest.approx(3 / 5)
    assert top1_accuracy(torch.tensor([0, 1, 0, 2, 1]), LABELS) == pytest.approx(3 / 5)
    assert top1_accuracy(SCORES.numpy(), LABELS.numpy()) == pytest.approx(3 / 5)


def test_confusion_matrix_hand_computed():
    cm = confusion_matrix(SCORES, LABELS, num_classes=3)
    assert cm.tolist() == [[1, 0, 1], [1, 2, 0], [0, 0, 0]]
    assert int(cm.sum()) == 5


def test_per_class_accuracy_with_absent_class():
    assert per_class_accuracy(SCORES, LABELS, 3) == [pytest.approx(0.5), pytest.approx(2 / 3), None]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        top1_accuracy(SCORES, LABELS[:3])


def test_confusion_matrix_figure_is_row_normalised():
    cm = confusion_matrix(SCORES, LABELS, 3)
    fig = confusion_matrix_figure(cm, ["a", "b$", "$c$"])
    assert isinstance(fig, Figure)
    img = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(img)[1], [1 / 3, 2 / 3, 0])
    fig.canvas.draw()  # '$' in class names must not be parsed as mathtext
