"""Explanations: I-GOS, iGOS++, SAG and Captum's methods behind one registry.

Every heatmap method is a class built on the model with one verb, Captum-style:
``get(name)(model).attribute(inputs, target=None, **kw) -> (N, 1, H, W)``, higher = more
important. SAG (structured attention graphs) returns patch-set graphs instead of heatmaps.
``likelihood-ratio`` (the gradient of ``log p(x|y1) - log p(x|y2)``, y1 = target, y2 = the most
likely other class) needs a generative classifier such as ``ibinn-small``; other models get a
one-line :class:`~trustvision.errors.TrustVisionError`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from trustvision import explain
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    >>> "igos++" in explain.list_methods()
    True
    >>> heat = explain.attribute(net, torch.rand(2, 1, 8, 8), method="saliency")
    >>> tuple(heat.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trustvision._utils.registry import Registry
from trustvision._utils.images import TargetType
from trustvision.explain.captum_methods import GradCAM, IntegratedGradients, Occlusion, Saliency
from trustvision.explain.generative import LikelihoodRatioGradient
from trustvision.explain.igos import IGOS, ExplanationInfo, ExplanationWarning, IGOSPlusPlus
from trustvision.explain.sag import SAG, SAGResult

__all__ = [
    "IGOS",
    "IGOSPlusPlus",
    "SAG",
    "SAGResult",
    "Saliency",
    "IntegratedGradients",
    "GradCAM",
    "Occlusion",
    "LikelihoodRatioGradient",
    "ExplanationInfo",
    "ExplanationWarning",
    "get",
    "list_methods",
    "register_method",
    "attribute",
]

_METHODS: Registry[Callable[..., object]] = Registry(
    "explanation method", "`trustvision.explain.list_methods()`"
)
for _name, _cls in [
    ("igos", IGOS),
    ("igos++", IGOSPlusPlus),
    ("saliency", Saliency),
    ("integrated-gradients", IntegratedGradients),
    ("gradcam", GradCAM),
    ("occlusion", Occlusion),
    ("likelihood-ratio", LikelihoodRatioGradient),  # generative classifiers (IB-INN) only
]:
    _METHODS.add(_name, _cls)


def register_method(name: str):
    """Register a class ``cls(model)`` with ``attribute(inputs, target=None, **kw) -> (N,1,H,W)``."""
    return _METHODS.register(name)


def get(name: str) -> Callable[..., object]:
    """The method class registered under ``name`` (unknown names raise a one-line error)."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    """Names of the heatmap methods (``sag`` is separate: it returns graphs, not heatmaps)."""
    return _METHODS.names()


def attribute(
    model: nn.Module, inputs: torch.Tensor, method: str = "igos++", target: TargetType = None, **kw
) -> torch.Tensor:
    """Heatmaps (N, 1, H, W) of ``method`` for ``inputs`` (N, C, H, W) in [0, 1]."""
    return get(method)(model).attribute(inputs, target=target, **kw)
