"""Deletion / insertion faithfulness of heatmaps (Petsiuk et al. BMVC 2018; as used by I-GOS).

Cells of a coarse grid are ranked most important first by the heatmap (its mean over each
cell). Deletion replaces the cells by the baseline in that order and records the softmax
probability of the class; insertion starts from the baseline and reveals them. A baseline on
which the model still sees the class says little: deletion cannot fall below the class
probability on it, and insertion starts near the top. The result says per image how much the
baseline keeps (``baseline_probability``, ``baseline_keeps_class``: at least ``BASELINE_KEEPS``
(half) of the probability on the image); ``baseline="adaptive-blur"`` blurs each image harder
until the class is gone (:func:`~trustvision._utils.images.uninformative_baseline`; the paper's
blur, the default, keeps the class on many small images). Each curve is
integrated with the trapezoid rule over the exact fraction of cells changed (0, step/n, ...,
1), so a partial last step counts only for the cells it really adds (the reference code adds a
whole step there). Lower deletion AUC and higher insertion AUC are better. All steps of all
images are evaluated in batched forward passes (``internal_batch_size`` bounds them).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class MeanProb(nn.Module):  # p(class 0) = mean pixel value
    ...     def forward(self, x):
    ...         m = x.mean((1, 2, 3)).clamp(1e-6, 1 - 1e-6)
    ...         return torch.stack([m.log(), (1 - m).log()], 1)
    >>> r = deletion_insertion(MeanProb(), torch.ones(1, 1, 4, 4), torch.rand(1, 1, 4, 4),
    ...                        target=0, baseline="zero", cells=4)
    >>> round(r.deletion_auc[0], 4), round(r.insertion_auc[0], 4)
    (0.5, 0.5)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision._utils.images import (
    BASELINE_KEEPS,
    BaselineType,
    TargetType,
    as_pair,
    check_inputs,
    chunks,
    default_mask_size,
    eval_mode,
    make_baseline,
    patch_masks,
    resolve_target,
    uninformative_baseline,
)

__all__ = ["DeletionInsertionResult", "deletion_insertion", "trapezoid_auc"]


@dataclass
class DeletionInsertionResult:
    """Per-image AUCs (lists of length N) and curves (N lists of T+1 probabilities).

    ``fractions`` (T+1): fraction of cells deleted / inserted at each point, from 0 to 1.
    Directions: deletion_auc lower is better, insertion_auc higher is better.
    ``baseline_probability``: per image the class probability on the baseline (the deletion
    curve's last point); ``baseline_keeps_class``: it is at least ``BASELINE_KEEPS`` (0.5) of the
    probability on the image (the first point), so that image's AUCs say little.
    """

    deletion_auc: list[float]
    insertion_auc: list[float]
    fractions: list[float]
    deletion_curve: list[list[float]]
    insertion_curve: list[list[float]]
    target: list[int]
    cells: tuple[int, int]
    step: int
    baseline_probability: list[float] = field(default_factory=list)
    baseline_keeps_class: list[bool] = field(default_factory=list)
    deletion_direction: str = "lower is better"
    insertion_direction: str = "higher is better"

    def summary(self) -> dict:
        """Mean and std over images of both AUCs, and the number of images whose baseline keeps
        the class."""
        d = torch.tensor(self.deletion_auc)
        i = torch.tensor(self.insertion_auc)
        std = (lambda v: float(v.std(unbiased=False)))
        return {
            "deletion_mean": float(d.mean()), "deletion_std": std(d),
            "insertion_mean": float(i.mean()), "insertion_std": std(i),
            "n": len(self.deletion_auc), "baseline_keeps_class": sum(self.baseline_keeps_class),
        }

    def to_json(self) -> dict:
        d = asdict(self)
        d["cells"] = list(self.cells)
        d["summary"] = self.summary()
        return d


def trapezoid_auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid-rule area under ``curve`` (..., T+1) over ``fractions`` (T+1,)."""
    dx = fractions[1:] - fractions[:-1]
    return ((curve[..., 1:] + curve[..., :-1]) * 0.5 * dx).sum(-1)


def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    heatmaps: torch.Tensor,
    target: TargetType = None,
    baseline: BaselineType = "blur",
    steps: int = 50,
    cells: int | Sequence[int] | None = None,
    internal_batch_size: int | None = 512,
) -> DeletionInsertionResult:
    """Deletion and insertion curves and AUCs of ``heatmaps`` for ``inputs``.

    Args:
        model: classifier on [0, 1] images returning logits.
        inputs: (N, C, H, W) images in [0, 1].
        heatmaps: (N, 1, H, W) or (N, H, W) (or (N, 1, h, w) at cell resolution); higher = more
            important.
        target: explained class per image; ``None`` = the class predicted on ``inputs``.
        baseline: ``"blur"`` (I-GOS blur, the paper's metric), ``"adaptive-blur"`` (per image
            the blur strengthened until the model's class probability on it is below half of
            that on the image: :func:`~trustvision._utils.images.uninformative_baseline`),
            ``"zero"``, a number or a tensor. Whatever the choice, the class probability on it
            is reported per image (``baseline_keeps_class``).
        steps: about this many steps: ``step = max(1, n_cells // steps)`` cells each (the
            reference's 50); the last step may be partial.
        cells: grid of the ranking (default: the I-GOS mask size, 28x28 at 224 px).
        internal_batch_size: most images per forward pass (``None``: all at once).
    """
    x = check_inputs(inputs).detach()
    n, _, h, w = x.shape
    hm = heatmaps.detach().to(x.device, torch.float32)
    if hm.ndim == 3:
        hm = hm.unsqueeze(1)
    if hm.ndim != 4 or hm.shape[0] != n or hm.shape[1] != 1:
        raise TrustVisionError(
            f"heatmaps must have shape (N, 1, H, W) with N={n}, got {tuple(heatmaps.shape)}"
        )
    gh, gw = default_mask_size(h, w) if cells is None else as_pair(cells)
    n_cells = gh * gw
    # Cell scores: mean of the heatmap over each cell (exact when the heatmap is at cell size).
    scores = F.adaptive_avg_pool2d(hm, (gh, gw)).flatten(1)
    # Most important first; ties go to the lower cell index (stable sort).
    order = torch.sort(-scores, dim=1, stable=True).indices
    step = max(1, n_cells // max(1, int(steps)))
    counts = list(range(0, n_cells, step)) + [n_cells]
    t_points = len(counts)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n_cells, device=x.device).expand(n, -1).contiguous())
    k = torch.tensor(counts, device=x.device)
    # changed[i, j, c] = cell c is among the first counts[j] cells of image i.
    changed = (ranks.unsqueeze(1) < k.view(1, -1, 1)).float()  # (N, T+1, cells)

    with eval_mode(model), torch.no_grad():
        t = resolve_target(model, x, target)
        if isinstance(baseline, str) and baseline == "adaptive-blur":
            base = uninformative_baseline(model, x, t, batch_size=internal_batch_size)[0]
        else:
            base = make_baseline(x, baseline)
        total = n * t_points
        curves = torch.empty(2, total, device=x.device)
        flat = changed.reshape(total, n_cells)
        img_idx = torch.arange(n, device=x.device).repeat_interleave(t_points)
        for which in (0, 1):  # 0: deletion (changed -> baseline), 1: insertion (changed -> image)
            for sl in chunks(total, internal_batch_size):
                m = patch_masks(flat[sl], (gh, gw), (h, w)).to(x.dtype)
                xi, bi = x[img_idx[sl]], base[img_idx[sl]]
                phi = bi * m + xi * (1 - m) if which == 0 else xi * m + bi * (1 - m)
                p = torch.softmax(model(phi), dim=1).gather(1, t[img_idx[sl]].view(-1, 1))
                curves[which, sl] = p.squeeze(1)
    curves = curves.view(2, n, t_points).cpu()
    fr = torch.tensor(counts, dtype=torch.float64) / n_cells
    auc = trapezoid_auc(curves.double(), fr)
    return DeletionInsertionResult(
        deletion_auc=auc[0].tolist(),
        insertion_auc=auc[1].tolist(),
        fractions=fr.tolist(),
        deletion_curve=curves[0].tolist(),
        insertion_curve=curves[1].tolist(),
        target=t.tolist(),
        cells=(gh, gw),
        step=step,
        baseline_probability=curves[0, :, -1].tolist(),
        baseline_keeps_class=(curves[0, :, -1] >= BASELINE_KEEPS * curves[0, :, 0]).tolist(),
    )
