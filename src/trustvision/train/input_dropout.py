"""Input dropout: drop whole pixels of the training images (Carter et al. 2021).

Carter, Jain, Mueller, Gifford, "Overinterpretation reveals image classification model
pathologies", NeurIPS 2021, propose input dropout (keep probability 0.8) to make a classifier
rely on more than a sparse set of pixels. A dropped pixel loses all its channels at once and is
replaced by the model's normalisation mean, so it becomes exactly zero after normalisation.
There is no 1/keep_prob rescaling (the inputs are images, not activations). Input dropout is a
training-time augmentation only; it must never be active at evaluation (the reference code left
it on, which made the SIS audit stochastic).

Example:
    >>> import torch
    >>> drop = InputDropout(0.5, fill=torch.full((1, 3, 1, 1), 0.5))
    >>> x = torch.rand(2, 3, 4, 4)
    >>> torch.equal(drop.eval()(x), x)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from trustvision.errors import TrustVisionError

__all__ = ["InputDropout", "drop_pixels", "check_keep_prob"]


def check_keep_prob(keep_prob: float) -> float:
    """Return ``keep_prob`` as a float, or raise a one-line error unless 0 < keep_prob <= 1."""
    try:
        value = float(keep_prob)
    except (TypeError, ValueError):
        raise TrustVisionError(
            f"input dropout keep probability {keep_prob!r} is not a number; use a value in (0, 1], "
            "e.g. 0.8"
        ) from None
    if not 0.0 < value <= 1.0:
        raise TrustVisionError(
            f"input dropout keep probability {keep_prob} is outside (0, 1]; use e.g. 0.8 "
            "(the probability that a pixel is kept)"
        )
    return value


def drop_pixels(
    x: torch.Tensor,
    keep_prob: float,
    fill: torch.Tensor | float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace whole pixels of ``x`` (N, C, H, W) by ``fill`` with probability ``1 - keep_prob``.

    One Bernoulli(keep_prob) draw per pixel and image, shared by all channels. ``fill`` is a
    scalar or broadcastable to (1, C, 1, 1) (the model's normalisation mean). Returns a new tensor
    of the same shape; ``x`` is not modified.
    """
    keep_prob = check_keep_prob(keep_prob)
    if keep_prob == 1.0:
        return x
    n, _, h, w = x.shape
    # Draw on the generator's device, then move: CPU generators can drive CUDA training.
    gen_device = generator.device if generator is not None else x.device
    keep = torch.rand((n, 1, h, w), generator=generator, device=gen_device).to(x.device) < keep_prob
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(keep, x, fill)


class InputDropout(nn.Module):
    """Drop whole pixels in training mode, identity in evaluation mode.

    Args:
        keep_prob: probability that a pixel is kept, in (0, 1].
        fill: value a dropped pixel takes, scalar or (1, C, 1, 1); use the model's ``norm_mean``
            so dropped pixels are zero after normalisation.
        generator: optional random generator (seeded training).
    """

    def __init__(
        self,
        keep_prob: float,
        fill: torch.Tensor | float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.keep_prob = check_keep_prob(keep_prob)
        self.register_buffer("fill", torch.as_tensor(fill, dtype=torch.float32).clone())
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return drop_pixels(x, self.keep_prob, self.fill, self.generator)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob}"
