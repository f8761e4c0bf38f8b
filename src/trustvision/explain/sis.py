"""Sufficient input subsets (SIS): exact backward selection, SIS collections, Batched Gradient SIS.

References:
    Carter, Mueller, Jain, Gifford. "What made you do this? Understanding black-box decisions with
    sufficient input subsets." AISTATS 2019.
    Carter, Jain, Mueller, Gifford. "Overinterpretation reveals image classification model
    pathologies." NeurIPS 2021.

f(x) is the model's softmax probability of the target class (the predicted class by default). A
*feature* is a whole pixel (all channels; ``features="pixel"``, index ``r * W + c``) or a K x K
patch (``features="patch:K"``, index ``r * ceil(W / K) + c`` on the patch grid). Removing a
feature replaces its pixels by the mask value: ``"mean"`` (the paper's choice, zero after the
model's normalisation: the model's ``norm_mean`` pixel, which is the training-set mean when the
model was built with the dataset's statistics; a model without a ``norm_mean`` buffer gets each
image's own per-channel mean, so that a batch gives what one image at a time gives), ``"zeros"``,
``"blur"`` (a Gaussian blur scaled to the image size), a number or a tensor.

- **BackSelect** (:meth:`SIS.backselect`) removes, at each step, the remaining feature whose
  removal leaves f highest (every remaining candidate is scored, ties go to the lowest feature
  index) until every feature is removed; it records the removal order and f after each removal.
  That costs p (p + 1) / 2 model evaluations for p features (2,080 at 8 x 8, 524,800 at 32 x 32):
  every step's candidates are built by vectorised indexing and evaluated in chunks of
  ``internal_batch_size`` under ``no_grad`` in eval mode, so the time is the model's raw batched
  forward time.
- **FindSIS** (:meth:`BackSelection.sis`) walks the order backwards from the features removed last,
  adding them back until f >= ``threshold``; no pruning follows. The result is sufficient, and
  removing *any* one of its features drops f below the threshold: the feature backward selection
  removed from it (the last one added back) was the one whose removal kept f highest, and that
  left f < threshold. When f(x) < threshold there is no SIS (status ``"below-threshold"``); when
  the fully masked input alone keeps f >= threshold the class does not rest on the image and the
  empty set is sufficient (status ``"no-subset-needed"``); neither returns a subset.
- **Collection** (:meth:`SIS.collection`): mask the SIS found in the input and repeat on the rest
  while f(rest) >= threshold; the SISes are disjoint.
- :meth:`SIS.find_batch` runs several images' backward selections in lockstep: the candidates of
  all images of a step go through the same forward passes (identical subsets to one at a time).
- **Batched Gradient SIS** (:class:`BatchedGradientSIS`): a continuous mask m (features), input
  ``(1 - m) * x + m * mask``; each iteration one forward + backward of f with respect to m, then the
  k unmasked features with the largest gradient (plus Gaussian noise of variance ``noise`` to
  break ties, seeded per image from ``(seed, image content)``) are masked. ceil(p / k) iterations,
  all images in lockstep. The SIS is read off as for BackSelect at the iteration boundaries; the
  last block added back is then bisected (ceil(log2 k) more forward passes) to the shortest
  sufficient suffix of the order found there, so the result is sufficient and removing its last
  added feature drops f below the threshold (BGSIS does not guarantee more).

The full order is kept in every result (``order``, ``values``): the 5% subsets kept last by
backward selection, or the SIS at another threshold (:meth:`BackSelection.sis`), are read off it
without new evaluations, as the paper's CIFAR scripts do.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Corner(nn.Module):  # class 0 when the top-left pixel is bright
    ...     def forward(self, x):
    ...         v = 8 * x[:, 0, 0, 0] - 4
    ...         return torch.stack([v, -v], 1)
    >>> x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    >>> x[0, 0, 0] = 1.0
    >>> res = SIS(Corner(), threshold=0.9, mask="zeros").find(x, target=0)
    >>> res.status, res.size, res.mask.nonzero().tolist(), res.evaluations
    ('ok', 1, [[0, 0]], 137)
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from trustvision._utils.images import (
    TargetType,
    _memory_budget,
    check_inputs,
    chunks,
    eval_mode,
    gaussian_blur,
    resolve_target,
)
from trustvision.errors import TrustVisionError
from trustvision.explain._base import Explainer
from trustvision.explain.igos import check_autocast, model_logits

__all__ = ["SIS", "BatchedGradientSIS", "BackSelection", "SISResult", "STATUSES", "mask_images", "parse_features",
           "removal_ranks"]

def removal_ranks(results) -> torch.Tensor:
    """(N, p): each feature's position in the removal order of each result (anything with an
    ``order``, e.g. :class:`SISResult` or :class:`BackSelection`; 0 = removed first, p - 1 = kept
    last, the most important), e.g. to compare two orders by rank correlation."""
    ranks = []
    for r in results:
        order = torch.as_tensor(list(r.order), dtype=torch.long)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        ranks.append(rank)
    return torch.stack(ranks)


#: what a result says: a SIS was found; f(x) < threshold (no subset can be sufficient); the fully
#: masked input alone keeps f >= threshold (the empty set is sufficient)
STATUSES = ("ok", "below-threshold", "no-subset-needed")
MASKS = ("mean", "zeros", "blur")


# -- arguments -------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TrustVisionError(f"threshold must be a number in (0, 1), got {threshold!r}") from None
    if not 0.0 < t < 1.0:
        raise TrustVisionError(f"threshold must be in (0, 1) (the paper uses 0.99 on CIFAR, 0.9 on ImageNet), "
                               f"got {threshold!r}")
    return t


def parse_features(features: str) -> int:
    """The patch side K of a features spec: ``"pixel"`` -> 1, ``"patch:K"`` -> K (one-line errors
    otherwise)."""
    spec = str(features).strip().lower() if isinstance(features, str) else None
    if spec == "pixel":
        return 1
    if spec is not None and spec.startswith("patch:"):
        k = spec[len("patch:"):]
        if k.isdigit() and int(k) >= 1:
            return int(k)
    raise TrustVisionError(f"features must be 'pixel' or 'patch:K' with K a positive integer "
                           f"(e.g. 'patch:8'), got {features!r}")


def _features_name(k: int) -> str:
    return "pixel" if k == 1 else f"patch:{k}"


def _check_mask(mask) -> "str | float | torch.Tensor":
    if isinstance(mask, str):
        m = "zeros" if mask == "zero" else mask
        if m not in MASKS:
            raise TrustVisionError(f"unknown mask {mask!r}; use 'mean', 'zeros', 'blur', a number or a tensor")
        return m
    if isinstance(mask, bool) or not isinstance(mask, (int, float, torch.Tensor)):
        raise TrustVisionError(f"mask must be 'mean', 'zeros', 'blur', a number or a tensor, got {mask!r}")
    if isinstance(mask, torch.Tensor):
        if mask.ndim > 4:
            raise TrustVisionError(f"a mask tensor must be (C, H, W), (C, 1, 1) or (N, C, H, W), got shape "
                                   f"{tuple(mask.shape)}")
        return mask.detach()
    return float(mask)


def _mask_name(mask) -> str:
    return mask if isinstance(mask, str) else "tensor" if isinstance(mask, torch.Tensor) else f"constant {mask:g}"


def _check_batch(size) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TrustVisionError(f"internal_batch_size must be a positive integer or None, got {size!r}")
    return int(size)


def mask_images(model: nn.Module, x: torch.Tensor, mask) -> torch.Tensor:
    """The fully masked inputs (N, C, H, W) for images ``x`` under ``mask`` (see the module
    docstring); a tensor mask must broadcast to one image (C, H, W) or match the batch."""
    n, c, h, w = x.shape
    if isinstance(mask, str):
        if mask == "mean":
            nm = getattr(model, "norm_mean", None)
            if isinstance(nm, torch.Tensor) and nm.numel() == c:
                return nm.detach().to(x.device, x.dtype).reshape(1, c, 1, 1).expand(n, c, h, w).clone()
            return x.mean((2, 3), keepdim=True).expand(n, c, h, w).clone()
        if mask == "zeros":
            return torch.zeros_like(x)
        return gaussian_blur(x)
    if isinstance(mask, torch.Tensor):
        m = mask.to(x.device, x.dtype)
        ok = m.ndim <= 3 or m.shape[0] in (1, n)
        if ok:
            try:
                return (m if m.ndim == 4 else m.unsqueeze(0) if m.ndim == 3 else m).expand(n, c, h, w).clone()
            except RuntimeError:
                pass
        raise TrustVisionError(f"mask tensor of shape {tuple(mask.shape)} does not fit images of shape "
                               f"{(c, h, w)}; give (C, H, W), (C, 1, 1) or one per image (N, C, H, W)")
    return torch.full_like(x, float(mask))


def _auto_rows(row_bytes: int, device: torch.device) -> int:
    """Candidates per forward pass when ``internal_batch_size`` is None. On the CPU about 1.5 MiB
    of input per pass (128 images of 32 x 32 x 3, 1024 of 8 x 8, at least 16 at 224 x 224 x 3):
    measured on the small CNN, larger passes leave the caches and are slower per image. On a GPU
    what fits 1/64 of the free memory (room for the activations), at most 8192."""
    if device.type == "cpu":
        return int(max(16, min(1024, (3 << 19) // max(1, row_bytes))))
    return int(max(1, min(8192, _memory_budget(device) // (64 * max(1, row_bytes)))))


# -- features --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Features:
    """Features of an H x W image with patch side ``k``: ``fmap`` (H, W) the feature of each pixel,
    ``members`` (p, k*k) the flat pixel indices of each feature (edge patches padded with their last
    pixel: setting a pixel twice is harmless)."""

    k: int
    size: tuple[int, int]
    grid: tuple[int, int]
    fmap: torch.Tensor
    members: torch.Tensor

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    @staticmethod
    def build(k: int, h: int, w: int, device) -> "_Features":
        gh, gw = math.ceil(h / k), math.ceil(w / k)
        rows = torch.arange(h, device=device) // k
        cols = torch.arange(w, device=device) // k
        fmap = rows[:, None] * gw + cols[None, :]
        flat = fmap.flatten()
        if k == 1:
            members = torch.arange(h * w, device=device).view(-1, 1)
        else:  # the pixels of each feature in raster order, padded with its last pixel
            by_feature = torch.argsort(flat, stable=True)
            count = torch.bincount(flat, minlength=gh * gw)
            first = torch.cumsum(count, 0) - count
            j = torch.minimum(torch.arange(k * k, device=device)[None, :], count[:, None] - 1)
            members = by_feature[first[:, None] + j]
        return _Features(k, (h, w), (gh, gw), fmap, members)

    def pixels(self, feature_mask: torch.Tensor) -> torch.Tensor:
        """(..., p) feature mask -> (..., H, W) pixel mask."""
        return feature_mask[..., self.fmap]


def _largest_first(score: torch.Tensor, take: int) -> torch.Tensor:
    """The indices of the ``take`` largest scores of each row, largest first, ties to the lowest
    index: a stable descending sort's first ``take``. On the CPU, where sorting many long rows
    costs far more than ``topk`` (32 x 1,024 scores: 2.4 ms vs 0.2 ms; one 224 px image: 6.5 ms
    vs 0.5 ms), ``topk`` answers whenever the ``take + 1`` largest values are all distinct (its
    order among equal values is unspecified); a tie, a NaN or an exhausted row falls back to the
    sort. Up to 4,096 scores the one sort kernel is the cheaper (BGSIS's loop pays for every
    small kernel between two passes)."""
    if score.device.type == "cpu" and score.numel() > 4096 and take < score.shape[1]:
        vals, idx = score.topk(take + 1, dim=1)
        if bool((vals.diff(dim=1) < 0).all()):
            return idx[:, :take]
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :take]


def _logits(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The model's logits in float32 (or float64); with ``autocast`` its forward runs in bf16
    autocast (:func:`~trustvision.explain.igos.model_logits`)."""
    out = model_logits(model, x, autocast)
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def _prob(model: nn.Module, x: torch.Tensor, t: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """f: the softmax probability of class ``t[i]`` on ``x[i]`` (N,), in float64 (exact copies of
    the model's float32 values: ties stay ties)."""
    return torch.softmax(_logits(model, x, autocast), dim=1).gather(1, t.view(-1, 1)).squeeze(1).double()


# -- results ---------------------------------------------------------------------------------


def _outline(mask: torch.Tensor) -> list:
    """Segments ((x0, y0), (x1, y1)) in imshow coordinates of the edges between kept and masked
    pixels of a bool (H, W) mask (and the image border), to outline the SIS."""
    m = torch.nn.functional.pad(mask.bool(), (1, 1, 1, 1))
    segs = []
    # horizontal edges: between rows r - 1 and r where one side is kept
    for r, c in (m[1:, 1:-1] != m[:-1, 1:-1]).nonzero().tolist():
        segs.append(((c - 0.5, r - 0.5), (c + 0.5, r - 0.5)))
    for r, c in (m[1:-1, 1:] != m[1:-1, :-1]).nonzero().tolist():
        segs.append(((c - 0.5, r - 0.5), (c - 0.5, r + 0.5)))
    return segs


@dataclass
class SISResult:
    """One sufficient input subset (or the reason there is none).

    ``status``: one of :data:`STATUSES`; ``mask``: bool over the features (H x W for pixels, the
    patch grid for ``patch:K``), True = kept (all False unless ``status == "ok"``); ``confidence``:
    f on the input showing only the subset (for ``"no-subset-needed"`` f on the fully masked input;
    None for ``"below-threshold"``); ``size``: features in the subset; ``indices``: them in the
    order they were added back; ``order`` / ``values``: the removal order it came from and f after
    each removal (None where not evaluated: BGSIS); ``probability``: f on the input (earlier SISes
    of a collection masked); ``empty_probability``: f with every feature masked; ``evaluations``:
    single-image model evaluations spent (``gradient_passes`` of them forward + backward).
    """

    status: str
    mask: torch.Tensor
    confidence: float | None
    size: int
    threshold: float
    target: int
    predicted: int
    probability: float
    empty_probability: float
    order: list[int]
    values: list[float | None]
    indices: list[int]
    features: str
    grid: tuple[int, int]
    mask_name: str
    method: str = "sis"
    evaluations: int = 0
    gradient_passes: int = 0
    seconds: float = 0.0
    image: torch.Tensor | None = field(default=None, repr=False)
    mask_image: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fraction(self) -> float:
        """Size as a fraction of the features."""
        return self.size / (self.grid[0] * self.grid[1])

    @property
    def pixel_mask(self) -> torch.Tensor:
        """The subset as a bool (H, W) pixel mask."""
        if self.image is None:
            raise TrustVisionError("this SIS result has no image attached; its pixel mask is unknown")
        h, w = self.image.shape[-2:]
        return _Features.build(parse_features(self.features), h, w, "cpu").pixels(self.mask.flatten().cpu())

    @property
    def reason(self) -> str:
        """In words, what the result means."""
        if self.status == "below-threshold":
            return (f"no SIS: the model's probability of class {self.target} on the image is "
                    f"{self.probability:.3f} < threshold {self.threshold:g}, so no subset can be sufficient")
        if self.status == "no-subset-needed":
            return (f"no SIS needed: the fully masked input ({self.mask_name} mask) alone gives class "
                    f"{self.target} probability {self.empty_probability:.3f} >= threshold {self.threshold:g}: "
                    "the prediction does not rest on any feature of the image (the empty set is sufficient)")
        return (f"{self.size} of {self.grid[0] * self.grid[1]} features ({self.fraction:.1%}) keep class "
                f"{self.target} at probability {self.confidence:.3f} >= {self.threshold:g}")

    def shown(self) -> torch.Tensor:
        """The image (C, H, W) as the model sees it through the subset (the rest masked)."""
        if self.image is None or self.mask_image is None:
            raise TrustVisionError("this SIS result has no image attached; cannot show it")
        return torch.where(self.pixel_mask.unsqueeze(0), self.image, self.mask_image)

    def summary(self) -> dict:
        """The few numbers worth a line in a table."""
        return {"sis_status": self.status, "sis_size": self.size, "sis_fraction": self.fraction,
                "sis_confidence": self.confidence, "evaluations": self.evaluations}

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the image itself is left out; ``sis``: the features kept)."""
        return {
            "method": self.method, "status": self.status, "reason": self.reason,
            "threshold": self.threshold, "target": self.target, "predicted": self.predicted,
            "probability": self.probability, "empty_probability": self.empty_probability,
            "confidence": self.confidence, "size": self.size, "fraction": self.fraction,
            "features": self.features, "grid": list(self.grid), "mask": self.mask_name,
            "sis": list(self.indices), "order": list(self.order),
            "values": [None if v is None or v != v else float(v) for v in self.values],
            "evaluations": self.evaluations, "gradient_passes": self.gradient_passes,
            "seconds": self.seconds,
        }

    def figure(self, class_names: Sequence[str] | None = None):
        """A matplotlib Figure: the image, and the image as the model sees it through its SIS
        (the other features replaced by the mask value), with the confidence."""
        from matplotlib.figure import Figure

        from trustvision.explain.plot import image_to_numpy

        if self.image is None:
            raise TrustVisionError("this SIS result has no image attached; cannot draw it")

        def name(c: int) -> str:
            return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)

        cmap = "gray" if self.image.shape[0] == 1 else None
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        ax = fig.add_subplot(1, 2, 1)
        ax.imshow(image_to_numpy(self.image), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        pred = f" (predicted {name(self.predicted)})" if self.predicted != self.target else ""
        ax.set_title(f"class {name(self.target)}{pred}\np = {self.probability:.3f}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(1, 2, 2)
        ax.axis("off")
        if self.ok:
            ax.imshow(image_to_numpy(self.shown()), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            from matplotlib.collections import LineCollection

            ax.add_collection(LineCollection(_outline(self.pixel_mask), colors="tab:red", linewidths=0.8))
            ax.set_title(f"{self.method.upper()}: {self.size} feature{'s' if self.size != 1 else ''} "
                         f"({self.fraction:.1%})\np = {self.confidence:.3f} >= {self.threshold:g}", fontsize=8)
        else:
            ax.text(0.0, 0.5, self.reason.replace(": ", ":\n", 1), fontsize=7, va="center", wrap=True)
        fig.subplots_adjust(left=0.02, right=0.98, top=0.85, bottom=0.02, wspace=0.05)
        return fig

    def render(self, path: str | Path) -> list[Path]:
        """Write :meth:`figure` as ``<path>.png``; returns the paths written."""
        from trustvision.explain.plot import save_png

        return save_png(self.figure(), path)


@dataclass
class BackSelection:
    """The full backward selection of one image: ``order`` (features, first removed first) and
    ``values[j]`` = f after removing ``order[:j + 1]`` (None where not evaluated, e.g. BGSIS);
    ``probability`` = f before any removal; ``excluded``: features masked from the start (the
    earlier SISes of a collection). :meth:`sis` reads the SIS at any threshold off it.
    """

    target: int
    predicted: int
    probability: float
    order: list[int]
    values: list[float | None]
    features: str
    grid: tuple[int, int]
    mask_name: str
    excluded: list[int] = field(default_factory=list)
    method: str = "sis"
    evaluations: int = 0
    gradient_passes: int = 0
    seconds: float = 0.0
    image: torch.Tensor | None = field(default=None, repr=False)
    mask_image: torch.Tensor | None = field(default=None, repr=False)

    @property
    def empty_probability(self) -> float:
        """f with every feature masked."""
        v = self.values[-1] if self.values else self.probability
        return float("nan") if v is None else float(v)

    def kept_last(self, n: int) -> torch.Tensor:
        """Bool mask over the features (the grid) of the ``n`` features removed last (e.g. the
        5% subsets of the overinterpretation experiments)."""
        m = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.bool)
        if n > 0:
            m[torch.as_tensor(self.order[-n:], dtype=torch.long)] = True
        return m.view(self.grid)

    def sis(self, threshold: float) -> SISResult:
        """The SIS at ``threshold``: the features removed last, added back until f >= threshold
        (the shortest evaluated suffix of the order with f >= threshold); a status says when
        there is none (see :data:`STATUSES`)."""
        tau = _check_threshold(threshold)
        p = len(self.order)
        fe = self.empty_probability
        if not self.probability >= tau:
            status, j = "below-threshold", p
        elif fe >= tau:
            status, j = "no-subset-needed", p
        else:
            status = "ok"
            # s(j) = f(order[j:]); s(0) = probability, s(j) = values[j - 1]
            j = max(i for i in range(p + 1)
                    if (self.probability if i == 0 else self.values[i - 1]) is not None
                    and (self.probability if i == 0 else self.values[i - 1]) >= tau)
        kept = self.order[j:] if status == "ok" else []
        mask = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.bool)
        if kept:
            mask[torch.as_tensor(kept, dtype=torch.long)] = True
        conf = (None if status == "below-threshold" else fe if status == "no-subset-needed"
                else float(self.probability if j == 0 else self.values[j - 1]))
        return SISResult(
            status=status, mask=mask.view(self.grid), confidence=conf, size=len(kept), threshold=tau,
            target=self.target, predicted=self.predicted, probability=self.probability, empty_probability=fe,
            order=list(self.order), values=list(self.values), indices=kept[::-1], features=self.features,
            grid=self.grid, mask_name=self.mask_name, method=self.method, evaluations=self.evaluations,
            gradient_passes=self.gradient_passes, seconds=self.seconds, image=self.image,
            mask_image=self.mask_image,
        )


# -- exact SIS -------------------------------------------------------------------------------


class SIS(Explainer):
    """Exact sufficient input subsets by backward selection (Carter et al., AISTATS 2019; see the
    module docstring). Cost: p (p + 1) / 2 forward evaluations per image, no backward.

    Args:
        model: classifier on [0, 1] images (N, C, H, W) returning logits.
        threshold: tau in (0, 1): a subset is sufficient when f >= tau (no default in the paper:
            0.99 on CIFAR, 0.9 on ImageNet; 0.9 here).
        mask: what removed features become: ``"mean"`` (zero after the model's normalisation),
            ``"zeros"``, ``"blur"``, a number or a tensor ((C, H, W), (C, 1, 1) or (N, C, H, W)).
        features: ``"pixel"`` (a whole pixel, all channels) or ``"patch:K"`` (K x K patches).
        internal_batch_size: most candidate images per forward pass (None: from the memory
            budget, see :func:`_auto_rows`).
    """

    name, title, order = "sis", "SIS", 60
    kind = "subset"
    in_audit = False

    def __init__(self, model: nn.Module, threshold: float = 0.9, mask="mean", features: str = "pixel",
                 internal_batch_size: int | None = None):
        super().__init__(model)
        self.threshold = _check_threshold(threshold)
        self.mask = _check_mask(mask)
        self.patch = parse_features(features)
        self.features = _features_name(self.patch)
        self.internal_batch_size = _check_batch(internal_batch_size)

    # -- the public verbs ----------------------------------------------------------------------

    def backselect(self, x: torch.Tensor, target: int | None = None) -> BackSelection:
        """The full backward selection of one image (C, H, W) or (1, C, H, W)."""
        xs = self._one(x, "backselect")
        return self._backselect(xs, self._targets(xs, target))[0]

    def backselect_batch(self, xs: torch.Tensor, targets: TargetType = None) -> list[BackSelection]:
        """:meth:`backselect` of each image of ``xs`` (N, C, H, W), all in the same forward passes."""
        x = check_inputs(xs).detach()
        return self._backselect(x, self._targets(x, targets))

    def find(self, x: torch.Tensor, target: int | None = None) -> SISResult:
        """The SIS of one image (C, H, W) or (1, C, H, W) for class ``target`` (None: predicted)."""
        return self.backselect(x, target).sis(self.threshold)

    def find_batch(self, xs: torch.Tensor, targets: TargetType = None) -> list[SISResult]:
        """The SIS of each image of ``xs`` (N, C, H, W): the candidates of all images of a step
        are evaluated together; the subsets are those of :meth:`find` one image at a time."""
        return [b.sis(self.threshold) for b in self.backselect_batch(xs, targets)]

    def collection(self, x: torch.Tensor, target: int | None = None,
                   max_sets: int | None = None) -> list[SISResult]:
        """All disjoint SISes of one image: mask the SIS found, repeat on the rest while
        f(rest) >= threshold (at most ``max_sets``). When the image has no SIS the list holds the
        one result saying why."""
        if max_sets is not None and (isinstance(max_sets, bool) or not isinstance(max_sets, int) or max_sets < 1):
            raise TrustVisionError(f"max_sets must be a positive integer or None, got {max_sets!r}")
        xs = self._one(x, "collection")
        t = self._targets(xs, target)
        p = math.ceil(xs.shape[-2] / self.patch) * math.ceil(xs.shape[-1] / self.patch)
        excluded = torch.zeros(1, p, dtype=torch.bool, device=xs.device)
        out: list[SISResult] = []
        while max_sets is None or len(out) < max_sets:
            res = self._backselect(xs, t, excluded)[0].sis(self.threshold)
            if not res.ok:
                if not out:
                    out.append(res)
                break
            out.append(res)
            excluded |= res.mask.flatten().to(xs.device)
            if bool(excluded.all()):
                break
        return out

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        threshold: float | None = None,
        mask=None,
        features: str | None = None,
    ) -> list[SISResult]:
        """One :class:`SISResult` per image of ``inputs`` (N, C, H, W) in [0, 1] (:meth:`find_batch`).

        ``seed`` is unused (exact SIS is deterministic); ``internal_batch_size``, ``threshold``,
        ``mask`` and ``features`` override the constructor's for this call.
        """
        return self._with(threshold=threshold, mask=mask, features=features,
                          internal_batch_size=internal_batch_size).find_batch(inputs, target)

    # -- the work ------------------------------------------------------------------------------

    def _with(self, **kw) -> "SIS":
        if all(v is None for v in kw.values()):
            return self
        other = copy.copy(self)
        if kw.get("threshold") is not None:
            other.threshold = _check_threshold(kw["threshold"])
        if kw.get("mask") is not None:
            other.mask = _check_mask(kw["mask"])
        if kw.get("features") is not None:
            other.patch = parse_features(kw["features"])
            other.features = _features_name(other.patch)
        for key in ("internal_batch_size", "k", "noise", "autocast"):
            if kw.get(key) is not None:
                setattr(other, key, kw[key])
        other.internal_batch_size = _check_batch(other.internal_batch_size)
        return other

    def _one(self, x: torch.Tensor, verb: str) -> torch.Tensor:
        xs = check_inputs(x).detach()
        if xs.shape[0] != 1:
            raise TrustVisionError(f"{type(self).__name__}.{verb} takes one image, got a batch of {xs.shape[0]}; "
                                   f"use find_batch (or attribute) for a batch")
        return xs

    def _targets(self, x: torch.Tensor, target: TargetType) -> torch.Tensor:
        with eval_mode(self.model):
            return resolve_target(self.model, x, target)

    @torch.no_grad()
    def _backselect(self, x: torch.Tensor, t: torch.Tensor,
                    excluded: torch.Tensor | None = None) -> list[BackSelection]:
        start = time.perf_counter()
        n, c, h, w = x.shape
        feats = _Features.build(self.patch, h, w, x.device)
        p, hw = feats.count, h * w
        rows = self.internal_batch_size or _auto_rows(c * hw * x.element_size(), x.device)
        with eval_mode(self.model):
            base = mask_images(self.model, x, self.mask)
            remaining = torch.ones(n, p, dtype=torch.bool, device=x.device)
            cur = x.clone()
            if excluded is not None:
                remaining &= ~excluded
                cur = torch.where(feats.pixels(excluded).unsqueeze(1), base, cur)
            out = _logits(self.model, cur)
            predicted = self.model(x).argmax(1) if excluded is not None else out.argmax(1)
            prob0 = torch.softmax(out, 1).gather(1, t.view(-1, 1)).squeeze(1).double()
            fmap = feats.fmap.reshape(1, 1, hw)
            cur_f, base_f = cur.view(n, c, hw), base.view(n, c, hw)
            if n == 1:
                orders, values = self._select_one(cur_f, base_f, remaining[0], fmap, int(t[0]), rows, (c, h, w))
            else:
                orders, values = self._select_batch(cur_f, base_f, remaining, fmap, t, rows, (c, h, w))
        seconds = (time.perf_counter() - start) / n
        ex = excluded.cpu() if excluded is not None else None
        return [BackSelection(
            target=int(t[i]), predicted=int(predicted[i]), probability=float(prob0[i]),
            order=orders[i], values=values[i],
            features=self.features, grid=feats.grid, mask_name=_mask_name(self.mask),
            excluded=ex[i].nonzero().flatten().tolist() if ex is not None else [], method=self.name,
            evaluations=len(orders[i]) * (len(orders[i]) + 1) // 2 + 1, seconds=seconds, image=x[i].cpu(),
            mask_image=base[i].cpu(),
        ) for i in range(n)]

    def _select_batch(self, cur_f, base_f, remaining, fmap, t, rows, shape):
        """Backward selection of several images in the same passes: each step scores every
        remaining (image, feature) candidate (the current image with that feature masked, built by
        one comparison against the feature map: exact copies of the pixels), then every image
        still selecting removes its best candidate (ties to the lowest feature index: argmax keeps
        the first maximum of a row, features ascending). Returns per image the order and values."""
        n, p = remaining.shape
        c, h, w = shape
        dense = torch.empty((n, p), dtype=torch.float64, device=cur_f.device)
        chosen_steps, best_steps, active_steps = [], [], []
        while True:
            flat = remaining.view(-1).nonzero().squeeze(1)  # image-major, features ascending
            m = flat.shape[0]
            if m == 0:
                break
            img, feat = flat // p, flat % p
            vals = torch.empty(m, dtype=torch.float64, device=cur_f.device)
            for sl in chunks(m, rows):
                sel, i = fmap == feat[sl].view(-1, 1, 1), img[sl]  # (r, 1, HW): the pixels of its feature
                cand = torch.where(sel, base_f.index_select(0, i), cur_f.index_select(0, i))
                vals[sl] = _prob(self.model, cand.view(-1, c, h, w), t[i])
            dense.fill_(-math.inf).view(-1).scatter_(0, flat, vals)
            chosen = dense.argmax(1)
            chosen_steps.append(chosen)
            best_steps.append(dense.gather(1, chosen.view(-1, 1)).squeeze(1))
            active_steps.append(remaining.any(1))
            # (an image with nothing left "chooses" feature 0, already masked: no change)
            remaining.scatter_(1, chosen.view(-1, 1), False)
            cur_f = torch.where(fmap == chosen.view(-1, 1, 1), base_f, cur_f)
        if not chosen_steps:
            return [[] for _ in range(n)], [[] for _ in range(n)]
        # an image's steps are the first ones (it stops when nothing is left)
        counts = torch.stack(active_steps, 1).sum(1).tolist()
        order, values = torch.stack(chosen_steps, 1).cpu().tolist(), torch.stack(best_steps, 1).cpu().tolist()
        return [order[i][: counts[i]] for i in range(n)], [values[i][: counts[i]] for i in range(n)]

    def _select_one(self, cur_f, base_f, remaining, fmap, t: int, rows, shape):
        """:meth:`_select_batch` of one image, with fewer small operations per step (one image
        makes many small passes, and on a CPU every small kernel between two passes costs several
        times its own time: the per-step work is what separates it from the model's own speed).
        Once every candidate fits one pass they are kept as one batch: a step drops the chosen
        row and copies the chosen feature's baseline pixels into the others (two kernels). The
        same order and values, exactly."""
        c, h, w = shape
        left = remaining.nonzero().squeeze(1)  # the features still in, ascending
        names = left.tolist()
        order: list[int] = []
        best: list[torch.Tensor] = []

        def score(features: torch.Tensor) -> torch.Tensor:  # f of the current image with each feature masked
            cand = torch.where(fmap == features.view(-1, 1, 1), base_f, cur_f)
            return torch.softmax(_logits(self.model, cand.view(-1, c, h, w)), 1)[:, t]

        while len(names) > rows:  # several passes per step
            prob = torch.cat([score(left[sl]) for sl in chunks(len(names), rows)])
            top, j = prob.max(0)  # the first maximum: ties to the lowest feature index
            j = int(j)
            order.append(names.pop(j))
            best.append(top)
            left = torch.cat((left[:j], left[j + 1:]))
            cur_f = torch.where(fmap == order[-1], base_f, cur_f)
        if names:
            k, gw = self.patch, math.ceil(w / self.patch)
            cand = torch.where(fmap == left.view(-1, 1, 1), base_f, cur_f).view(-1, c, h, w)
            base4 = base_f.view(1, c, h, w)
            while True:
                top, j = torch.softmax(_logits(self.model, cand), 1)[:, t].max(0)  # the first maximum
                j = int(j)
                f = names.pop(j)
                order.append(f)
                best.append(top)
                if not names:
                    break
                cand = torch.cat((cand[:j], cand[j + 1:]))
                r0, c0 = (f // gw) * k, (f % gw) * k  # the feature's patch (clipped at the border)
                cand[:, :, r0:r0 + k, c0:c0 + k] = base4[:, :, r0:r0 + k, c0:c0 + k]
        return [order], [torch.stack(best).tolist() if best else []]  # float32 -> float64: exact


# -- Batched Gradient SIS ------------------------------------------------------------------


def _content_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from ``seed`` and the image's bytes (the same image gets the same noise
    whatever batch it is in)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(str(tuple(image.shape)).encode())
    h.update(image.detach().float().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class BatchedGradientSIS(SIS):
    """Batched Gradient SIS (Carter et al., NeurIPS 2021; see the module docstring): ceil(p / k)
    forward + backward passes per batch, the k features with the largest gradient masked per pass.

    Args:
        threshold, mask, features, internal_batch_size: as for :class:`SIS` (``internal_batch_size``:
            most images per pass, None = the whole batch).
        k: features masked per iteration (None: ceil(p / 100), i.e. 100 iterations; the paper's
            k = 100 at 299 px).
        noise: variance of the Gaussian noise added to the gradient (1e-12, the reference's),
            drawn per image from ``seed`` and the image's content.
        seed: seed of the noise of :meth:`find` (``attribute`` takes its own ``seed``).
        autocast: run the model's passes (the gradient passes, the scoring and the bisection's
            forwards) under ``torch.autocast(<the inputs' device type>, torch.bfloat16)``; the
            mask, the gradients, the scores and the order stay float32 / float64 (only the
            model runs in bf16, its logits are cast to float32). The explained class is chosen in
            float32. The order is not the float32 one: each gradient ranks the features nearly
            as in float32 (Spearman 0.998 on the trained digits CNN) but the greedy removal
            amplifies every swap, so on that CNN at one pixel per iteration the orders
            correlate 0.85 on average (median 0.91; ``tests/explain/test_autocast.py``).
            Default False (``--method-kw autocast=true`` on the command line).
    """

    name, title, order = "bgsis", "Batched Gradient SIS", 61
    kind = "subset"
    in_audit = False

    def __init__(self, model: nn.Module, threshold: float = 0.9, k: int | None = None, mask="mean",
                 noise: float = 1e-12, seed: int = 0, features: str = "pixel",
                 internal_batch_size: int | None = None, autocast: bool = False):
        super().__init__(model, threshold=threshold, mask=mask, features=features,
                         internal_batch_size=internal_batch_size)
        self.k = k
        self.noise = noise
        self.seed = int(seed)
        self.autocast = autocast
        self._check()

    def _check(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise TrustVisionError(f"k must be a positive integer (features per iteration) or None, got {self.k!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not self.noise >= 0:
            raise TrustVisionError(f"noise must be a variance >= 0, got {self.noise!r}")
        check_autocast(self.autocast)

    def find(self, xs: torch.Tensor, targets: TargetType = None) -> list[SISResult]:  # type: ignore[override]
        """The SIS of each image of ``xs`` (N, C, H, W) (a single (C, H, W) image: a list of one)."""
        return [b.sis(self.threshold) for b in self.backselect_batch(xs, targets)]

    def find_batch(self, xs: torch.Tensor, targets: TargetType = None) -> list[SISResult]:
        return self.find(xs, targets)

    def backselect(self, xs: torch.Tensor, targets: TargetType = None) -> list[BackSelection]:  # type: ignore[override]
        """The gradient backward selection of each image of ``xs`` (values at the iteration
        boundaries, and where the threshold's bisection evaluated them)."""
        return self.backselect_batch(xs, targets)

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        threshold: float | None = None,
        k: int | None = None,
        mask=None,
        noise: float | None = None,
        features: str | None = None,
        autocast: bool | None = None,
    ) -> list[SISResult]:
        """One :class:`SISResult` per image of ``inputs`` (N, C, H, W) in [0, 1]; ``seed``: the
        noise's; the other keywords override the constructor's for this call (``None``: the
        constructor's; ``autocast=True``: the model's passes in bf16 autocast, see the class).
        """
        other = self._with(threshold=threshold, mask=mask, features=features, k=k, noise=noise,
                           internal_batch_size=internal_batch_size, autocast=autocast)
        if other is self:
            other = copy.copy(self)
        other.seed = int(seed)
        other._check()
        return other.find(inputs, target)

    def collection(self, *args, **kwargs):  # noqa: D102 - not part of BGSIS
        raise TrustVisionError("BatchedGradientSIS has no collection; use SIS(model).collection")

    def backselect_batch(self, xs: torch.Tensor, targets: TargetType = None) -> list[BackSelection]:
        x = check_inputs(xs).detach()
        t = self._targets(x, targets)
        out: list[BackSelection] = []
        for sl in chunks(x.shape[0], self.internal_batch_size):
            out += self._gradient_backselect(x[sl], t[sl])
        return out

    def _gradient_backselect(self, x: torch.Tensor, t: torch.Tensor) -> list[BackSelection]:
        start = time.perf_counter()
        n, c, h, w = x.shape
        feats = _Features.build(self.patch, h, w, x.device)
        p = feats.count
        k = min(p, self.k or math.ceil(p / 100))
        iters = math.ceil(p / k)
        std = math.sqrt(float(self.noise))
        gens = [torch.Generator().manual_seed(_content_seed(self.seed, x[i])) for i in range(n)]
        values = torch.full((n, p), float("nan"), dtype=torch.float64, device=x.device)  # s(j + 1)
        removed = torch.zeros(n, p, dtype=torch.bool, device=x.device)

        def inputs(m: torch.Tensor) -> torch.Tensor:
            mp = (m.view(n, 1, h, w) if self.patch == 1 else feats.pixels(m).unsqueeze(1)).to(x.dtype)
            return torch.lerp(x, base, mp)  # one op; exactly x where mp = 0 and base where mp = 1

        with eval_mode(self.model):
            base = mask_images(self.model, x, self.mask)
            # As few kernels as possible between two passes (on a CPU each costs several times
            # its own time there): f and the picks are kept and written once after the loop.
            pos, fs, tops = 0, [], []
            for it in range(iters):
                m = removed.to(x.dtype).requires_grad_(True)
                logits = _logits(self.model, inputs(m), self.autocast)
                f = torch.softmax(logits, 1).gather(1, t.view(-1, 1)).squeeze(1)
                (grad,) = torch.autograd.grad(f.sum(), m)
                fs.append(f.detach())
                if it == 0:
                    predicted = logits.detach().argmax(1)
                if std > 0:  # drawn in float64 on the CPU: the same numbers on every device
                    z = torch.randn(p, generator=gens[0], dtype=torch.float64).unsqueeze(0) if n == 1 else \
                        torch.stack([torch.randn(p, generator=g, dtype=torch.float64) for g in gens])
                    score = z.to(x.device).mul_(std).add_(grad)  # = grad.double() + std * z, exactly
                else:
                    score = grad.double()
                take = min(k, p - pos)
                top = _largest_first(score.masked_fill_(removed, -math.inf), take)
                tops.append(top)
                removed.scatter_(1, top, True)
                pos += take
            order = torch.cat(tops, 1)
            f_all = torch.stack(fs, 1).double()  # (n, iters): s(0), s(k), s(2k), ...
            prob0 = f_all[:, 0]
            values[:, k - 1 : p - 1 : k] = f_all[:, 1:]  # s(j + 1) after the j-th removal
            with torch.no_grad():
                values[:, p - 1] = _prob(self.model, base, t, self.autocast)
                evals = torch.full((n,), iters + 1, dtype=torch.long)
                # bisect the last block added back to the shortest sufficient suffix found there
                tau = self.threshold
                blocks = torch.cat([prob0[:, None], values[:, k - 1 :: k][:, : iters - 1],
                                    values[:, p - 1 :]], 1)  # s(0), s(k), ..., s(p)
                bounds = torch.tensor([min(i * k, p) for i in range(iters + 1)], device=x.device)
                ok = (prob0 >= tau) & (values[:, p - 1] < tau)
                suff = (blocks >= tau) & ok[:, None]
                last = torch.where(suff, torch.arange(iters + 1, device=x.device), -1).amax(1).clamp_min(0)
                lo = torch.where(ok, bounds[last], 0)
                hi = torch.where(ok, bounds[(last + 1).clamp_max(iters)], 0)
                rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=x.device).expand(n, p))
                while True:
                    act = (hi - lo > 1).nonzero().flatten()
                    if act.numel() == 0:
                        break
                    mid = (lo[act] + hi[act]) // 2
                    keep_from = (rank[act] >= mid[:, None])
                    mp = feats.pixels(~keep_from).unsqueeze(1)
                    fm = _prob(self.model, torch.where(mp, base[act], x[act]), t[act], self.autocast)
                    evals[act.cpu()] += 1
                    values[act, mid - 1] = fm
                    good = fm >= tau
                    lo[act] = torch.where(good, mid, lo[act])
                    hi[act] = torch.where(good, hi[act], mid)
        seconds = (time.perf_counter() - start) / n
        order_l, values_l = order.cpu().tolist(), values.cpu().tolist()
        return [BackSelection(
            target=int(t[i]), predicted=int(predicted[i]), probability=float(prob0[i]), order=order_l[i],
            values=[None if v != v else float(v) for v in values_l[i]], features=self.features, grid=feats.grid,
            mask_name=_mask_name(self.mask), method=self.name, evaluations=int(evals[i]), gradient_passes=iters,
            seconds=seconds, image=x[i].cpu(), mask_image=base[i].cpu(),
        ) for i in range(n)]
