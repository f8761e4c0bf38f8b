"""The classifier contracts: [0,1] images in, logits out, normalisation inside; and the
generative classifier's densities, latents and samples on top."""

from __future__ import annotations

import abc
import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["ImageClassifier", "GenerativeClassifier", "is_generative"]


class ImageClassifier(nn.Module):
    """Base class of every trustvision classifier.

    ``forward(x)`` takes images in [0, 1] of shape (N, C, H, W) and returns logits (N, num_classes);
    the per-channel normalisation ``(x - mean) / std`` happens inside. ``features(x)`` returns the
    penultimate-layer features (N, F). Subclasses implement ``forward_features`` (on normalised
    input) and ``forward_head``.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int | Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        mean = [0.5] * self.in_chans if mean is None else list(mean)
        std = [0.5] * self.in_chans if std is None else list(std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ValueError("mean and std need one value per input channel")
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Filled by trustvision.models.create / load: everything needed to rebuild the model.
        self.tv_config: dict = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))


class GenerativeClassifier(ImageClassifier, metaclass=abc.ABCMeta):
    """Base class of classifiers that model ``p(x|y)``: an invertible map ``x -> z`` and a
    class-conditional density on ``z`` (e.g. the IB-INN, :class:`trustvision.models.generative.IBINN`).

    Every :class:`ImageClassifier` method works as usual (``forward`` returns logits, e.g.
    ``log p(y|x)``). Subclasses implement the generative side; densities are in nats over
    images in [0, 1]^D with ``D = C * H * W`` (the normalisation's log-det included):

    * ``log_px(x)`` -> (N,): ``log p(x)``;
    * ``log_px_given_y(x)`` -> (N, K): ``log p(x|y)`` for every class;
    * ``latent(x)`` -> ``(z (N, D), logdet (N,))``: the latent and ``log|det dz/dx|``;
    * ``invert(z)`` -> images (N, C, H, W) in input space;
    * ``sample(y, n=1, temperature=1.0, generator=None)`` -> images (M, C, H, W) in [0, 1].

    ``bits_per_dim(x)`` follows from ``log_px`` and D. A subclass that leaves one of these
    out cannot be instantiated (``TypeError``). :func:`is_generative` tests for this class.
    ``class_means(labels)`` (the latent centre of each class, used by latent counterfactuals) is
    optional: models whose class densities have no single centre leave it unimplemented.
    """

    @abc.abstractmethod
    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` (N,), nats over [0, 1]^D."""

    @abc.abstractmethod
    def log_px_given_y(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|y)`` for every class, (N, K), nats over [0, 1]^D."""

    @abc.abstractmethod
    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, logdet)``: latents (N, D) and ``log|det dz/dx|`` (N,)."""

    @abc.abstractmethod
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) for latents (N, D) (the inverse of :meth:`latent`)."""

    @abc.abstractmethod
    def sample(self, y: int | torch.Tensor, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-conditional samples (M, C, H, W) in [0, 1]: ``n`` of class ``y`` (an int) or one
        per label of a tensor ``y``; ``temperature`` scales the latent noise."""

    def class_means(self, labels: torch.Tensor) -> torch.Tensor:
        """Latent class centres (M, D) of ``labels`` (M,); optional (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} has no latent class means")

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Bits per dimension of 8-bit images, ``8 - log p(x) / (D ln 2)``, (N,).

        The density over [0, 1]^D is converted to the 256-level pixel scale (``+ D log 256``).
        """
        dim = self.in_chans * self.image_size[0] * self.image_size[1]
        return 8.0 - self.log_px(x) / (dim * math.log(2.0))


def is_generative(model: nn.Module | str) -> bool:
    """True when ``model`` is (or wraps, via ``.module`` as DistributedDataParallel does) a
    :class:`GenerativeClassifier`.

    ``model`` may also be a registered architecture name (e.g. ``"ibinn-small"``): then the class
    its factory returns (its return annotation, see :func:`trustvision.models.model_class`)
    decides; unknown names give False.

    Example:
        >>> from trustvision import models
        >>> models.is_generative("ibinn-small"), models.is_generative("ibinn-small-ff")
        (True, False)
    """
    if isinstance(model, str):
        from trustvision.models import model_class

        cls = model_class(model)
        return isinstance(cls, type) and issubclass(cls, GenerativeClassifier)
    return isinstance(getattr(model, "module", model), GenerativeClassifier)
