"""trustvision: trustworthy image classification.

Generative classifiers, explanations, overinterpretation audits, robustness and bias checks,
and a one-command audit with an HTML report.
"""

from trustvision.errors import TrustVisionError

__all__ = ["TrustVisionError", "__version__"]
__version__ = "0.1.0"
