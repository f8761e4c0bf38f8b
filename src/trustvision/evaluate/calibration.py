"""Calibration metrics: ECE, MCE, reliability diagrams and temperature scaling.

Conventions (reference-notes section 7): confidence is the top-1 softmax probability; bins are
``n_bins`` equal-width intervals ``(k/n, (k+1)/n]`` on [0, 1] (a confidence of exactly 0 goes to the
first bin), ``n_bins=15`` by default as in torchmetrics (netcal defaults to 10, so always state the
bin count). Lower ECE/MCE is better.

References:
    Naeini, Cooper, Hauskrecht. Obtaining well calibrated probabilities using Bayesian binning.
    AAAI 2015 (ECE, MCE).
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks. ICML 2017
    (reliability diagrams, temperature scaling).

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.12, 0.88], [0.7, 0.3], [0.45, 0.55]])
    >>> labels = torch.tensor([0, 0, 0, 0])
    >>> round(expected_calibration_error(probs, labels), 4)
    0.4075
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "ReliabilityBins",
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "fit_temperature",
    "reliability_diagram",
]

def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


@dataclass
class ReliabilityBins:
    """Per-bin statistics of top-1 confidence (all lists have length ``n_bins``).

    ``edges`` has ``n_bins + 1`` entries; ``accuracy`` and ``confidence`` are ``None`` for empty
    bins; ``count`` is the number of samples per bin; ``n`` the total.
    """

    n_bins: int
    edges: list[float]
    count: list[int]
    accuracy: list[float | None]
    confidence: list[float | None]
    n: int

    @property
    def gaps(self) -> list[float | None]:
        """``|accuracy - confidence|`` per bin (``None`` for empty bins)."""
        return [None if a is None else abs(a - c) for a, c in zip(self.accuracy, self.confidence)]

    def to_dict(self) -> dict:
        return asdict(self)


def _bin_stats(probs, labels, n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts, summed correctness and summed confidence per bin (float64 tensors of shape (n_bins,))."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    p = _as_tensor(probs)
    y = _as_tensor(labels, torch.long)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, K) and labels (N,); got {tuple(p.shape)} and {tuple(y.shape)}")
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(torch.float64)
    # bin k holds (k/n, (k+1)/n]; ceil(conf*n)-1, clamped so that conf == 0 lands in bin 0.
    idx = (torch.ceil(conf * n_bins) - 1).clamp_(0, n_bins - 1).long()
    count = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return count, acc_sum, conf_sum


def reliability_bins(probs, labels, n_bins: int = 15) -> ReliabilityBins:
    """Bin samples by top-1 confidence and return per-bin accuracy and mean confidence.

    Args:
        probs: (N, K) class probabilities (rows sum to 1).
        labels: (N,) integer labels.
        n_bins: number of equal-width bins on [0, 1].
    """
    count, acc_sum, conf_sum = _bin_stats(probs, labels, n_bins)
    nonempty = count > 0
    acc = torch.where(nonempty, acc_sum / count.clamp_min(1), torch.nan)
    conf = torch.where(nonempty, conf_sum / count.clamp_min(1), torch.nan)
    to_list = lambda t: [None if math.isnan(v) else float(v) for v in t.tolist()]  # noqa: E731
    return ReliabilityBins(
        n_bins=n_bins,
        edges=[k / n_bins for k in range(n_bins + 1)],
        count=[int(c) for c in count.tolist()],
        accuracy=to_list(acc),
        confidence=to_list(conf),
        n=int(count.sum().item()),
    )


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` on top-1 confidence.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) integer labels.
        n_bins: number of equal-width confidence bins (15 by default, torchmetrics convention).

    Returns:
        ECE in [0, 1]; lower is better; 0 for a perfectly calibrated model.
    """
    count, acc_sum, conf_sum = _bin_stats(probs, labels, n_bins)
    n = count.sum()
    if n == 0:
        raise ValueError("cannot compute a calibration error on zero samples")
    return float((acc_sum - conf_sum).abs().sum() / n)


def maximum_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Maximum calibration error ``max_b |acc(B_b) - conf(B_b)|`` over non-empty bins (lower is better)."""
    count, acc_sum, conf_sum = _bin_stats(probs, labels, n_bins)
    nonempty = count > 0
    if not bool(nonempty.any()):
        raise ValueError("cannot compute a calibration error on zero samples")
    gaps = (acc_sum[nonempty] - conf_sum[nonempty]).abs() / count[nonempty]
    return float(gaps.max())


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` (natural log; lower is better)."""
    z = _as_tensor(logits)
    y = _as_tensor(labels, torch.long)
    return float(torch.nn.functional.cross_entropy(z / temperature, y))


def fit_temperature(
    logits,
    labels,
    *,
    t_min: float = 0.01,
    t_max: float = 100.0,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> float:
    """Fit the temperature ``T`` of temperature scaling by minimising the NLL (Guo et al. 2017).

    With ``beta = 1/T`` the NLL ``mean(logsumexp(beta * z) - beta * z_y)`` is convex in ``beta``
    (its second derivative is the mean variance of the logits under ``softmax(beta * z)``), so the
    minimum is the unique root of the first derivative ``mean(E_p[z] - z_y)``. We find it with
    Newton's method safeguarded by bisection on ``[1/t_max, 1/t_min]``: no learning rate, a handful
    of passes over the logits. If the root lies outside the interval (e.g. perfectly separable
    validation logits, where the NLL keeps falling as ``T -> 0``) the nearest bound is returned.

    Args:
        logits: (N, K) logits on a held-out (validation) split.
        labels: (N,) integer labels.
        t_min, t_max: search interval for ``T``.
        tol: relative tolerance on ``beta``.

    Returns:
        The fitted temperature (a float > 0); calibrated probabilities are ``softmax(logits / T)``.
    """
    z = _as_tensor(logits)
    y = _as_tensor(labels, torch.long)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"logits must be (N, K) with N > 0 and labels (N,); got {tuple(z.shape)}, {tuple(y.shape)}")
    z_true = z.gather(1, y[:, None]).squeeze(1)

    def derivatives(beta: float) -> tuple[float, float]:
        p = torch.softmax(beta * z, dim=1)
        mean_z = (p * z).sum(1)
        grad = float((mean_z - z_true).mean())
        hess = float(((p * z * z).sum(1) - mean_z**2).mean())
        return grad, hess

    lo, hi = 1.0 / t_max, 1.0 / t_min
    if derivatives(lo)[0] >= 0:  # NLL increasing on the whole interval
        return float(t_max)
    if derivatives(hi)[0] <= 0:  # NLL decreasing on the whole interval
        return float(t_min)
    beta = min(max(1.0, lo), hi)
    for _ in range(max_iter):
        grad, hess = derivatives(beta)
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / hess if hess > 0 else math.nan
        if not lo < step < hi:
            step = math.sqrt(lo * hi)  # bisection in log space
        if abs(step - beta) <= tol * beta or hi - lo <= tol * lo:
            beta = step
            break
        beta = step
    return float(1.0 / beta)


def reliability_diagram(
    probs,
    labels,
    n_bins: int = 15,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Reliability diagram: per-bin accuracy (bars) against confidence, with the diagonal.

    Bars show the accuracy of each confidence bin, the red hatched part the gap to the bin's mean
    confidence, the number above each bar how many images fall in that bin; the legend states the
    ECE, MCE and the bin count. Draws on ``ax`` when given
    (returns its figure), otherwise on a new 4x4-inch figure (no pyplot global state).
    """
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    mce = maximum_calibration_error(probs, labels, n_bins)
    if ax is None:
        fig = Figure(figsize=(4.2, 4.2), dpi=100, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    width = 1.0 / n_bins
    centers = [(bins.edges[k] + bins.edges[k + 1]) / 2 for k in range(n_bins)]
    acc = [0.0 if a is None else a for a in bins.accuracy]
    conf = [c if c is not None else centers[k] for k, c in enumerate(bins.confidence)]
    ax.bar(centers, acc, width=width, edgecolor="#1f3b57", color="#4c8bc9", label="accuracy")
    gap_bottom = [min(a, c) if n else 0.0 for a, c, n in zip(acc, conf, bins.count)]
    gap_height = [abs(a - c) if n else 0.0 for a, c, n in zip(acc, conf, bins.count)]
    ax.bar(centers, gap_height, bottom=gap_bottom, width=width, color="#d9534f", alpha=0.35,
           edgecolor="#b52b27", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#555555", linewidth=1, label="perfect calibration")
    for x, a, c, n in zip(centers, acc, conf, bins.count):  # images per bin: a big gap in a tiny bin is noise
        if n:
            ax.text(x, min(max(a, c) + 0.015, 0.97), str(int(n)), ha="center", va="bottom",
                    fontsize=6 if n_bins > 12 else 7, color="#333333")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1)")
    ax.set_ylabel("accuracy")
    ax.set_title(str(title or "Reliability diagram").replace("$", r"\$"))
    ax.legend(loc="upper left", fontsize=8, title=f"ECE {ece:.4f}, MCE {mce:.4f}\n{n_bins} equal-width bins;"
                                                  f"\nnumbers: images per bin ({int(sum(bins.count))} in all)",
              title_fontsize=8)
    return fig
