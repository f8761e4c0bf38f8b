"""Explanations native to a generative classifier (IB-INN): counterfactuals, likelihood-ratio
gradients and class-conditional samples.

- :class:`LatentCounterfactual`: move ``z = f(x)`` from its class mean towards a target class
  mean (``z_t = z + t * (mu_target - mu_source)``, ``t`` in [0, 1]) and invert every step: the image
  sequence shows what must change for the model to see the target class; the last image minus
  ``x`` is the pixel difference.
- :class:`LikelihoodRatioGradient`: ``d/dx [log p(x|y1) - log p(x|y2)]`` as a heatmap (the
  registered ``likelihood-ratio`` :class:`~trustvision.explain.Explainer`, ``requires =
  ("generative",)``: ``attribute(inputs, target) -> (N, 1, H, W)``, the channel-summed gradient;
  ``reduce=None`` keeps (N, C, H, W)). ``y2`` defaults to the most likely other class.
- :func:`sample_grid`: ``n`` class-conditional samples per class at a given temperature.

Reference: Mackowiak et al., "Generative Classifiers as a Basis for Trustworthy Image
Classification", CVPR 2021 (Sec. 4: explanations of GCs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trustvision.errors import TrustVisionError
from trustvision._utils.images import TargetType, check_inputs, chunks, eval_mode, resolve_target
from trustvision.explain._base import Explainer

__all__ = [
    "Counterfactual",
    "LatentCounterfactual",
    "LikelihoodRatioGradient",
    "sample_grid",
    "counterfactual_figure",
    "sample_grid_figure",
]


def _require_generative(model) -> None:
    from trustvision.models import is_generative

    if not is_generative(model):
        raise TrustVisionError(
            "this explanation needs a generative classifier (e.g. --model ibinn-small); "
            f"{type(model).__name__} is not one"
        )


@dataclass
class Counterfactual:
    """``images`` (N, S, C, H, W): step 0 is the reconstruction of x, step S-1 the counterfactual;
    ``probs`` (N, S) the target-class probability at each step; ``diff`` (N, C, H, W) =
    counterfactual - x; ``source`` / ``target`` (N,) class indices."""

    images: torch.Tensor
    probs: torch.Tensor
    diff: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor

    def to_dict(self) -> dict:
        return {"source": self.source.tolist(), "target": self.target.tolist(),
                "target_prob": self.probs.tolist(),
                "mean_abs_diff": self.diff.abs().flatten(1).mean(1).tolist()}


class LatentCounterfactual:
    """Latent counterfactuals of a generative classifier (see the module docstring)."""

    def __init__(self, model):
        _require_generative(model)
        self.model = model

    @torch.no_grad()
    def attribute(self, inputs: torch.Tensor, target: TargetType, source: TargetType = None,
                  steps: int = 8) -> Counterfactual:
        """Counterfactuals of ``inputs`` (N, C, H, W) towards class ``target``.

        ``source`` defaults to the predicted class; ``steps`` >= 1 interpolation steps.
        """
        if steps < 1:
            raise TrustVisionError(f"steps must be >= 1, got {steps}")
        m = self.model
        with eval_mode(m):
            src = resolve_target(m, inputs, source)
            tgt = resolve_target(m, inputs, target)
            z, _ = m.latent(inputs)
            shift = m.class_means(tgt) - m.class_means(src)
            ts = torch.linspace(0.0, 1.0, steps + 1, device=z.device, dtype=z.dtype)
            imgs, probs = [], []
            for t in ts:
                x_t = m.invert(z + t * shift)
                imgs.append(x_t)
                probs.append(m(x_t).softmax(1).gather(1, tgt.view(-1, 1)).squeeze(1))
            images = torch.stack(imgs, 1)
        return Counterfactual(images.clamp(0, 1), torch.stack(probs, 1),
                              images[:, -1] - inputs, src, tgt)


class LikelihoodRatioGradient(Explainer):
    """Heatmap of ``d/dx [log p(x|y1) - log p(x|y2)]`` (higher = pushes towards y1)."""

    name, title, order = "likelihood-ratio", "Likelihood ratio", 30
    kind = "heatmap"
    requires = ("generative",)
    in_audit = False

    def attribute(self, inputs: torch.Tensor, target: TargetType = None, *, seed: int = 0,
                  internal_batch_size: int | None = None, other: TargetType = None,
                  reduce: str | None = "sum") -> torch.Tensor:
        """Gradients for ``target`` (y1, default: predicted) against ``other`` (y2, default: the
        most likely other class). ``reduce="sum"`` sums channels -> (N, 1, H, W); ``"abs"`` sums
        absolute values; ``None`` keeps (N, C, H, W). Deterministic (``seed`` is unused);
        ``internal_batch_size``: most images per forward/backward pass (None = all)."""
        if reduce not in ("sum", "abs", None):
            raise TrustVisionError(f"unknown reduce {reduce!r}; use 'sum', 'abs' or None")
        m = self.model
        inputs = check_inputs(inputs)
        with eval_mode(m):
            y1 = resolve_target(m, inputs, target)
            if other is None:
                with torch.no_grad():
                    logits = m(inputs).clone()
                logits.scatter_(1, y1.view(-1, 1), float("-inf"))
                y2 = logits.argmax(1)
            else:
                y2 = resolve_target(m, inputs, other)
            grads = []
            for sl in chunks(inputs.shape[0], internal_batch_size):
                x = inputs[sl].detach().clone().requires_grad_(True)
                lp = m.log_px_given_y(x)
                ratio = lp.gather(1, y1[sl].view(-1, 1)) - lp.gather(1, y2[sl].view(-1, 1))
                (g,) = torch.autograd.grad(ratio.sum(), x)
                grads.append(g)
            grad = torch.cat(grads)
        if reduce == "sum":
            return grad.sum(1, keepdim=True)
        if reduce == "abs":
            return grad.abs().sum(1, keepdim=True)
        return grad


@torch.no_grad()
def sample_grid(model, classes: Sequence[int] | None = None, n: int = 8,
                temperature: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Class-conditional samples (K, n, C, H, W) in [0, 1], one row per class in ``classes``."""
    _require_generative(model)
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    g = torch.Generator().manual_seed(int(seed))
    with eval_mode(model):
        rows = [model.sample(int(c), n, temperature, generator=g) for c in classes]
    return torch.stack(rows)


def _show(ax, img: torch.Tensor, cmap=None, **kw) -> None:
    img = img.detach().cpu().float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap or "gray", **kw)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def counterfactual_figure(cf: Counterfactual, inputs: torch.Tensor,
                          class_names: Sequence[str] | None = None, max_rows: int = 4):
    """One row per image: input, the interpolation steps, and the pixel difference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = min(max_rows, cf.images.shape[0])
    s = cf.images.shape[1]
    fig = Figure(figsize=(1.2 * (s + 2), 1.3 * n + 0.3))
    axes = fig.subplots(n, s + 2, squeeze=False)
    name = (lambda i: class_names[i]) if class_names else str
    for r in range(n):
        _show(axes[r, 0], inputs[r])
        axes[r, 0].set_title(f"input ({name(int(cf.source[r]))})", fontsize=7)
        for j in range(s):
            _show(axes[r, j + 1], cf.images[r, j])
            axes[r, j + 1].set_title(f"p={float(cf.probs[r, j]):.2f}", fontsize=7)
        d = cf.diff[r].sum(0)
        lim = float(d.abs().max()) or 1.0
        axes[r, s + 1].imshow(d.detach().cpu().float().numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[r, s + 1].set_xticks([])
        axes[r, s + 1].set_yticks([])
        axes[r, s + 1].set_title(f"diff -> {name(int(cf.target[r]))}", fontsize=7)
    fig.tight_layout()
    return fig


def sample_grid_figure(samples: torch.Tensor, class_names: Sequence[str] | None = None):
    """Figure of a (K, n, C, H, W) sample grid, one labelled row per class."""
    from matplotlib.figure import Figure

    k, n = samples.shape[:2]
    fig = Figure(figsize=(0.9 * n + 1.0, 0.9 * k + 0.3))
    axes = fig.subplots(k, n, squeeze=False)
    for i in range(k):
        for j in range(n):
            _show(axes[i, j], samples[i, j])
        axes[i, 0].set_ylabel(class_names[i] if class_names else str(i), fontsize=7, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    return fig
