"""RISE: randomized input sampling, the black-box heatmap averaged over random masks.

Reference:
    Petsiuk, Das, Saenko. "RISE: Randomized Input Sampling for Explanation of Black-box Models."
    BMVC 2018.

N binary ``cells`` x ``cells`` grids keep each cell with probability p; each is upsampled
bilinearly to (cells + 1) x the cell size (cell = ceil(H / cells) pixels) and cropped back to
H x W at a random shift of up to one cell, which gives smooth masks M_i in [0, 1]. The heatmap of
class c is the mask average weighted by the class probability of the masked image,

    S_c = 1 / (N p) * sum_i p_c(I * M_i + B * (1 - M_i)) M_i,

with B the baseline (0, the paper's black, by default). The model is only run forward (no
gradients), all images x masks in ``internal_batch_size`` chunks. The masks depend on ``seed``
alone and are the same for every image of a call, so explaining a batch gives exactly what
explaining its images one at a time gives.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> heat = RISE(net).attribute(torch.rand(2, 1, 8, 8), n_masks=50)
    >>> tuple(heat.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from trustvision._utils.images import (
    BaselineType,
    TargetType,
    as_pair,
    check_inputs,
    chunks,
    eval_mode,
    make_baseline,
    resolve_target,
)
from trustvision.errors import TrustVisionError
from trustvision.explain._base import Explainer

__all__ = ["RISE", "rise_masks"]


def rise_masks(
    n_masks: int,
    cells: int | Sequence[int],
    size: Sequence[int],
    keep_prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``n_masks`` RISE masks (n_masks, 1, H, W) in [0, 1], drawn on the CPU from ``generator``.

    A ``cells`` grid of Bernoulli(``keep_prob``) cells, upsampled bilinearly to (cells + 1) x
    ceil(size / cells) and cropped to ``size`` at a uniform random shift in [0, cell) per axis.
    """
    h, w = as_pair(size)
    sh, sw = as_pair(cells)
    ch, cw = math.ceil(h / sh), math.ceil(w / sw)
    grid = (torch.rand(n_masks, 1, sh, sw, generator=generator) < keep_prob).float()
    up = F.interpolate(grid, size=((sh + 1) * ch, (sw + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (n_masks,), generator=generator)
    dx = torch.randint(0, cw, (n_masks,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, W)
    return up[torch.arange(n_masks)[:, None, None], 0, rows, cols].unsqueeze(1)


class RISE(Explainer):
    """RISE (Petsiuk et al., BMVC 2018): the probability-weighted mean of random masks
    (see the module docstring). Cost: ``n_masks`` forward passes per image, no backward."""

    name, title, order = "rise", "RISE", 40
    kind = "heatmap"
    in_audit = True

    @torch.no_grad()
    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        n_masks: int = 1000,
        cells: int | Sequence[int] = 7,
        keep_prob: float = 0.5,
        baselines: BaselineType = 0.0,
    ) -> torch.Tensor:
        """Heatmaps (N, 1, H, W) for ``inputs`` (N, C, H, W) in [0, 1]; higher = more important.

        Args:
            target: class per image; ``None`` = the predicted class.
            seed: seed of the masks (the same masks for every image of the call).
            internal_batch_size: most masked images per forward pass; ``None`` = ``n_masks``
                (all masks of one image at a time).
            n_masks: number of masks N (1000; the Monte-Carlo noise of the heatmap falls as
                1 / sqrt(N), the paper uses several thousand on ImageNet).
            cells: grid of the masks' cells per side, or (rows, cols) (7, the paper's).
            keep_prob: probability p that a cell is kept (0.5).
            baselines: what masked-out pixels become: 0 (black, the paper's), ``"blur"``, a
                number or a tensor broadcastable to ``inputs``.
        """
        x = check_inputs(inputs).detach()
        n, _, h, w = x.shape
        if int(n_masks) < 1:
            raise TrustVisionError(f"n_masks must be at least 1, got {n_masks}")
        if not 0.0 < float(keep_prob) <= 1.0:
            raise TrustVisionError(f"keep_prob must be in (0, 1], got {keep_prob}")
        if min(as_pair(cells)) < 1:
            raise TrustVisionError(f"cells must be positive, got {cells!r}")
        n_masks = int(n_masks)
        gen = torch.Generator().manual_seed(int(seed))
        masks = rise_masks(n_masks, cells, (h, w), float(keep_prob), gen).to(x.device, x.dtype)

        with eval_mode(self.model):
            base = make_baseline(x, baselines)
            t = resolve_target(self.model, x, target)
            # probs[i * n_masks + j] = p_c(image i under mask j), image-major
            probs = torch.empty(n * n_masks, device=x.device, dtype=x.dtype)
            for sl in chunks(n * n_masks, internal_batch_size or n_masks):
                pair = torch.arange(sl.start, sl.stop, device=x.device)
                img, m = pair // n_masks, masks[pair % n_masks]
                phi = x[img] * m + base[img] * (1 - m)
                probs[sl] = torch.softmax(self.model(phi), dim=1).gather(1, t[img].view(-1, 1)).squeeze(1)
        probs = probs.view(n, n_masks)
        flat = masks.flatten(1)  # (n_masks, H*W)
        # one image at a time: the same arithmetic whatever the batch
        heat = torch.stack([probs[i] @ flat for i in range(n)]) / (n_masks * float(keep_prob))
        return heat.view(n, 1, h, w)
