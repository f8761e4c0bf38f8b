"""Wrap a plain ``nn.Module`` (what Captum, Quantus and Deepchecks users have) as an ImageClassifier.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from trustvision import models
    >>> plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> net = models.wrap(plain, example=torch.rand(2, 1, 8, 8))
    >>> net.num_classes, net.tv_config["architecture"]
    (3, 'wrapped:Sequential')
    >>> torch.equal(net(torch.zeros(1, 1, 8, 8)), plain(torch.zeros(1, 1, 8, 8)))
    True
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.models._base import ImageClassifier

__all__ = ["WrappedClassifier", "wrap"]


class WrappedClassifier(ImageClassifier):
    """An ``nn.Module`` ``net`` that maps images to logits (N, K), seen as an ImageClassifier.

    ``forward(x) = net(normalize(x))`` with ``normalize`` the identity unless ``mean``/``std``
    were given. ``features(x)`` is ``net.features(normalize(x))`` flattened to (N, F) when the
    module has a callable ``features``, else the logits themselves (then ``forward_head`` is the
    identity; with the module's own features the head is unknown and ``forward_head`` raises).
    """

    def __init__(self, net: nn.Module, num_classes: int, in_chans: int,
                 image_size: int | Sequence[int], mean=None, std=None):
        super().__init__(num_classes, in_chans, image_size,
                         mean=[0.0] * int(in_chans) if mean is None else mean,
                         std=[1.0] * int(in_chans) if std is None else std)
        self.net = net

    def _own_features(self) -> bool:
        return callable(getattr(self.net, "features", None))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._own_features():
            return self.net.features(x).flatten(1)
        return self.net(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self._own_features():
            raise NotImplementedError(
                f"{type(self.net).__name__} has its own features(); its head is not known to the "
                "wrapper, so call the model itself for logits")
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _size(image_size) -> tuple[int, int]:
    return (int(image_size), int(image_size)) if isinstance(image_size, int) else (
        int(image_size[0]), int(image_size[1]))


def _probe(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward of ``x`` in eval mode without gradients; every submodule's mode is restored."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            return net(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TrustVisionError(
            f"the module fails on a batch of shape {tuple(x.shape)} ({msg}); pass example= a "
            "batch (N, C, H, W) it accepts, or in_chans= and image_size= that fit it"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode


def wrap(
    module: nn.Module,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    example: torch.Tensor | None = None,
) -> ImageClassifier:
    """``module`` as an :class:`ImageClassifier` (an ImageClassifier is returned unchanged).

    Args:
        module: maps images (N, C, H, W) to logits (N, K). It takes images in [0, 1], or, when
            ``mean`` and ``std`` (one value per channel) are given, images normalised with them:
            the wrapper then normalises its [0, 1] input first (normalisation belongs inside
            the model).
        num_classes: K; inferred from one forward of ``example`` when not given.
        in_chans, image_size: the input shape; taken from ``example`` when not given.
        example: a batch (N, C, H, W) in [0, 1] the module accepts.

    The module's output is checked on ``example`` (or, without one, on a batch of two grey
    images of the given shape): anything but a tensor (N, K) is a one-line
    :class:`TrustVisionError`. ``features(x)`` is the module's ``features`` (flattened) when it
    has one, else the logits. ``tv_config["architecture"]`` is ``"wrapped:<ClassName>"``; such a
    model can be saved but :func:`trustvision.models.load` cannot rebuild it (rebuild the module
    and wrap it again, then ``load_state_dict``).
    """
    if isinstance(module, ImageClassifier):
        return module
    if not isinstance(module, nn.Module):
        raise TrustVisionError(f"wrap needs a torch.nn.Module, got {type(module).__name__}; pass "
                               "the network itself")
    if example is not None:
        example = torch.as_tensor(example)
        if example.ndim != 4:
            raise TrustVisionError(f"example must be a batch of images (N, C, H, W), got shape "
                                   f"{tuple(example.shape)}; add the missing dimensions")
        in_chans = int(example.shape[1]) if in_chans is None else in_chans
        image_size = tuple(example.shape[2:]) if image_size is None else image_size
    if in_chans is None or image_size is None:
        raise TrustVisionError("wrap needs the input shape; pass example= a batch (N, C, H, W) "
                               "or in_chans= and image_size=")
    in_chans, size = int(in_chans), _size(image_size)
    for what, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != in_chans:
            raise TrustVisionError(f"{what} needs one value per input channel ({in_chans}), got "
                                   f"{len(values)}")
    if (mean is None) != (std is None):
        raise TrustVisionError("pass both mean= and std= (the normalisation the module expects) "
                               "or neither")
    net = WrappedClassifier(module, 1 if num_classes is None else int(num_classes), in_chans,
                            size, mean=mean, std=std)
    net.training = module.training  # the wrapper starts in the module's mode
    param = next(iter(module.parameters()), None)
    probe = (example if example is not None else torch.full((2, in_chans, *size), 0.5)).float()
    if param is not None:  # the normalisation goes where the module is
        probe = probe.to(param.device)
        net.norm_mean, net.norm_std = net.norm_mean.to(param.device), net.norm_std.to(param.device)
    out = _probe(net, probe)
    if not torch.is_tensor(out):
        raise TrustVisionError(f"the module returned {type(out).__name__}, not a tensor; wrap a "
                               "module whose forward returns logits (N, num_classes)")
    if out.ndim != 2 or out.shape[0] != probe.shape[0] or (
            num_classes is not None and out.shape[1] != int(num_classes)):
        want = f"({probe.shape[0]}, {num_classes if num_classes is not None else 'K'})"
        raise TrustVisionError(
            f"the module's output has shape {tuple(out.shape)} but logits {want} are expected; "
            "make forward return (N, num_classes), e.g. flatten or squeeze extra dimensions")
    if num_classes is None:
        net.num_classes = int(out.shape[1])
    net.tv_config = {
        "architecture": f"wrapped:{type(module).__name__}",
        "num_classes": net.num_classes,
        "in_chans": in_chans,
        "image_size": list(size),
        "kwargs": {},
    }
    return net
