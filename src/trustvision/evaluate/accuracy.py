"""Accuracy metrics: top-1 accuracy, per-class accuracy and the confusion matrix (all batched).

Example:
    >>> import torch
    >>> scores = torch.tensor([[2.0, 1.0], [0.1, 0.3], [0.9, 0.2]])
    >>> labels = torch.tensor([0, 0, 1])
    >>> top1_accuracy(scores, labels)
    0.3333333333333333
    >>> confusion_matrix(scores.argmax(1), labels, num_classes=2).tolist()
    [[1, 1], [1, 0]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["top1_accuracy", "per_class_accuracy", "confusion_matrix", "confusion_matrix_figure"]


def _long(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.long)
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def _preds(scores_or_preds) -> torch.Tensor:
    t = scores_or_preds if isinstance(scores_or_preds, torch.Tensor) else torch.as_tensor(np.asarray(scores_or_preds))
    return t.detach().cpu().argmax(dim=1) if t.ndim == 2 else t.detach().cpu().long()


def top1_accuracy(scores, labels) -> float:
    """Fraction of samples whose top-1 prediction equals the label (higher is better).

    Args:
        scores: (N, K) logits or probabilities, or (N,) predicted labels.
        labels: (N,) integer labels.
    """
    pred, y = _preds(scores), _long(labels)
    if pred.shape != y.shape or y.numel() == 0:
        raise ValueError(f"need matching non-empty predictions and labels; got {tuple(pred.shape)}, {tuple(y.shape)}")
    return float((pred == y).double().mean())


def confusion_matrix(scores, labels, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class.

    Args:
        scores: (N, K) logits/probabilities or (N,) predicted labels.
        labels: (N,) integer labels in ``range(num_classes)``.
    """
    pred, y = _preds(scores), _long(labels)
    flat = y * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(scores, labels, num_classes: int) -> list[float | None]:
    """Recall of each class (correct / support); ``None`` for classes absent from ``labels``."""
    cm = confusion_matrix(scores, labels, num_classes).double()
    support = cm.sum(dim=1)
    diag = cm.diagonal()
    return [None if s == 0 else float(d / s) for d, s in zip(diag.tolist(), support.tolist())]


def _plain(text) -> str:
    """Escape ``$`` so user strings are never parsed as matplotlib mathtext."""
    return str(text).replace("$", r"\$")


def confusion_matrix_figure(
    cm,
    classes: Sequence[str],
    *,
    normalize: bool = True,
    title: str | None = None,
    max_labels: int = 30,
) -> Figure:
    """Heat map of a confusion matrix (rows true, columns predicted), row-normalised by default.

    Cells are annotated with the value when there are at most 15 classes; tick labels are shown
    when there are at most ``max_labels`` classes.
    """
    m = np.asarray(cm.tolist() if isinstance(cm, torch.Tensor) else cm, dtype=float)
    k = m.shape[0]
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = min(3.0 + 0.35 * k, 9.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    if k <= max_labels:
        names = [_plain(c if len(str(c)) <= 14 else str(c)[:13] + "…") for c in classes]
        ax.set_xticks(range(k), names, rotation=45 if k > 5 else 0, ha="right" if k > 5 else "center", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                if v == 0:
                    continue
                txt = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * (m.max() or 1) else "#1f2d3d")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(_plain(title or "Confusion matrix"))
    return fig
