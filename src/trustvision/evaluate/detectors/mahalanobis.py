"""Mahalanobis distance on the penultimate features (Lee et al., NeurIPS 2018, without the input
pre-processing): class means and one covariance shared by all classes, fitted on the training
split; score = minus the smallest squared Mahalanobis distance to a class mean.

The covariance is the within-class scatter divided by N (the paper's maximum-likelihood estimate)
plus ``ridge`` on the diagonal. pytorch-ood 0.4 does not divide by N and returns half the
distance as its outlier score: its score is ``-0.5 * ours / N`` when our ridge is its ridge / N
(tested)."""

from __future__ import annotations

import torch

from trustvision.errors import TrustVisionError
from trustvision.evaluate.detectors import Detector, register_detector


@register_detector
class Mahalanobis(Detector):
    name, title = "mahalanobis", "Mahalanobis"
    needs_features = needs_fit = True
    reference = "Lee et al., NeurIPS 2018"

    def __init__(self, ridge: float = 1e-6) -> None:
        super().__init__()
        self.ridge = float(ridge)

    def fit_outputs(self, logits, features, labels, model):
        k = int(labels.max()) + 1 if labels.numel() else 0
        present = torch.bincount(labels, minlength=k)
        if k == 0 or bool((present == 0).any()):
            raise TrustVisionError("the mahalanobis detector needs training images of every class "
                                   f"(classes without any: {(present == 0).nonzero().flatten().tolist()})")
        f = features.double()
        self.means = torch.stack([f[labels == c].mean(0) for c in range(k)])  # (K, D)
        centred = f - self.means[labels]
        cov = centred.T @ centred / f.shape[0] + self.ridge * torch.eye(f.shape[1], dtype=f.dtype)
        self.precision = torch.linalg.inv(cov)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of every image to every class mean (N, K)."""
        self._need_fit()
        d = features.double().unsqueeze(1) - self.means.unsqueeze(0)  # (N, K, D)
        return torch.einsum("nkd,de,nke->nk", d, self.precision, d)

    def score_outputs(self, logits, features):
        return -self.distances(features).amin(1)
