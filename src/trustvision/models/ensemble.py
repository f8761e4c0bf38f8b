"""Deep ensembles: ``create("ensemble", ..., member="small-cnn", n=5)``.

The ensemble predicts the mean of its members' softmax probabilities; ``forward`` returns the log
of that mean, so ``softmax(forward(x))`` equals the averaged probabilities and cross-entropy on it
is the negative log-likelihood of the ensemble.

References:
    Lakshminarayanan, Pritzel, Blundell. "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles", NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.models import create, register_model
from trustvision.models._base import ImageClassifier

__all__ = ["Ensemble"]


class Ensemble(ImageClassifier):
    """``n`` independently initialised members of one registered architecture.

    Each member normalises its own input (``mean``/``std`` given here are passed on to every
    member; the ensemble's own buffers mirror member 0 for reporting). ``features(x)`` is the
    *concatenation* of the member features, shape (N, n * F): independently trained members do not
    share a feature space, so averaging them would mix unrelated directions. ``forward_head`` splits
    that vector back per member. ``training_loss`` sums the members' own cross-entropies, so
    training one ``Ensemble`` trains every member independently as in Lakshminarayanan et al.

    Example:
        >>> import torch
        >>> from trustvision import models
        >>> ens = models.create("ensemble", num_classes=3, in_chans=1, image_size=8, n=2)
        >>> p = ens(torch.rand(4, 1, 8, 8)).softmax(-1)
        >>> bool(torch.allclose(p.sum(-1), torch.ones(4)))
        True
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 32,
        member: str = "small-cnn",
        n: int = 5,
        member_kwargs: dict | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, image_size)
        if int(n) < 1:
            raise TrustVisionError(f"an ensemble needs at least one member, got n={n}; use n>=1")
        if member == "ensemble":
            raise TrustVisionError("ensemble members cannot be ensembles; pick e.g. member='small-cnn'")
        kw = dict(member_kwargs or {})
        if mean is not None:
            kw.setdefault("mean", list(mean))
        if std is not None:
            kw.setdefault("std", list(std))
        self.member = member
        self.members = nn.ModuleList(
            create(member, num_classes, in_chans, image_size, **kw) for _ in range(int(n))
        )
        with torch.no_grad():
            self.norm_mean.copy_(self.members[0].norm_mean)
            self.norm_std.copy_(self.members[0].norm_std)
        self._splits = [self._num_features(m) for m in self.members]
        self.num_features = sum(self._splits)

    def _num_features(self, m: ImageClassifier) -> int:
        nf = getattr(m, "num_features", None)
        if nf is None:
            with torch.no_grad():
                was = m.training
                m.eval()
                nf = m.features(torch.zeros(1, self.in_chans, *self.image_size)).shape[1]
                m.train(was)
        return int(nf)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated member features (N, sum of member feature sizes); x in [0, 1]."""
        return torch.cat([m.features(x) for m in self.members], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Members normalise themselves; ``x`` here is the raw [0, 1] input.
        return self.features(x)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member, shape (n, N, num_classes)."""
        return torch.stack([m(x) for m in self.members])

    def _combine(self, logits: torch.Tensor) -> torch.Tensor:
        # log mean_k softmax(z_k) = logsumexp_k log_softmax(z_k) - log n, numerically stable.
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        chunks = feats.split(self._splits, dim=1)
        return self._combine(torch.stack([m.forward_head(c) for m, c in zip(self.members, chunks)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean member probability, (N, num_classes); softmax of it is the mean."""
        return self._combine(self.member_logits(x))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the members' cross-entropies (each member trained on its own) and ensemble output."""
        logits = self.member_logits(x)
        loss = sum(F.cross_entropy(z, y) for z in logits)
        return loss, self._combine(logits)

    def after_training(self, loader) -> None:
        for m in self.members:
            hook = getattr(m, "after_training", None)
            if callable(hook):
                hook(loader)


@register_model("ensemble")
def ensemble(num_classes: int, in_chans: int = 3, image_size: int | Sequence[int] = 32,
             **kw) -> Ensemble:
    """A deep ensemble of ``n`` ``member`` models (see :class:`Ensemble`)."""
    return Ensemble(num_classes, in_chans, image_size, **kw)
