"""Post-hoc OOD detectors for any classifier, one registry (one file per detector).

Convention: **higher score = more in-distribution** (the in-distribution samples are the positive
class of :func:`trustvision.evaluate.ood.auroc` and friends). pytorch-ood returns outlier scores
(higher = more OOD) and OpenOOD treats OOD as the positive class: their numbers are the negatives
of ours, and their AUROC the same.

Every detector works from the model's outputs on a batch: the logits and, for the feature-based
ones, the penultimate features ``model.features(x)`` (the input of ``model.forward_head``;
trustvision's :class:`~trustvision.models.ImageClassifier`). A model without ``features`` gets the
logit-based detectors only (:func:`list_detectors` with the model says which apply). Detectors that
need fitting are fitted on the training split (:meth:`Detector.fit`).

Adding a detector: a new module in this folder with a :class:`Detector` subclass decorated by
:func:`register_detector`; it is imported with the package.

Example:
    >>> import torch
    >>> from trustvision import models
    >>> net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8).eval()
    >>> x, y = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    >>> det = get_detector("energy")().fit(net, x, y)
    >>> det.score(net, x[:4]).shape
    torch.Size([4])
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch
from torch import nn

from trustvision._utils.registry import Registry
from trustvision.data.loading import image_batches, loader_options  # noqa: F401  (re-exported)
from trustvision.errors import TrustVisionError

__all__ = ["Detector", "register_detector", "get_detector", "list_detectors", "model_outputs", "has_features",
           "image_batches", "loader_options"]

_REGISTRY: Registry = Registry("OOD detector", "trustvision.evaluate.ood.list_detectors()")


def has_features(model: nn.Module) -> bool:
    """Whether the model exposes penultimate features (``features`` and ``forward_head``, not the
    abstract ones of :class:`~trustvision.models.ImageClassifier`)."""
    from trustvision.models import ImageClassifier

    if not (callable(getattr(model, "features", None)) and callable(getattr(model, "forward_head", None))):
        return False
    if isinstance(model, ImageClassifier):
        t = type(model)
        return (t.forward_features is not ImageClassifier.forward_features
                and t.forward_head is not ImageClassifier.forward_head)
    return True


@torch.no_grad()
def model_outputs(model: nn.Module, x, batch_size: int = 256, *, features: bool = True,
                  num_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits (N, K), features (N, D) or None) in float64 on the CPU, batched, in eval mode; the
    logits are ``forward_head(features)`` when the model has features (one pass for both). ``x``:
    images (N, C, H, W) or a dataset, streamed (:func:`image_batches`)."""
    device = next(model.parameters()).device
    use_feats = features and has_features(model)
    logits, feats = [], []
    was = model.training
    model.eval()
    try:
        for xb in image_batches(x, batch_size, num_workers=num_workers, device=device):
            xb = xb.to(device, non_blocking=True)
            if use_feats:
                f = model.features(xb).flatten(1)
                feats.append(f.double().cpu())
                logits.append(model.forward_head(f).double().cpu())
            else:
                logits.append(model(xb).double().cpu())
    finally:
        model.train(was)
    if not logits:
        return torch.zeros(0, 0, dtype=torch.float64), None
    return torch.cat(logits), (torch.cat(feats) if use_feats else None)


class Detector:
    """An OOD detector. Subclasses set ``name``, ``title``, ``needs_features`` and ``needs_fit``
    and implement :meth:`score_outputs` (and :meth:`fit_outputs` when they need fitting)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False
    #: meaningless when the model's outputs are normalised log-probabilities (logsumexp = 0, as
    #: the log-posteriors of a generative classifier): left out there with the reason
    needs_unnormalised_logits: ClassVar[bool] = False
    reference: ClassVar[str] = ""

    def __init__(self) -> None:
        self.fitted = not self.needs_fit

    @classmethod
    def applies_to(cls, model: nn.Module) -> bool:
        return not cls.needs_features or has_features(model)

    def fit(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, batch_size: int = 256) -> "Detector":
        """Fit on the training split (a no-op for detectors that need none); returns self."""
        self._check(model)
        if self.needs_fit:
            logits, feats = model_outputs(model, x_train, batch_size, features=self.needs_features)
            self.fit_outputs(logits, feats, torch.as_tensor(y_train).long().cpu(), model)
            self.fitted = True
        return self

    def score(self, model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Scores (N,) float64, higher = more in-distribution."""
        self._check(model)
        logits, feats = model_outputs(model, x, batch_size, features=self.needs_features)
        return self.score_outputs(logits, feats)

    def fit_outputs(self, logits: torch.Tensor, features: torch.Tensor | None, labels: torch.Tensor,
                    model: nn.Module) -> None:
        pass

    def score_outputs(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, model: nn.Module) -> None:
        if not self.applies_to(model):
            raise TrustVisionError(f"the {self.name} detector needs penultimate features (model.features and "
                                   f"model.forward_head); {type(model).__name__} has none: use "
                                   + ", ".join(list_detectors(model)))

    def _need_fit(self) -> None:
        if not self.fitted:
            raise TrustVisionError(f"the {self.name} detector must be fitted first: .fit(model, x_train, y_train)")


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise TypeError("a detector needs a name")
    _REGISTRY.add(cls.name, cls)
    return cls


def get_detector(name: str) -> type[Detector]:
    """The detector class registered as ``name`` (unknown names: one-line error with a did-you-mean)."""
    return _REGISTRY.get(name)


def list_detectors(model: nn.Module | None = None) -> list[str]:
    """Registered detector names (in the order of the report); with ``model``, those that apply to it."""
    names = sorted(_REGISTRY.names(), key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    return [n for n in names if model is None or get_detector(n).applies_to(model)]


_ORDER = ["max-softmax", "max-logit", "energy", "mahalanobis", "knn", "vim"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
