"""The Gaussian-mixture density of IB-INN latents and the Information Bottleneck loss (pure maths).

Latent density (identity covariances, class means ``mu_y``, class weights ``w_y``; D dims):

    s_y          = -0.5 * ||z - mu_y||^2 + log w_y                  (the scores, constant dropped)
    log p(x|y)   = s_y - log w_y - 0.5 * D * ln(2 pi) + log|det J|
    log p(x)     = logsumexp_y [log p(x|y) + log w_y]
    log p(y|x)   = log_softmax_y(s)

:func:`mixture_log_density` computes them; :class:`~trustvision.models.generative.IBINN` and its
:class:`~trustvision.models.generative.GaussianMixtureHead` call it, and the loss below is written
on its scores.

The Information Bottleneck loss. Per example, with ``s_y`` the scores above, D the data
dimension and ``y_ls`` the label-smoothed one-hot target:

    L_X   = [-logsumexp_y s_y - log|det J|] / D
    L_Y   = sum_y y_ls,y * (log_softmax_y(s) - log w_y)
    total = 2 / (1 + beta) * L_X - 2 * beta / (1 + beta) * L_Y

What beta means (D = data dimension; hard labels, no smoothing):

- ``beta = inf``: only ``-2 L_Y``, a cross-entropy on the Gaussian-mixture logits (a purely
  discriminative model; the density is not trained).
- ``beta = 0``: only ``2 L_X``, the likelihood of the *label-free* mixture
  ``p(x) = sum_y w_y p(x|y)``. The labels are never used, so the class means are not tied to
  the classes: the model **cannot classify** (chance accuracy). It is a density model only.
- ``beta = 1/D``: exactly the *class-conditional* likelihood. Since
  ``log p(y|x) - log w_y = log p(x|y) - log p(x)``, per example
  ``L_X - L_Y / D = -log p(x|y) / D - 0.5 ln(2 pi)``, hence
  ``total(1/D) = 2 / (1 + 1/D) * (-log p(x|y) / D - 0.5 ln(2 pi))``: maximum likelihood of
  ``p(x|y)`` with the true label (what "beta -> 0, pure class-conditional likelihood" in the
  papers refers to). Use ``beta = 1 / (C * H * W)``, e.g. ``1/64`` for 8x8 grey digits.
- ``beta = 1`` (default) weights the classification term D times more than the class-conditional
  likelihood does: the IB-INN trade-off between calibration/OOD detection and accuracy.

Reference: Ardizzone et al., "Training Normalizing Flows with the Information Bottleneck for
Competitive Generative Classification", NeurIPS 2020, eqs. (8)-(10).

Example:
    >>> import torch
    >>> z = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    >>> mu = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    >>> log_w = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    >>> dens = mixture_log_density(z, mu, log_w, logdet=torch.zeros(1, dtype=torch.float64))
    >>> [round(v, 4) for v in dens.scores[0].tolist()]  # -0.5 ||z - mu_y||^2 + ln 0.5
    [-0.8181, -1.8181]
    >>> [round(v, 4) for v in dens.log_px_given_y[0].tolist()]  # ... - ln 0.5 - ln(2 pi)
    [-1.9629, -2.9629]
    >>> out = ib_loss(dens.scores, log_w, torch.zeros(1, dtype=torch.float64), torch.tensor([0]),
    ...               dim=2, beta=1.0, label_smoothing=0.0)
    >>> round(out.l_x, 4), round(out.l_y, 4), round(float(out.loss), 4)
    (0.2524, 0.3799, -0.1274)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "LOG_2PI",
    "MixtureLogDensity",
    "mixture_log_density",
    "IBLoss",
    "ib_loss",
    "ib_weights",
    "smooth_labels",
    "perturb_inputs",
]

LOG_2PI = math.log(2.0 * math.pi)


# -- the Gaussian-mixture density ------------------------------------------------------------------

class MixtureLogDensity(NamedTuple):
    """What :func:`mixture_log_density` returns (the last two are None without ``logdet``)."""

    scores: torch.Tensor  # (N, K) -0.5 * ||z - mu_y||^2 + log w_y
    log_px_given_y: torch.Tensor | None  # (N, K) log p(x|y), nats
    log_px: torch.Tensor | None  # (N,) log p(x), nats


def mixture_log_density(
    z: torch.Tensor,
    mu: torch.Tensor,
    log_w: torch.Tensor,
    logdet: torch.Tensor | None = None,
    *,
    mu_basis: torch.Tensor | None = None,
    mu_coef: torch.Tensor | None = None,
) -> MixtureLogDensity:
    """Log-densities of latents ``z`` (N, D) under ``sum_y w_y N(mu_y, I)`` (see the module docstring).

    Args:
        z: (N, D) latents.
        mu: (K, F) class means of the first F dims of z (F = D without low-rank means).
        log_w: (K,) class log-weights.
        logdet: (N,) ``log|det dz/dx|``; with it ``log_px_given_y`` and ``log_px`` are densities
            of x (Gaussian constant included), without it only the scores are computed.
        mu_basis, mu_coef: low-rank means of the remaining D - F dims, ``mu_coef @ mu_basis.T``
            with ``mu_basis`` (D - F, r) and ``mu_coef`` (K, r).

    The scores are computed as ``z.mu_y - 0.5 ||mu_y||^2 - 0.5 ||z||^2 + log w_y``, so low-rank
    means never materialise a (K, D) matrix.
    """
    full = mu.shape[1]
    s = z[:, :full] @ mu.t() - 0.5 * (mu ** 2).sum(1)
    if mu_basis is not None:
        proj = z[:, full:] @ mu_basis  # (N, r)
        gram = mu_basis.t() @ mu_basis  # (r, r)
        s = s + proj @ mu_coef.t() - 0.5 * ((mu_coef @ gram) * mu_coef).sum(1)
    scores = s - 0.5 * (z ** 2).sum(1, keepdim=True) + log_w
    if logdet is None:
        return MixtureLogDensity(scores, None, None)
    log_px_given_y = scores - log_w - 0.5 * z.shape[1] * LOG_2PI + logdet.unsqueeze(1)
    log_px = torch.logsumexp(log_px_given_y + log_w, dim=1)
    return MixtureLogDensity(scores, log_px_given_y, log_px)


# -- the Information Bottleneck loss ---------------------------------------------------------------

@dataclass
class IBLoss:
    """Batch means: ``loss`` (the total, differentiable), ``l_x`` and ``l_y`` (detached floats)."""

    loss: torch.Tensor
    l_x: float
    l_y: float


def ib_weights(beta: float) -> tuple[float, float]:
    """The factors ``(2 / (1 + beta), 2 * beta / (1 + beta))`` of ``L_X`` and ``-L_Y``."""
    beta = float(beta)
    if beta < 0 or math.isnan(beta):
        raise ValueError(f"beta must be >= 0 (or inf), got {beta}")
    if math.isinf(beta):
        return 0.0, 2.0
    return 2.0 / (1.0 + beta), 2.0 * beta / (1.0 + beta)


def smooth_labels(y: torch.Tensor, num_classes: int, smoothing: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot (N, K) targets with ``smoothing`` mass spread uniformly over all K classes."""
    onehot = torch.nn.functional.one_hot(y, num_classes).to(dtype)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def ib_loss(scores: torch.Tensor, log_w: torch.Tensor, logdet: torch.Tensor, y: torch.Tensor,
            *, dim: int, beta: float = 1.0, label_smoothing: float = 0.05) -> IBLoss:
    """IB loss from mixture scores (batch mean).

    Args:
        scores: (N, K) ``-0.5 * ||z - mu_y||^2 + log w_y`` (``mixture_log_density(...).scores``).
        log_w: (K,) class log-weights ``log w_y``.
        logdet: (N,) ``log|det J|`` of the map from the input to z.
        y: (N,) integer labels.
        dim: D, the number of dimensions of z (L_X is per dimension).
        beta: trade-off; ``float('inf')`` = pure cross-entropy, ``1 / dim`` = the exact
            class-conditional likelihood, 0 = label-free mixture likelihood (cannot classify).
        label_smoothing: mass spread uniformly over the classes in the target.
    """
    if scores.ndim != 2 or logdet.shape != scores.shape[:1]:
        raise ValueError("scores must be (N, K) and logdet (N,)")
    a, b = ib_weights(beta)
    l_x = (-torch.logsumexp(scores, dim=1) - logdet) / dim
    target = smooth_labels(y, scores.shape[1], label_smoothing, scores.dtype)
    l_y = (target * (torch.log_softmax(scores, dim=1) - log_w)).sum(dim=1)
    total = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if a:
        total = total + a * l_x.mean()
    if b:
        total = total - b * l_y.mean()
    return IBLoss(total, float(l_x.detach().mean()), float(l_y.detach().mean()))


def perturb_inputs(x: torch.Tensor, dequantize: float = 1 / 256, noise: float = 0.01,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation ``+ U(0, dequantize)`` plus Gaussian noise ``N(0, noise^2)``."""
    out = x
    if dequantize > 0:
        out = out + dequantize * torch.rand(x.shape, generator=generator, device=x.device,
                                            dtype=x.dtype)
    if noise > 0:
        out = out + noise * torch.randn(x.shape, generator=generator, device=x.device,
                                        dtype=x.dtype)
    return out
