"""Batched, seeded training augmentations on [0,1] image tensors (N, C, H, W).

Each augmentation is a callable ``aug(x, generator) -> x`` that draws its randomness from the
given ``torch.Generator`` only, so a seeded training run (and its resumption) is reproducible.
:func:`parse_augment` turns a command-line spec such as ``"shift:2,flip"`` into one callable.

Example:
    >>> import torch
    >>> aug = parse_augment("shift:1,flip")
    >>> tuple(aug(torch.rand(4, 1, 8, 8), torch.Generator().manual_seed(0)).shape)
    (4, 1, 8, 8)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from trustvision.errors import TrustVisionError

__all__ = ["Augment", "RandomShift", "RandomFlip", "Compose", "parse_augment"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


class RandomShift:
    """Translate each image by up to ``pad`` pixels in x and y (edge pixels repeated)."""

    def __init__(self, pad: int = 2):
        if pad < 0:
            raise TrustVisionError(f"shift augmentation needs pad >= 0, got {pad}")
        self.pad = int(pad)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.pad == 0:
            return x
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        offsets = (_rand((2, n), generator, x.device) * (2 * p + 1)).long().clamp_(max=2 * p)
        rows = torch.arange(h, device=x.device)[None, :] + offsets[0][:, None]  # (N, H)
        cols = torch.arange(w, device=x.device)[None, :] + offsets[1][:, None]  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N,H,W,C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomShift(pad={self.pad})"


class RandomFlip:
    """Mirror each image left-right with probability ``p`` (not for digits or text)."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = _rand((x.shape[0],), generator, x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class Compose:
    """Apply augmentations in order."""

    def __init__(self, augments: Sequence[Augment]):
        self.augments = list(augments)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for aug in self.augments:
            x = aug(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.augments})"


def parse_augment(spec: str | None) -> Augment | None:
    """Parse ``"shift[:PAD],flip[:P]"`` (comma separated; empty or ``"none"`` -> None)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    augments: list[Augment] = []
    for part in spec.split(","):
        name, _, arg = part.strip().partition(":")
        try:
            if name == "shift":
                augments.append(RandomShift(int(arg) if arg else 2))
            elif name == "flip":
                augments.append(RandomFlip(float(arg) if arg else 0.5))
            else:
                raise TrustVisionError(
                    f"unknown augmentation {name!r} in {spec!r}; use shift[:PAD] and/or flip[:P], "
                    "e.g. --augment shift:2,flip"
                )
        except ValueError:
            raise TrustVisionError(
                f"bad augmentation argument in {part.strip()!r}; use e.g. shift:2 or flip:0.5"
            ) from None
    return augments[0] if len(augments) == 1 else Compose(augments)
