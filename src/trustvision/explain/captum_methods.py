"""Captum's attribution methods behind our contract: (N, C, H, W) in [0, 1] -> (N, 1, H, W).

Saliency (Simonyan et al. 2014), Integrated Gradients (Sundararajan et al. ICML 2017), Grad-CAM
(Selvaraju et al. ICCV 2017, conv nets only) and Occlusion (Zeiler & Fergus ECCV 2014), each a
thin :class:`~trustvision.explain.Explainer` with the same ``attribute(inputs, target=None, *,
seed=0, internal_batch_size=None, **method_kw)`` verb as :class:`IGOS` (all four are
deterministic: ``seed`` is accepted and unused; an unknown keyword is a one-line error).
Channel reduction: saliency takes the max |gradient| over channels (Simonyan et al.); integrated
gradients and occlusion sum the attributions over channels (signed; positive = supports the
class); Grad-CAM is ReLU'd and upsampled bilinearly to the input size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision._utils.images import (
    BaselineType,
    TargetType,
    check_inputs,
    chunks,
    eval_mode,
    make_baseline,
    resolve_target,
    upsample,
)

from trustvision.explain._base import Explainer

__all__ = ["Saliency", "IntegratedGradients", "GradCAM", "Occlusion", "last_conv_layer"]


class _CaptumMethod(Explainer, register=False):
    kind = "heatmap"
    in_audit = True

    def _prepare(self, inputs: torch.Tensor, target: TargetType) -> tuple[torch.Tensor, torch.Tensor]:
        x = check_inputs(inputs).detach()
        t = resolve_target(self.model, x, target)
        return x.clone().requires_grad_(True), t


class Saliency(_CaptumMethod):
    """Gradient magnitude |d logit_c / d x| (Simonyan et al.), max over channels: (N, 1, H, W)."""

    name, title, order = "saliency", "Saliency", 20

    def attribute(self, inputs: torch.Tensor, target: TargetType = None, *, seed: int = 0,
                  internal_batch_size: int | None = None) -> torch.Tensor:
        """``internal_batch_size``: most images per backward pass (None = all)."""
        from captum.attr import Saliency as _Saliency

        with eval_mode(self.model):
            x, t = self._prepare(inputs, target)
            a = torch.cat([_Saliency(self.model).attribute(x[sl], target=t[sl], abs=True)
                           for sl in chunks(x.shape[0], internal_batch_size)])
        return a.amax(dim=1, keepdim=True).detach()


class IntegratedGradients(_CaptumMethod):
    """Integrated gradients of the logit of class c from ``baselines`` (default zero) to x,
    summed over channels: (N, 1, H, W). Completeness: the sum equals f(x) - f(baseline)."""

    name, title, order = "integrated-gradients", "Integrated gradients", 21

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        baselines: BaselineType = "zero",
        n_steps: int = 50,
    ) -> torch.Tensor:
        """``internal_batch_size``: most path points per forward/backward (Captum's knob)."""
        from captum.attr import IntegratedGradients as _IG

        with eval_mode(self.model):
            x, t = self._prepare(inputs, target)
            base = make_baseline(x.detach(), baselines)
            a = _IG(self.model).attribute(
                x, baselines=base, target=t, n_steps=n_steps, internal_batch_size=internal_batch_size
            )
        return a.sum(dim=1, keepdim=True).detach()


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` registered in ``model`` (Grad-CAM's default layer)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TrustVisionError(
            "gradcam needs a convolutional network (no Conv2d layer found); use saliency, "
            "integrated-gradients, occlusion, igos or igos++ instead"
        )
    return convs[-1]


class GradCAM(_CaptumMethod):
    """Grad-CAM on ``layer`` (default: the last Conv2d), ReLU'd, upsampled to (N, 1, H, W)."""

    name, title, order = "gradcam", "Grad-CAM", 22
    requires = ("conv",)

    def __init__(self, model: nn.Module, layer: nn.Module | None = None):
        # with an explicit layer the model needs no Conv2d
        super().__init__(model, check_requirements=layer is None)
        self.layer = layer if layer is not None else last_conv_layer(model)

    def attribute(self, inputs: torch.Tensor, target: TargetType = None, *, seed: int = 0,
                  internal_batch_size: int | None = None) -> torch.Tensor:
        """``internal_batch_size``: most images per forward/backward pass (None = all)."""
        from captum.attr import LayerGradCam

        with eval_mode(self.model):
            x, t = self._prepare(inputs, target)
            cam = LayerGradCam(self.model, self.layer)
            a = torch.cat([cam.attribute(x[sl], target=t[sl], relu_attributions=True).detach()
                           for sl in chunks(x.shape[0], internal_batch_size)])
        return upsample(a.float(), x.shape[-2:])


class Occlusion(_CaptumMethod):
    """Drop of the class logit when a sliding window is replaced by the baseline, summed over
    channels: (N, 1, H, W). ``window=None`` = about a fourteenth of the image side (16 at
    224 px, 2 at 8 px), stride half the window."""

    name, title, order = "occlusion", "Occlusion", 23

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        baselines: BaselineType = "zero",
        window: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``internal_batch_size``: most occluded images per forward pass (default 64 per image)."""
        from captum.attr import Occlusion as _Occlusion

        with eval_mode(self.model):
            x, t = self._prepare(inputs, target)
            n, c, h, w = x.shape
            if window is None:
                window = max(2, round(min(h, w) / 14))
            win = (window, window) if isinstance(window, int) else tuple(window)
            if stride is None:
                stride = (max(1, win[0] // 2), max(1, win[1] // 2))
            st = (stride, stride) if isinstance(stride, int) else tuple(stride)
            base = make_baseline(x.detach(), baselines)
            per_eval = max(1, (internal_batch_size or 64 * n) // n)
            a = _Occlusion(self.model).attribute(
                x, sliding_window_shapes=(c, *win), strides=(c, *st), baselines=base, target=t,
                perturbations_per_eval=per_eval,
            )
        return a.sum(dim=1, keepdim=True).detach()
