"""Explanations: I-GOS, iGOS++, RISE, SAG and Captum's methods behind one contract and registry.

Every method is an :class:`Explainer` built on the model with one verb, Captum-style:
``get(name)(model).attribute(inputs, target=None, *, seed=0, internal_batch_size=None, **kw)``.
Heatmap methods (``list_methods()``, i.e. ``list_methods(kind="heatmap")``) return (N, 1, H, W),
higher = more important; SAG (structured attention graphs, kind ``"graph"``) returns one
patch-set graph per image (``list_methods(kind=None)`` lists every method). Each method declares
its ``title``, ``kind``, ``requires`` (e.g. ``likelihood-ratio``, the gradient of
``log p(x|y1) - log p(x|y2)``, needs a generative classifier such as ``ibinn-small``; other models
get a one-line :class:`~trustvision.errors.TrustVisionError`) and whether the audit runs it
(``in_audit``); :func:`method_info` gathers them.

A new method is one file in this folder: every module here is imported below, and a subclass of
:class:`Explainer` with a ``name`` registers itself, so it appears in ``list_methods()``, in
``trustvision explain --method NAME`` and in the audit's ``explanations`` check.
:func:`explain_sample` explains a seeded sample of a dataset (the command line and the audit use
it).

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
    >>> explain.method_info("gradcam")["requires"], explain.get("sag").kind
    (('conv',), 'graph')
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from trustvision._utils.images import TargetType
from trustvision.explain._base import (
    KINDS,
    REQUIREMENTS,
    ExplanationInfo,
    ExplanationWarning,
    Explainer,
    check_keywords,
    get,
    list_methods,
    method_info,
    register_method,
    unregister_method,
)
from trustvision.explain.captum_methods import GradCAM, IntegratedGradients, Occlusion, Saliency
from trustvision.explain.generative import LikelihoodRatioGradient
from trustvision.explain.igos import IGOS, IGOSPlusPlus
from trustvision.explain.rise import RISE
from trustvision.explain.sag import SAG, SAGResult
from trustvision.explain.sample import (
    Sample,
    SampleExplanation,
    draw_sample,
    explain_chunk,
    explain_images,
    explain_sample,
)

__all__ = [
    "Explainer",
    "IGOS",
    "IGOSPlusPlus",
    "RISE",
    "SAG",
    "SAGResult",
    "Saliency",
    "IntegratedGradients",
    "GradCAM",
    "Occlusion",
    "LikelihoodRatioGradient",
    "ExplanationInfo",
    "ExplanationWarning",
    "KINDS",
    "REQUIREMENTS",
    "Sample",
    "SampleExplanation",
    "attribute",
    "check_keywords",
    "draw_sample",
    "explain_chunk",
    "explain_images",
    "explain_sample",
    "get",
    "list_methods",
    "method_info",
    "register_method",
    "unregister_method",
]

# Every module of this folder registers its methods when imported: adding a method = adding a file.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def attribute(
    model: nn.Module, inputs: torch.Tensor, method: str = "igos++", target: TargetType = None, **kw: Any
) -> Any:
    """Explain ``inputs`` (N, C, H, W) in [0, 1] with ``method``: heatmaps (N, 1, H, W) for
    heatmap methods, one result per image for the others."""
    return get(method)(model).attribute(inputs, target=target, **kw)
