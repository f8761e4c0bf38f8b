"""trustvision: trustworthy image classification.

Generative classifiers, explanations, overinterpretation audits, robustness and bias checks,
and a one-command audit with an HTML report.
"""

from trustvision._utils.allocator import tune_cpu_allocator
from trustvision.errors import TrustVisionError

__all__ = ["TrustVisionError", "__version__", "tune_cpu_allocator"]
__version__ = "0.1.0"
