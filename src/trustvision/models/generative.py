"""IB-INN: an invertible network with a class-conditional Gaussian mixture on its latent space.

``f`` maps a normalised image to a latent ``z`` of the same dimension D; ``p(z|y) = N(z; mu_y, I)``
with trainable class means and optional trainable class log-weights ``log w_y``. Then

    log p(x|y) = log N(f(x); mu_y, I) + log|det J_f(x)| + log|det J_norm|
    p(y|x)     = softmax_y(-0.5 * ||z - mu_y||^2 + log w_y)

``forward(x)`` returns ``log p(y|x)`` (a log-softmax, so every logit-based tool works unchanged);
``latent``, ``invert``, ``log_px``, ``log_px_given_y``, ``bits_per_dim`` and ``sample`` expose the
generative side. Densities are over images in [0, 1] (the normalisation's log-det included).

References:
    Ardizzone, Mackowiak, Rother, Koethe. "Training Normalizing Flows with the Information
    Bottleneck for Competitive Generative Classification", NeurIPS 2020.
    Mackowiak, Ardizzone, Koethe, Rother. "Generative Classifiers as a Basis for Trustworthy
    Image Classification", CVPR 2021.

Example:
    >>> import torch
    >>> from trustvision import models
    >>> net = models.create("ibinn-small", num_classes=10, in_chans=1, image_size=8).eval()
    >>> x = torch.rand(2, 1, 8, 8)
    >>> z, logdet = net.latent(x)
    >>> bool((net.invert(z) - x).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from trustvision.models import register_model
from trustvision.models._base import GenerativeClassifier, ImageClassifier, is_generative
from trustvision.models.inn_blocks import (
    CouplingBlock,
    DCTPooling,
    DownsampleCoupling,
    HaarDownsampling,
    InvertibleSequential,
    bottleneck_subnet,
    conv_subnet,
    fc_subnet,
)
from trustvision.models.mixture import ib_loss, mixture_log_density, perturb_inputs

__all__ = [
    "IBINN",
    "IBINNFeedForward",
    "build_flow",
    "GaussianMixtureHead",
    "is_generative",
    "reestimate_batchnorm",
]

def build_flow(
    in_chans: int,
    image_size: tuple[int, int],
    *,
    stages: Sequence[int] = (2, 2, 2),
    widths: Sequence[int] = (32, 64, 64),
    entry_haar: int = 1,
    subnet: str = "conv",
    batchnorm: bool = True,
    dropout: float = 0.0,
    clamp: float = 1.5,
    fc_blocks: int = 1,
    fc_width: int = 256,
    seed: int = 0,
) -> tuple[InvertibleSequential, int]:
    """The invertible backbone: Haar entry, multi-scale coupling stages, DCT pooling, FC couplings.

    Stage ``i > 0`` opens with a learned downsampling coupling (counted as one of its blocks).
    Returns ``(flow, pooled)``: ``flow`` maps (N, C, H, W) to (N, D) with the ``pooled``
    channel-mean (DC) dimensions first; the FC couplings act on those.
    """
    def whole(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key, value in (("stages", stages), ("widths", widths)):
        if not (isinstance(value, (list, tuple)) and value and all(whole(v, 1) for v in value)):
            raise ValueError(f"{key} must be a list of whole numbers >= 1, e.g. {key}=2,2,2, "
                             f"got {value!r}")
    if len(stages) != len(widths):
        raise ValueError("stages and widths need the same length")
    for key, value, lo in (("entry_haar", entry_haar, 0), ("fc_blocks", fc_blocks, 0),
                           ("fc_width", fc_width, 1)):
        if not whole(value, lo):
            raise ValueError(f"{key} must be a whole number >= {lo}, got {value!r}")
    if subnet not in ("conv", "bottleneck"):
        raise ValueError(f"subnet must be 'conv' or 'bottleneck', got {subnet!r}")
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp < math.inf:
        raise ValueError(f"clamp must be a positive number, got {clamp!r}")
    gen = torch.Generator().manual_seed(int(seed))
    shape = (int(in_chans), int(image_size[0]), int(image_size[1]))
    downs = entry_haar + len(stages) - 1
    if shape[1] % (2 ** downs) or shape[2] % (2 ** downs):
        raise ValueError(f"image size {shape[1:]} must be divisible by {2 ** downs} for this layout")
    blocks: list[nn.Module] = []
    for _ in range(entry_haar):
        blocks.append(HaarDownsampling(shape[0]))
        shape = blocks[-1].output_shape(shape)
    for i, (n, width) in enumerate(zip(stages, widths)):
        make = (bottleneck_subnet(width, batchnorm) if subnet == "bottleneck"
                else conv_subnet(width, batchnorm, dropout))
        for j in range(n):
            if i > 0 and j == 0:
                blocks.append(DownsampleCoupling(shape[0], make, gen, clamp))
                shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
            else:
                blocks.append(CouplingBlock(shape[0], make, gen, clamp))
    blocks.append(DCTPooling(*shape))
    pooled = shape[0]
    head = [CouplingBlock(pooled, fc_subnet(fc_width, dropout), gen, clamp, ndim=0)
            for _ in range(fc_blocks)]
    blocks.append(_PartialFlow(InvertibleSequential(*head), pooled))
    return InvertibleSequential(*blocks), pooled


class _PartialFlow(nn.Module):
    """Applies an invertible flow to the first ``dims`` entries of a (N, D) vector."""

    def __init__(self, flow: InvertibleSequential, dims: int):
        super().__init__()
        self.flow = flow
        self.dims = dims

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : self.dims], x[:, self.dims:]
        a, logdet = self.flow(a, rev=rev)
        return torch.cat([a, b], dim=1), logdet

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


class GaussianMixtureHead(nn.Module):
    """Class means (K, D) with identity covariance and class log-weights.

    The first ``full_dims`` latent dimensions get a full trainable mean per class; with
    ``low_rank = r`` the remaining ones get low-rank means ``V_y @ U^T`` (U: (D - full_dims, r)),
    otherwise full means too. ``log_weights`` = log-softmax of a trainable (or fixed zero) phi.
    """

    def __init__(self, num_classes: int, dim: int, *, full_dims: int | None = None,
                 low_rank: int | None = None, learn_weights: bool = False,
                 mean_norm: float = math.sqrt(12.5), generator: torch.Generator | None = None):
        super().__init__()
        gen = generator or torch.Generator().manual_seed(0)
        self.dim = int(dim)
        self.full_dims = int(dim if (low_rank is None or full_dims is None) else full_dims)
        mu = torch.randn(num_classes, self.full_dims, generator=gen)
        self.mu = nn.Parameter(mu / mu.norm(dim=1, keepdim=True) * mean_norm)
        rest = self.dim - self.full_dims
        if rest > 0:
            self.mu_basis = nn.Parameter(torch.randn(rest, low_rank, generator=gen) / math.sqrt(rest))
            self.mu_coef = nn.Parameter(0.1 * torch.randn(num_classes, low_rank, generator=gen))
        else:
            self.mu_basis = self.mu_coef = None
        if learn_weights:
            self.phi = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_buffer("phi", torch.zeros(num_classes))

    def log_weights(self) -> torch.Tensor:
        """log w_y, shape (K,)."""
        return torch.log_softmax(self.phi, dim=0)

    def means(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The class means mu, shape (K, D), or only the rows of ``labels`` (M,) -> (M, D)
        (with low-rank means this avoids materialising all K x D entries)."""
        mu = self.mu if labels is None else self.mu[labels]
        if self.mu_basis is None:
            return mu
        coef = self.mu_coef if labels is None else self.mu_coef[labels]
        return torch.cat([mu, coef @ self.mu_basis.t()], dim=1)

    def log_density(self, z: torch.Tensor, logdet: torch.Tensor | None = None):
        """:func:`trustvision.models.mixture.mixture_log_density` of ``z`` (N, D) under this
        mixture: ``scores`` (N, K), and with ``logdet`` (N,) also ``log_px_given_y`` and ``log_px``."""
        return mixture_log_density(z, self.mu, self.log_weights(), logdet,
                                   mu_basis=self.mu_basis, mu_coef=self.mu_coef)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """``-0.5 * ||z - mu_y||^2 + log w_y`` for every class, shape (N, K) (low-rank means
        never materialise a (K, D) matrix)."""
        return self.log_density(z).scores


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running mean/var as the exact average over ``batches``.

    ``batches`` yields images or (images, labels); the model runs in train mode without
    gradients, then goes back to its previous mode. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    device = next(model.parameters()).device
    model.train()
    used = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(x.to(device))
        used += 1
        if max_batches is not None and used >= max_batches:
            break
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return used


class _FlowClassifier(ImageClassifier):
    """Shared parts of the generative classifier and its feed-forward twin."""

    def __init__(self, num_classes, in_chans, image_size, *, mean=None, std=None, seed=0,
                 **flow_kw):
        super().__init__(num_classes, in_chans, image_size, mean=mean, std=std)
        self.flow, self.pooled_dims = build_flow(self.in_chans, self.image_size, seed=seed,
                                                 **flow_kw)
        self.dim = self.in_chans * self.image_size[0] * self.image_size[1]

    def _norm_logdet(self) -> torch.Tensor:
        """log|det| of the input normalisation ``(x - mean) / std`` (a scalar)."""
        pixels = self.image_size[0] * self.image_size[1]
        return -torch.log(self.norm_std).sum() * pixels

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = f(normalise(x))`` (N, D) and ``log|det dz/dx|`` (N,), normalisation included."""
        z, logdet = self.flow(self.normalize(x))
        return z, logdet + self._norm_logdet()

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in input space (not clipped to [0, 1]) for latents (N, D).

        Put the model in eval mode first: with BatchNorm in train mode the map is batch-dependent.
        """
        xn, _ = self.flow(z, rev=True)
        return xn * self.norm_std + self.norm_mean

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(x)[0]

    def after_training(self, loader: Iterable) -> None:
        """Re-estimate BatchNorm statistics on ``loader`` (reference IB-INN practice)."""
        reestimate_batchnorm(self, loader)


class IBINN(_FlowClassifier, GenerativeClassifier):
    """The IB-INN generative classifier (see the module docstring); a
    :class:`~trustvision.models.GenerativeClassifier`.

    Args:
        num_classes, in_chans, image_size: as every trustvision model.
        stages, widths, entry_haar, subnet, batchnorm, dropout, clamp, fc_blocks, fc_width:
            the invertible backbone (:func:`build_flow`).
        low_rank: rank of the class means outside the pooled dimensions (None: full means).
        learn_weights: train the class log-weights (else a uniform prior).
        beta: Information Bottleneck trade-off (see :mod:`trustvision.models.mixture`):
            ``inf`` = cross-entropy only; ``1 / D`` (D = C*H*W) = the exact class-conditional likelihood ``p(x|y)``;
            0 = the label-free mixture likelihood ``p(x)``, which never sees the labels and so
            cannot classify (chance accuracy); 1 (default) = the IB-INN trade-off.
        label_smoothing, noise, dequantize: IB-loss training settings (see
            :mod:`trustvision.models.mixture`).
        mean_lr: learning-rate multiplier of the means and log-weights (no weight decay on them).
        seed: draws the fixed orthogonal mixings and the initial means.
    """

    def __init__(self, num_classes: int, in_chans: int, image_size, *,
                 low_rank: int | None = None, learn_weights: bool = False, beta: float = 1.0,
                 label_smoothing: float = 0.05, noise: float = 0.01, dequantize: float = 1 / 256,
                 mean_lr: float = 3.0, mean_norm: float = math.sqrt(12.5), seed: int = 0,
                 mean=None, std=None, **flow_kw):
        super().__init__(num_classes, in_chans, image_size, mean=mean, std=std, seed=seed,
                         **flow_kw)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        self.gmm = GaussianMixtureHead(num_classes, self.dim, full_dims=self.pooled_dims,
                                       low_rank=low_rank, learn_weights=learn_weights,
                                       mean_norm=mean_norm, generator=gen)
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.noise = float(noise)
        self.dequantize = float(dequantize)
        self.mean_lr = float(mean_lr)

    # -- classifier contract ------------------------------------------------------------------
    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(y|x)`` (N, K) from latents (N, D)."""
        return torch.log_softmax(self.gmm.scores(z), dim=1)

    # -- generative side ------------------------------------------------------------------------
    def log_px_given_y(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|y)`` for every class, (N, K), in nats, density over [0, 1]^D."""
        return self.gmm.log_density(*self.latent(x)).log_px_given_y

    def class_means(self, labels: torch.Tensor) -> torch.Tensor:
        """The Gaussian means mu_y (M, D) of ``labels`` (M,)."""
        return self.gmm.means(labels)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) = logsumexp_y [log p(x|y) + log w_y]``, (N,), nats over [0, 1]^D."""
        return self.gmm.log_density(*self.latent(x)).log_px

    @torch.no_grad()
    def sample(self, y: int | torch.Tensor, n: int = 1, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-conditional samples ``f^-1(mu_y + temperature * eps)``.

        ``y`` an int gives ``n`` samples of that class; a tensor of labels gives one per label.
        Returns images (M, C, H, W) clipped to [0, 1]. Use eval mode.
        """
        device = self.gmm.mu.device
        labels = (torch.full((n,), int(y), dtype=torch.long) if isinstance(y, int)
                  else torch.as_tensor(y, dtype=torch.long).flatten())
        labels = labels.to(device)
        eps = torch.randn(len(labels), self.dim, generator=generator,
                          device="cpu" if generator is not None else device)
        z = self.gmm.means(labels) + temperature * eps.to(device=device, dtype=self.gmm.mu.dtype)
        return self.invert(z).clamp(0.0, 1.0)

    # -- training hooks (used by trustvision.train.fit) --------------------------------------------
    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IB loss (:func:`trustvision.models.mixture.ib_loss`) on dequantised, noised inputs;
        returns ``(loss, logits)``."""
        z, logdet = self.latent(perturb_inputs(x, self.dequantize, self.noise))
        scores = self.gmm.scores(z)
        out = ib_loss(scores, self.gmm.log_weights(), logdet, y, dim=self.dim, beta=self.beta,
                      label_smoothing=self.label_smoothing)
        return out.loss, torch.log_softmax(scores.detach(), dim=1)

    def param_groups(self, lr: float) -> list[dict]:
        """Backbone at ``lr``; means and log-weights at ``mean_lr * lr`` without weight decay."""
        head = [p for p in self.gmm.parameters() if p.requires_grad]
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr},
                {"params": head, "lr": lr * self.mean_lr, "weight_decay": 0.0}]


class IBINNFeedForward(_FlowClassifier):
    """Feed-forward twin of :class:`IBINN`: the same invertible backbone + a linear head (CE)."""

    def __init__(self, num_classes: int, in_chans: int, image_size, *, seed: int = 0,
                 mean=None, std=None, **flow_kw):
        super().__init__(num_classes, in_chans, image_size, mean=mean, std=std, seed=seed,
                         **flow_kw)
        self.head = nn.Linear(self.dim, num_classes)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


# -- registered configurations ----------------------------------------------------------------

_SMALL = dict(stages=(2, 2, 2), widths=(32, 64, 64), entry_haar=1, clamp=1.5, fc_blocks=2,
              fc_width=256, batchnorm=True)


def _small_layout(image_size, kw: dict) -> dict:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    cfg = dict(_SMALL)
    # 8x8 inputs: Haar to 4x4, then two downsampling stages to 1x1.
    if min(size) < 8:
        raise ValueError("ibinn-small needs images of at least 8x8 pixels")
    cfg.update(kw)
    return cfg


@register_model("ibinn-small")
def ibinn_small(num_classes: int, in_chans: int = 1, image_size=8, **kw) -> IBINN:
    """Small IB-INN for 8x8-32x32 inputs (Haar entry, 3 stages of 2 blocks, 2 FC couplings).

    Defaults: input noise 0.05 and no label smoothing (smoothing made the posteriors
    under-confident on small data: ECE-15 0.016 at 0.01 and 0.074 at 0.05 vs 0.008). The
    ``digits`` zoo entry uses ``noise=0.1`` (chosen on the validation split: 3-seed mean val
    ECE-15 0.014 vs 0.016 at 0.05; see BENCHMARKS.md).
    """
    kw.setdefault("noise", 0.05)
    kw.setdefault("label_smoothing", 0.0)
    return IBINN(num_classes, in_chans, image_size, **_small_layout(image_size, kw))


@register_model("ibinn-small-ff")
def ibinn_small_ff(num_classes: int, in_chans: int = 1, image_size=8, **kw) -> IBINNFeedForward:
    """Feed-forward twin of ``ibinn-small``: same backbone, linear head, cross-entropy."""
    return IBINNFeedForward(num_classes, in_chans, image_size, **_small_layout(image_size, kw))


@register_model("ibinn-cifar")
def ibinn_cifar(num_classes: int, in_chans: int = 3, image_size=32, **kw) -> IBINN:
    """Reference CIFAR layout: stages [8, 24, 24], conv subnets of widths [16, 32, 64],
    learned downsampling 3x32x32 -> 12x16x16 -> 48x8x8, DCT pooling + one FC coupling."""
    cfg = dict(stages=(8, 24, 24), widths=(16, 32, 64), entry_haar=0, clamp=1.0, fc_blocks=1,
               fc_width=512)
    cfg.update(kw)
    return IBINN(num_classes, in_chans, image_size, **cfg)


@register_model("ibinn-imagenet")
def ibinn_imagenet(num_classes: int, in_chans: int = 3, image_size=224, **kw) -> IBINN:
    """ResNet-50 layout [3, 4, 6, 3] of bottleneck couplings: two Haar levels at the entry
    (3x224x224 -> 48x56x56), a downsampling coupling opening each later stage, ending at
    3072x7x7 (150,528 dims); full means on the 3072 pooled dims, rank-16 means on the rest."""
    cfg = dict(stages=(3, 4, 6, 3), widths=(64, 128, 256, 512), entry_haar=2,
               subnet="bottleneck", clamp=1.0, fc_blocks=1, fc_width=1024, low_rank=16)
    cfg.update(kw)
    return IBINN(num_classes, in_chans, image_size, **cfg)
