"""ViM, virtual-logit matching (Wang et al., CVPR 2022).

The classifier's affine head ``logits = W f + b`` gives the origin ``u = -pinv(W) b``; the
principal subspace is spanned by the top-``d`` eigenvectors of the (uncentred about u) covariance of
the training features ``f - u``; the residual ``||(f - u) P_perp||`` scaled by
``alpha = mean(max logit) / mean(residual)`` (both over the training split) is the virtual logit.
Score = ``logsumexp(logits) - alpha * residual`` (higher = more in-distribution; pytorch-ood's
outlier score is its negative).

``d`` (the paper's choice per backbone): 1000 for D >= 2048 features, 512 for D >= 768, else D // 2.
W and b are read from the head by probing it (``forward_head`` at 0 and at the unit vectors), so
any affine head works; a head that is not affine is refused."""

from __future__ import annotations

import torch

from trustvision.errors import TrustVisionError
from trustvision.evaluate.detectors import Detector, register_detector


def default_dim(features: int) -> int:
    return 1000 if features >= 2048 else 512 if features >= 768 else max(1, features // 2)


@torch.no_grad()
def affine_head(model, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (K, D), b (K,)) of ``model.forward_head`` on ``dim`` features, read by probing; refused
    when it is not affine."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        eye = torch.eye(dim, device=p.device, dtype=p.dtype)
        zero = torch.zeros(1, dim, device=p.device, dtype=p.dtype)
        b = model.forward_head(zero)[0].double().cpu()
        w = (model.forward_head(eye).double().cpu() - b).T  # (K, D)
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(4, dim, generator=g, dtype=torch.float64)
        got = model.forward_head(probe.to(p.device, p.dtype)).double().cpu()
        want = probe @ w.T + b
        if not torch.allclose(got, want, atol=1e-3 * (1 + want.abs().max().item()), rtol=1e-3):
            raise TrustVisionError("the vim detector needs an affine classifier head (logits = W f + b); "
                                   f"{type(model).__name__}.forward_head is not affine")
    finally:
        model.train(was)
    return w, b


@register_detector
class ViM(Detector):
    name, title = "vim", "ViM"
    needs_features = needs_fit = True
    reference = "Wang et al., CVPR 2022"

    def __init__(self, d: int | None = None) -> None:
        super().__init__()
        self.d = None if d is None else int(d)

    def fit_outputs(self, logits, features, labels, model):
        f = features.double()
        dim = f.shape[1]
        self.set_head(*affine_head(model, dim))
        d = default_dim(dim) if self.d is None else self.d
        if not 0 < d < dim:
            raise TrustVisionError(f"vim needs 0 < d < {dim} (the feature dimension), got d = {d}")
        self.d_used = d
        x = f - self.u
        cov = x.T @ x / x.shape[0]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.null_space = vecs[:, : dim - d].contiguous()  # the D - d smallest directions
        residual = (x @ self.null_space).norm(dim=1)
        self.alpha = float(self.logits_of(f).amax(1).mean() / residual.mean().clamp_min(1e-12))

    def set_head(self, w: torch.Tensor, b: torch.Tensor) -> None:
        self.w, self.b = w.double(), b.double()
        self.u = -(torch.linalg.pinv(self.w) @ self.b)

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.w.T + self.b

    def score_outputs(self, logits, features):
        self._need_fit()
        f = features.double()
        residual = ((f - self.u) @ self.null_space).norm(dim=1)
        return torch.logsumexp(self.logits_of(f), 1) - self.alpha * residual
