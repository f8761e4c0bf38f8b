"""Invertible building blocks for the IB-INN generative classifier.

Every block maps ``x -> (y, logdet)`` with ``forward(x)`` and ``y -> (x, -logdet)`` with
``forward(y, rev=True)``; ``logdet`` has shape (N,) and is ``log|det dy/dx|`` per example.
Image blocks act on (N, C, H, W) tensors, the head blocks on (N, D) vectors.

We write these blocks ourselves instead of using FrEIA 0.2 (tests/models/test_freia_defects.py
shows why): FrEIA's ``AllInOneBlock`` scales its subnet output in place (breaks autograd for any
subnet whose last op saves its output), rounds its orthogonal permutation to float32 and draws
it from NumPy's global RNG; ``HaarDownsampling`` overwrites the caller's tensor in its inverse.

References:
    Dinh et al., "Density estimation using Real NVP", ICLR 2017 (affine coupling).
    Kingma & Dhariwal, "Glow", NeurIPS 2018 (ActNorm, channel mixing).
    Ardizzone et al., "Training Normalizing Flows with the Information Bottleneck for
    Competitive Generative Classification", NeurIPS 2020 (soft clamping, Haar entry, pooled head).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = [
    "InvertibleModule",
    "InvertibleSequential",
    "ActNorm",
    "OrthogonalMixing",
    "AffineCoupling",
    "CouplingBlock",
    "HaarDownsampling",
    "Squeeze",
    "DownsampleCoupling",
    "DCTPooling",
    "conv_subnet",
    "bottleneck_subnet",
    "fc_subnet",
    "random_orthogonal",
]

SubnetFn = Callable[[int, int], nn.Module]


def _sum_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random (Haar-measure) orthogonal n x n matrix, computed in float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    # Multi-threaded LAPACK QR of small matrices can be ~50x slower on a busy machine than
    # single-threaded; these matrices are at most a few hundred wide.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, r = torch.linalg.qr(a)
    finally:
        torch.set_num_threads(threads)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.get_default_dtype())


class InvertibleModule(nn.Module):
    """Base class: ``forward(x, rev=False) -> (y, logdet of shape (N,))``."""

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-example output shape for per-example input ``shape``."""
        return shape


class InvertibleSequential(InvertibleModule):
    """A chain of invertible modules; the inverse runs them backwards."""

    def __init__(self, *modules: InvertibleModule):
        super().__init__()
        self.blocks = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for block in (reversed(self.blocks) if rev else self.blocks):
            x, ld = block(x, rev=rev)
            logdet = logdet + ld
        return x, logdet

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for block in self.blocks:
            shape = block.output_shape(shape)
        return shape


class ActNorm(InvertibleModule):
    """Learned per-channel affine map ``y = x * exp(log_scale) + bias`` (the "global affine")."""

    def __init__(self, channels: int, ndim: int = 2):
        super().__init__()
        shape = (1, channels) + (1,) * ndim
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = x[0, :1].numel()
        logdet = (self.log_scale.sum() * pixels).expand(x.shape[0])
        if rev:
            return (x - self.bias) * torch.exp(-self.log_scale), -logdet
        return x * torch.exp(self.log_scale) + self.bias, logdet


class OrthogonalMixing(InvertibleModule):
    """Fixed random orthogonal mixing of the channels (a 1x1 convolution); log-det is 0.

    For up to ``max_block`` channels the matrix is a dense random orthogonal matrix; above that
    it is a random channel permutation followed by a block-diagonal random orthogonal matrix
    (still orthogonal, but O(C * max_block) memory instead of O(C^2), so 3072-channel stages
    stay cheap). Matrices are drawn from ``generator`` in float64 and stored as buffers in the
    default dtype at construction time; the inverse uses the transpose.
    """

    def __init__(self, channels: int, generator: torch.Generator, max_block: int = 256):
        super().__init__()
        size = channels if channels <= max_block else max(
            b for b in range(1, max_block + 1) if channels % b == 0)
        blocks = torch.stack([random_orthogonal(size, generator)
                              for _ in range(channels // size)])
        perm = (torch.arange(channels) if size == channels
                else torch.randperm(channels, generator=generator))
        self.register_buffer("blocks", blocks)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        k, b, _ = self.blocks.shape
        n, rest = x.shape[0], x.shape[2:]
        if rev:
            y = x.reshape(n, k, b, -1)
            y = torch.einsum("kji,nkjp->nkip", self.blocks, y).reshape(x.shape)
            return y[:, self.perm_inv], x.new_zeros(n)
        y = x[:, self.perm].reshape(n, k, b, -1)
        y = torch.einsum("kij,nkjp->nkip", self.blocks, y)
        return y.reshape(n, k * b, *rest), x.new_zeros(n)


class AffineCoupling(InvertibleModule):
    """Affine coupling with soft-clamped log-scales.

    Splits the channels into a passive part ``x1`` (first ``C - C//2``) and an active part
    ``x2``; ``s, t = subnet(x1)``, ``s = clamp * tanh(s / clamp)``, ``y2 = x2 * exp(s) + t``.
    log-det = sum of ``s``. The subnet's last layer starts at zero, so the block starts as the
    identity.
    """

    def __init__(self, channels: int, subnet: SubnetFn, clamp: float = 1.5):
        super().__init__()
        if channels < 2:
            raise ValueError("a coupling needs at least 2 channels; put a downsampling first")
        self.split = (channels - channels // 2, channels // 2)
        self.clamp = float(clamp)
        self.subnet = subnet(self.split[0], 2 * self.split[1])

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = torch.split(x, self.split, dim=1)
        a = self.subnet(x1)
        s_raw, t = torch.split(a, self.split[1], dim=1)
        s = self.clamp * torch.tanh(s_raw / self.clamp)
        logdet = s.sum(dim=_sum_dims(s))
        if rev:
            return torch.cat([x1, (x2 - t) * torch.exp(-s)], dim=1), -logdet
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1), logdet


class CouplingBlock(InvertibleSequential):
    """One IB-INN block: affine coupling -> ActNorm -> fixed orthogonal channel mixing."""

    def __init__(self, channels: int, subnet: SubnetFn, generator: torch.Generator,
                 clamp: float = 1.5, ndim: int = 2):
        super().__init__(
            AffineCoupling(channels, subnet, clamp),
            ActNorm(channels, ndim),
            OrthogonalMixing(channels, generator),
        )


class HaarDownsampling(InvertibleModule):
    """Orthonormal 2x2 Haar wavelet transform: (C, H, W) -> (4C, H/2, W/2); log-det 0.

    Output channels are grouped by wavelet: the C averages first, then the C vertical,
    horizontal and diagonal details, so the low-pass image is ``y[:, :C]`` (times 2).
    """

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([[[1.0, 1.0], [1.0, 1.0]],
                          [[1.0, -1.0], [1.0, -1.0]],
                          [[1.0, 1.0], [-1.0, -1.0]],
                          [[1.0, -1.0], [-1.0, 1.0]]]) * 0.5
        self.channels = channels
        # Grouped conv: output channel 4c + w applies wavelet w to input channel c.
        kernel = k.repeat(channels, 1, 1).view(4 * channels, 1, 2, 2)
        self.register_buffer("kernel", kernel.to(torch.get_default_dtype()))
        # Reorder channel-major (a1, v1, h1, d1, a2, ...) to wavelet-major (a1, a2, ..., d_C).
        perm = torch.arange(4 * channels).view(channels, 4).t().reshape(-1)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("perm_inv", torch.argsort(perm), persistent=False)

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        zero = x.new_zeros(x.shape[0])
        if rev:
            y = x[:, self.perm_inv]
            return torch.nn.functional.conv_transpose2d(
                y, self.kernel, stride=2, groups=self.channels), zero
        y = torch.nn.functional.conv2d(x, self.kernel, stride=2, groups=self.channels)
        return y[:, self.perm], zero

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)


class Squeeze(InvertibleModule):
    """Space-to-depth (pixel unshuffle by 2): a permutation, log-det 0."""

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        zero = x.new_zeros(x.shape[0])
        if rev:
            return torch.nn.functional.pixel_shuffle(x, 2), zero
        return torch.nn.functional.pixel_unshuffle(x, 2), zero

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)


class DownsampleCoupling(InvertibleSequential):
    """Learned invertible downsampling: squeeze, mix, then a coupling block at the new scale."""

    def __init__(self, channels: int, subnet: SubnetFn, generator: torch.Generator,
                 clamp: float = 1.5):
        super().__init__(
            Squeeze(),
            OrthogonalMixing(4 * channels, generator),
            CouplingBlock(4 * channels, subnet, generator, clamp),
        )


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n x n); row 0 is the constant 1/sqrt(n)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


class DCTPooling(InvertibleModule):
    """(N, C, H, W) -> (N, C*H*W): per-channel orthonormal 2-D DCT, DC terms first; log-det 0.

    The first C outputs are the channel means times sqrt(H*W) (the "pooled" dimensions), the
    remaining C*(H*W-1) are the higher DCT frequencies, channel-major.
    """

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.shape = (channels, height, width)
        basis = torch.kron(_dct_matrix(height), _dct_matrix(width))
        self.register_buffer("basis", basis.to(torch.get_default_dtype()))

    def forward(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        zero = x.new_zeros(x.shape[0])
        if rev:
            coef = torch.cat([x[:, :c].unsqueeze(2), x[:, c:].reshape(x.shape[0], c, h * w - 1)], dim=2)
            return (coef @ self.basis).view(-1, c, h, w), zero
        coef = x.flatten(2) @ self.basis.t()
        return torch.cat([coef[:, :, 0], coef[:, :, 1:].flatten(1)], dim=1), zero

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape),)


def _zero_last(seq: nn.Sequential) -> nn.Sequential:
    last = seq[-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return seq


def conv_subnet(width: int, batchnorm: bool = True, dropout: float = 0.0) -> SubnetFn:
    """conv3-[BN]-ReLU-conv3-[BN]-ReLU-[dropout]-conv1, last layer zero-initialised."""

    def make(c_in: int, c_out: int) -> nn.Module:
        norm = (lambda: nn.BatchNorm2d(width)) if batchnorm else nn.Identity
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, width, 3, padding=1), norm(), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), norm(), nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers.append(nn.Conv2d(width, c_out, 1))
        return _zero_last(nn.Sequential(*layers))

    return make


def bottleneck_subnet(width: int, batchnorm: bool = True) -> SubnetFn:
    """ResNet bottleneck: conv1-[BN]-ReLU-conv3-[BN]-ReLU-conv1, last layer zero-initialised."""

    def make(c_in: int, c_out: int) -> nn.Module:
        norm = (lambda: nn.BatchNorm2d(width)) if batchnorm else nn.Identity
        return _zero_last(nn.Sequential(
            nn.Conv2d(c_in, width, 1), norm(), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), norm(), nn.ReLU(),
            nn.Conv2d(width, c_out, 1),
        ))

    return make


def fc_subnet(width: int, dropout: float = 0.0) -> SubnetFn:
    """Linear-ReLU-[dropout]-Linear for the fully connected coupling, last layer zero-initialised."""

    def make(c_in: int, c_out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(c_in, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, c_out))
        return _zero_last(nn.Sequential(*layers))

    return make
