"""Evaluation metrics (batched, tensor or numpy in, floats out): accuracy and calibration.

Every function says which direction is better in its docstring.
"""

from trustvision.evaluate.accuracy import (
    confusion_matrix,
    confusion_matrix_figure,
    per_class_accuracy,
    top1_accuracy,
)
from trustvision.evaluate.calibration import (
    ReliabilityBins,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    reliability_diagram,
)

__all__ = [
    "top1_accuracy",
    "per_class_accuracy",
    "confusion_matrix",
    "confusion_matrix_figure",
    "ReliabilityBins",
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "fit_temperature",
    "reliability_diagram",
]
