"""Drawing heatmaps: overlays on the image and a side-by-side grid of methods.

Every function returns a matplotlib Figure (``Figure`` objects, no pyplot state), so callers can
save PNG or SVG or embed them in a report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the package
    from matplotlib.figure import Figure

__all__ = ["image_to_numpy", "normalise_heatmap", "overlay_figure", "heatmap_grid"]


def image_to_numpy(img: torch.Tensor):
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) numpy for imshow."""
    a = img.detach().float().cpu().clamp(0, 1)
    return a[0].numpy() if a.shape[0] == 1 else a[:3].permute(1, 2, 0).numpy()


def normalise_heatmap(h: torch.Tensor) -> torch.Tensor:
    """(1, H, W) or (H, W) heatmap -> (H, W) in [0, 1]; negative values count as 0."""
    h = h.detach().float().cpu().reshape(h.shape[-2:]).clamp_min(0)
    top = float(h.max())
    return h / top if top > 0 else h


#: perceptually uniform colour map of the heatmaps (importance 0 = dark, 1 = bright)
CMAP = "inferno"
HEAT_ALPHA = 0.6


def _draw(ax, image: torch.Tensor, heat: torch.Tensor | None, title: str):
    gray = image.shape[0] == 1
    ax.imshow(image_to_numpy(image), cmap="gray" if gray else None, vmin=0, vmax=1,
              interpolation="nearest")
    mappable = None
    if heat is not None:
        mappable = ax.imshow(normalise_heatmap(heat).numpy(), cmap=CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1,
                             interpolation="nearest" if max(heat.shape[-2:]) <= 32 else "bilinear")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return mappable


def _colorbar(fig, mappable, axes) -> None:
    cb = fig.colorbar(mappable, ax=axes, shrink=0.8, fraction=0.04, pad=0.02)
    cb.set_label("importance (each heatmap / its max)", fontsize=7)
    cb.ax.tick_params(labelsize=6)


def overlay_figure(image: torch.Tensor, heatmap: torch.Tensor, title: str = "") -> "Figure":
    """The image and the image with the heatmap overlaid (inferno, a perceptually uniform colour
    map), side by side, with a colour bar."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 2.3), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    _draw(ax1, image, None, "image")
    m = _draw(ax2, image, heatmap, title or "heatmap")
    _colorbar(fig, m, [ax1, ax2])
    return fig


def heatmap_grid(
    images: torch.Tensor,
    heatmaps: Mapping[str, torch.Tensor],
    titles: Sequence[str] | None = None,
) -> "Figure":
    """Rows = images (N, C, H, W), columns = the image then one heatmap (N, 1, H, W) per method
    (column titles = the keys of ``heatmaps``), one shared colour bar."""
    from matplotlib.figure import Figure

    n = images.shape[0]
    cols = 1 + len(heatmaps)
    fig = Figure(figsize=(1.6 * cols + 0.8, 1.6 * n + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    mappable = None
    for i in range(n):
        _draw(axes[i][0], images[i], None, titles[i] if titles else "")
        for j, (name, h) in enumerate(heatmaps.items()):
            mappable = _draw(axes[i][j + 1], images[i], h[i], name if i == 0 else "") or mappable
    if mappable is not None:
        _colorbar(fig, mappable, axes)
    return fig


def save_png(figure: "Figure", path) -> list:
    """Write ``figure`` as ``<path>.png`` (a ``.png`` / ``.svg`` / ``.json`` suffix of ``path`` is
    replaced), creating the folder; returns ``[the path written]`` (what the results' ``render``
    methods return)."""
    from pathlib import Path

    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".svg", ".json") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = stem.with_name(stem.name + ".png")
    figure.savefig(out, dpi=120)
    return [out]
