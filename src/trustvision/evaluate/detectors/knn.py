"""Deep nearest neighbours (Sun et al., ICML 2022): minus the Euclidean distance of the
L2-normalised penultimate feature to its ``k``-th nearest L2-normalised training feature (k = 50,
the paper's and pytorch-ood's default; fewer when the training split is smaller)."""

from __future__ import annotations

import torch

from trustvision.errors import TrustVisionError
from trustvision.evaluate.detectors import Detector, register_detector


def _normalise(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register_detector
class KNN(Detector):
    name, title = "knn", "KNN (k = 50)"
    needs_features = needs_fit = True
    reference = "Sun et al., ICML 2022"

    def __init__(self, k: int = 50, chunk: int = 1024) -> None:
        super().__init__()
        if k < 1:
            raise TrustVisionError(f"knn needs k >= 1, got {k}")
        self.k, self.chunk = int(k), int(chunk)

    def fit_outputs(self, logits, features, labels, model):
        if features.shape[0] == 0:
            raise TrustVisionError("the knn detector needs training images")
        self.bank = _normalise(features.double())
        self.k_used = min(self.k, self.bank.shape[0])

    def score_outputs(self, logits, features):
        self._need_fit()
        z = _normalise(features.double())
        out = []
        for i in range(0, z.shape[0], self.chunk):
            d = torch.cdist(z[i: i + self.chunk], self.bank)  # (n, M)
            out.append(d.topk(self.k_used, dim=1, largest=False).values[:, -1])
        return -torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
