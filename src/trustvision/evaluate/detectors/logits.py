"""Detectors on the logits alone (no fitting): maximum softmax probability (Hendrycks & Gimpel,
ICLR 2017), maximum logit (Hendrycks et al., ICML 2022) and the energy score at T = 1 (Liu et al.,
NeurIPS 2020): ``T * logsumexp(logits / T)``. Higher = more in-distribution."""

from __future__ import annotations

import torch

from trustvision.evaluate.detectors import Detector, register_detector


@register_detector
class MaxSoftmax(Detector):
    name, title = "max-softmax", "max-softmax"
    reference = "Hendrycks & Gimpel, ICLR 2017"

    def score_outputs(self, logits, features):
        return torch.softmax(logits, 1).amax(1)


@register_detector
class MaxLogit(Detector):
    name, title = "max-logit", "max-logit"
    reference = "Hendrycks et al., ICML 2022"
    needs_unnormalised_logits = True  # on log-probabilities it is log max-softmax

    def score_outputs(self, logits, features):
        return logits.amax(1)


@register_detector
class Energy(Detector):
    name, title = "energy", "energy (T = 1)"
    reference = "Liu et al., NeurIPS 2020"
    needs_unnormalised_logits = True  # on log-probabilities it is 0 for every image

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def score_outputs(self, logits, features):
        t = self.temperature
        return t * torch.logsumexp(logits / t, 1)
