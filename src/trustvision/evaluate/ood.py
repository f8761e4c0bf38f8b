"""Out-of-distribution detection: scores, metrics and OOD test sets built from embedded data.

Convention (stated in every report): **higher score = more in-distribution**, and the
in-distribution samples are the **positive** class for AUROC, AUPR (= AUPR-In) and FPR at 95% TPR.
(OpenOOD uses the opposite convention.)

Scores:
    - ``log_px``: the generative classifier's log-likelihood log p(x) (a poor detector alone:
      Nalisnick et al. 2019).
    - :class:`TypicalityTest`: the two-tailed typicality test on ``L_X = -log p(x) / D``; x is
      flagged when ``|L_X(x) - mean_train|`` exceeds the training distribution's
      ``1 - alpha`` quantile (Mackowiak et al. CVPR 2021). Score = ``-|L_X - mean_train| / std``.
    - ``complexity_corrected``: ``-(S(x))`` with ``S(x) = -log2 p(x) - L(x)``, L = PNG length in
      bits of the 8-bit image (Serra et al. ICLR 2020).
    - ``max_softmax``: the maximum class probability (Hendrycks & Gimpel 2017), for any classifier.
    - The post-hoc detectors of :mod:`trustvision.evaluate.detectors` (``list_detectors()``:
      max-softmax, max-logit, energy, Mahalanobis, KNN, ViM), fitted on the training split where
      they need it, same convention.

Example:
    >>> import torch
    >>> m = ood_metrics(torch.tensor([3.0, 2.0, 1.5]), torch.tensor([1.0, 0.0]))
    >>> m.auroc, m.fpr_at_95_tpr
    (1.0, 0.0)
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trustvision.evaluate.detectors import Detector, get_detector, list_detectors, model_outputs

__all__ = [
    "OODMetrics",
    "OODResult",
    "ood_metrics",
    "auroc",
    "aupr",
    "fpr_at_tpr",
    "TypicalityTest",
    "log_px_score",
    "max_softmax_score",
    "png_bits",
    "complexity_corrected_score",
    "build_ood_sets",
    "evaluate_ood",
    "OOD_SETS",
    "list_detectors",
    "get_detector",
    "split_labels",
    "Detector",
]

OOD_SETS = ("faces", "textures", "uniform", "gaussian", "rotated", "inverted")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy().ravel()
    return np.asarray(x, dtype=np.float64).ravel()


def _check(s_in: np.ndarray, s_out: np.ndarray) -> None:
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    if not (np.isfinite(s_in).all() and np.isfinite(s_out).all()):
        raise ValueError("OOD scores must be finite")


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve, ID positive: P(s_in > s_out) + 0.5 P(s_in == s_out)."""
    s_in, s_out = _np(scores_in), _np(scores_out)
    _check(s_in, s_out)
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([s_in, s_out]), method="average")  # ties share their mean rank
    n_in, n_out = len(s_in), len(s_out)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def aupr(scores_in, scores_out) -> float:
    """Average precision with ID as positive (AUPR-In): sum_k (R_k - R_{k-1}) P_k over thresholds."""
    s_in, s_out = _np(scores_in), _np(scores_out)
    _check(s_in, s_out)
    scores = np.concatenate([s_in, s_out])
    pos = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    order = np.argsort(-scores, kind="mergesort")
    scores, pos = scores[order], pos[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # end index of each tie group
    tp = np.cumsum(pos)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / len(s_in)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the highest threshold that accepts >= ``tpr`` of ID."""
    s_in, s_out = _np(scores_in), _np(scores_out)
    _check(s_in, s_out)
    k = int(math.ceil(tpr * len(s_in)))
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


@dataclass
class OODMetrics:
    """AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive, scores negated) and FPR at 95% TPR
    (higher score = more ID)."""

    auroc: float
    aupr_in: float
    fpr_at_95_tpr: float
    n_in: int
    n_out: int
    aupr_out: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def ood_metrics(scores_in, scores_out) -> OODMetrics:
    """All the metrics for one detector and one OOD set (AUPR-Out: the OOD images as the positive
    class, scored by the negated scores)."""
    s_in, s_out = _np(scores_in), _np(scores_out)
    return OODMetrics(auroc(s_in, s_out), aupr(s_in, s_out), fpr_at_tpr(s_in, s_out, 0.95), len(s_in),
                      len(s_out), aupr_out=aupr(-s_out, -s_in))


# -- scores -------------------------------------------------------------------------------------

def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x, batch_size: int,
             device) -> torch.Tensor:
    """``fn`` over batches of ``x`` (images or a dataset, streamed), concatenated (float64, CPU)."""
    from trustvision.data.loading import image_batches

    out = []
    with torch.no_grad():
        for xb in image_batches(x, batch_size, device=device):
            out.append(fn(xb.to(device)).detach().cpu().double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def split_labels(ds) -> torch.Tensor:
    """Labels (N,) of a dataset without decoding its images when it records them (``labels``,
    also through a subset's ``parent``); otherwise read item by item."""
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels).long().flatten()
    parent, idx = getattr(ds, "parent", None), getattr(ds, "indices", None)
    if parent is not None and idx is not None and getattr(parent, "labels", None) is not None:
        return torch.as_tensor(parent.labels).long().flatten()[torch.as_tensor(idx).long()]
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def _dim(x) -> int:
    """Values per image of images (N, C, H, W) or of a dataset's first item."""
    first = x[0]
    return (first[0] if isinstance(first, (list, tuple)) else first).numel()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def log_px_score(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """log p(x) in nats (N,) from a generative classifier (higher = more ID)."""
    return _batched(model.log_px, x, batch_size, _device(model))


def max_softmax_score(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Maximum softmax probability (N,) of any classifier returning logits."""
    return _batched(lambda t: model(t).softmax(1).amax(1), x, batch_size, _device(model))


class TypicalityTest:
    """Two-tailed typicality test on ``L_X = -log p(x) / D`` (nats per dimension).

    ``fit`` records the mean, std and the ``1 - alpha`` quantile of ``|L_X - mean|`` on
    in-distribution (training) images; ``score`` is ``-|L_X - mean| / std`` (higher = more
    typical) and ``is_ood`` flags deviations beyond the quantile, in either direction.
    """

    def __init__(self, model, alpha: float = 0.05, batch_size: int = 256):
        self.model = model
        self.alpha = float(alpha)
        self.batch_size = batch_size
        self.mean: float | None = None
        self.std: float | None = None
        self.threshold: float | None = None

    def l_x(self, x) -> torch.Tensor:
        return -log_px_score(self.model, x, self.batch_size) / _dim(x)

    def fit(self, x_train: torch.Tensor) -> "TypicalityTest":
        lx = self.l_x(x_train)
        self.mean = float(lx.mean())
        self.std = float(lx.std()) if len(lx) > 1 else 1.0
        self.std = self.std or 1.0
        self.threshold = float(torch.quantile((lx - self.mean).abs(), 1.0 - self.alpha))
        return self

    def _require_fit(self) -> None:
        if self.mean is None:
            raise RuntimeError("call TypicalityTest.fit(training images) first")

    def score(self, x: torch.Tensor, l_x: torch.Tensor | None = None) -> torch.Tensor:
        """``-|L_X - mean| / std`` of images ``x`` (or of their ``l_x`` when already computed)."""
        self._require_fit()
        return -((self.l_x(x) if l_x is None else l_x) - self.mean).abs() / self.std

    def is_ood(self, x: torch.Tensor, l_x: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean (N,): True where the test rejects x at level ``alpha`` (``l_x``: as in :meth:`score`)."""
        self._require_fit()
        return ((self.l_x(x) if l_x is None else l_x) - self.mean).abs() > self.threshold


def png_bits(x: torch.Tensor) -> torch.Tensor:
    """PNG-compressed length in bits (N,) of images (N, C, H, W) in [0, 1] quantised to 8 bits."""
    from PIL import Image

    arr = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = []
    for img in arr:
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=9)
        out.append(8.0 * len(buf.getvalue()))
    return torch.tensor(out, dtype=torch.float64)


def complexity_corrected_score(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``L(x) + log2 p(x)`` in bits: minus Serra et al.'s S(x) (higher = more ID).

    ``-log2 p(x)`` is the model's code length of the 8-bit image (bits/dim times D).
    """
    dim = _dim(x)
    return _batched(lambda xb: png_bits(xb) - model.bits_per_dim(xb).double().cpu() * dim, x, batch_size,
                    _device(model))


# -- OOD test sets ------------------------------------------------------------------------------

def _convert(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True)
        if channels != 1:
            x = x.expand(-1, channels, -1, -1)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


def build_ood_sets(id_test, names: Sequence[str] = OOD_SETS, n: int | None = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """OOD images (M, C, H, W) in [0, 1] shaped like the in-distribution set ``id_test``.

    ``faces`` / ``textures``: the embedded test sets converted to the ID channels (grey = channel
    mean, RGB = repeated grey) and resized (antialiased bilinear); ``uniform``: U(0, 1) pixels;
    ``gaussian``: N(ID mean, ID std) per pixel, clipped; ``rotated``: ID test rotated by 90
    degrees (180 for non-square images); ``inverted``: ``1 - x``. A set equal to the ID set's own
    name is skipped. ``n`` caps each set's size (default: the ID test size).
    """
    from trustvision import data
    from trustvision.errors import TrustVisionError

    ds = data.as_image_dataset(id_test)
    if n is not None and int(n) < len(ds):
        # a seeded sample of n test images (of a streamed split, only these are ever decoded)
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed) + 7))[: int(n)]
        ds = ds.subset(pick.sort().values)
    x_id, _ = ds.tensors()
    c, size = x_id.shape[1], tuple(x_id.shape[2:])
    n = len(x_id) if n is None else int(n)
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == getattr(id_test, "name", None):
            continue
        if name in ("faces", "textures"):
            x, _ = data.load(name, split="test").tensors()
            if len(x) > n:  # the same draw as below, before the conversion (large images: memory)
                x = x[torch.randperm(len(x), generator=g)[:n]]
            x = _convert(x, c, size)
        elif name == "uniform":
            x = torch.rand(n, c, *size, generator=g)
        elif name == "gaussian":
            x = (x_id.mean() + x_id.std() * torch.randn(n, c, *size, generator=g)).clamp(0, 1)
        elif name == "rotated":
            x = torch.rot90(x_id, 1, dims=(2, 3)) if size[0] == size[1] else x_id.flip(2, 3)
        elif name == "inverted":
            x = 1.0 - x_id
        else:
            raise TrustVisionError(f"unknown OOD set {name!r}; use some of {', '.join(OOD_SETS)}")
        if len(x) > n:
            x = x[torch.randperm(len(x), generator=g)[:n]]
        out[name] = x.float().contiguous()
    return out


# -- the whole evaluation -----------------------------------------------------------------------

@dataclass
class OODResult:
    """One row per (detector, OOD set); ``convention`` states the score/positive convention."""

    rows: list[dict] = field(default_factory=list)
    convention: str = ("higher score = more in-distribution; in-distribution is the positive "
                       "class for AUROC, AUPR-In and FPR@95%TPR")
    typicality: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # detector -> why it did not run

    def best(self, ood_set: str, detectors: Sequence[str] | None = None) -> dict:
        """The row of the detector with the highest AUROC on ``ood_set`` (among ``detectors``;
        the compared model's rows never count); ties go to the detector listed first."""
        rows = [r for r in self.rows if r["ood_set"] == ood_set and not r["detector"].endswith("(compare)")
                and (detectors is None or r["detector"] in detectors)]
        if not rows:
            raise KeyError(ood_set)
        return max(rows, key=lambda r: r["auroc"])

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, detector: str, ood_set: str) -> dict:
        for r in self.rows:
            if r["detector"] == detector and r["ood_set"] == ood_set:
                return r
        raise KeyError((detector, ood_set))


def evaluate_ood(model, x_train: torch.Tensor, x_test: torch.Tensor,
                 ood_sets: dict[str, torch.Tensor], *, y_train: torch.Tensor | None = None,
                 detectors: Sequence[str] | None = None, compare=None, alpha: float = 0.05,
                 batch_size: int = 256) -> OODResult:
    """Score ID test and every OOD set with each applicable detector and compute the metrics.

    Every model gets the post-hoc detectors of :func:`list_detectors` that apply to it
    (``detectors``: a subset of their names; the default is all), fitted on ``x_train`` /
    ``y_train`` where they need fitting (without ``y_train`` only those that need no fitting run);
    a detector that cannot be fitted to this model (e.g. ViM on a head that is not affine) is
    left out with its reason in ``OODResult.skipped``. Generative classifiers
    (:func:`trustvision.models.is_generative`) also get ``log_px``, ``typicality`` (threshold from
    ``x_train``) and ``complexity``; ``compare`` (e.g. the feed-forward twin) adds
    ``max-softmax (compare)``.
    """
    from trustvision.errors import TrustVisionError
    from trustvision.models import is_generative

    result = OODResult()
    sets = {"__test__": x_test, **ood_sets}
    # the generative scores: log p(x) is computed once per image set, typicality reads it
    generative: dict[str, Callable[[str, Any], torch.Tensor]] = {}
    if is_generative(model):
        test = TypicalityTest(model, alpha, batch_size).fit(x_train)
        result.typicality = {"mean_l_x": test.mean, "std_l_x": test.std,
                             "threshold": test.threshold, "alpha": alpha}
        log_px: dict[str, torch.Tensor] = {}

        def lpx(key: str, x) -> torch.Tensor:
            if key not in log_px:
                log_px[key] = log_px_score(model, x, batch_size)
            return log_px[key]

        generative["log_px"] = lpx
        generative["typicality"] = lambda key, x: test.score(x, -lpx(key, x) / _dim(x))
        generative["complexity"] = lambda key, x: complexity_corrected_score(model, x, batch_size)
        result.typicality["rejected_fraction"] = {
            ("id_test" if key == "__test__" else key): float(test.is_ood(x, -lpx(key, x) / _dim(x)).float().mean())
            for key, x in sets.items()}
    applicable = list_detectors(model)
    names = applicable if detectors is None else [d for d in detectors if d in applicable]
    # the model's outputs (logits, and features when a detector needs them) are computed once per
    # image set and shared by every post-hoc detector: one streamed pass over each split
    feats_needed = any(get_detector(n).needs_features for n in names)
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def outs(key: str, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key not in outputs:
            outputs[key] = model_outputs(model, x, batch_size, features=feats_needed)
        return outputs[key]

    y_fit = None if y_train is None else torch.as_tensor(y_train).long().cpu()
    posthoc: dict[str, Any] = {}
    for name in names:
        cls = get_detector(name)
        if cls.needs_fit and y_fit is None:
            result.skipped[name] = "needs the training labels"
            continue
        try:
            det = cls()
            det._check(model)
            if cls.needs_fit:
                logits, feats = outs("__train__", x_train)
                det.fit_outputs(logits, feats if cls.needs_features else None, y_fit, model)
                det.fitted = True
        except TrustVisionError as exc:
            result.skipped[name] = str(exc)
            continue
        posthoc[name] = det
    outputs.pop("__train__", None)
    if any(d.needs_unnormalised_logits for d in posthoc.values()):
        logits, _ = outs("__test__", x_test)
        if len(logits) and bool((torch.logsumexp(logits, 1).abs() < 1e-4).all()):
            for name in [n for n, d in posthoc.items() if d.needs_unnormalised_logits]:
                result.skipped[name] = ("the model's outputs are log-probabilities (logsumexp = 0): energy is 0 "
                                        "for every image and max-logit is the log of max-softmax")
                del posthoc[name]
    extra = {"max-softmax (compare)": lambda key, x: max_softmax_score(compare, x, batch_size)} if compare else {}
    scores: dict[str, dict[str, torch.Tensor]] = {k: {} for k in sets}
    for key, x in sets.items():
        for det_name, det in posthoc.items():
            logits, feats = outs(key, x)
            scores[key][det_name] = det.score_outputs(logits, feats if det.needs_features else None)
        outputs.pop(key, None)
        for det_name, fn in {**generative, **extra}.items():
            scores[key][det_name] = fn(key, x)
    # rows: the generative scores, then the post-hoc detectors, then the compared model
    for det_name in [*generative, *posthoc, *extra]:
        s_in = scores["__test__"][det_name]
        for name in ood_sets:
            m = ood_metrics(s_in, scores[name][det_name])
            result.rows.append({"detector": det_name, "ood_set": name, **m.to_dict()})
    return result
