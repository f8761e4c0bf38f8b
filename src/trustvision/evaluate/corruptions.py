"""Common corruptions: the 15 types x 5 severities of CIFAR-10-C / ImageNet-C (Hendrycks &
Dietterich, ICLR 2019), batched torch ops for any image size and 1 or 3 channels.

Types: noise (gaussian-noise, shot-noise, impulse-noise), blur (defocus-blur, glass-blur,
motion-blur, zoom-blur), weather (snow, frost, fog, brightness), digital (contrast,
elastic-transform, pixelate, jpeg-compression).

Parameters. Images whose shorter side S is at most 64 px use the CIFAR-10-C table, from 128 px on
the ImageNet-C table; in between every parameter is interpolated linearly in S between the two
tables (the photon count of shot noise geometrically; integers rounded). Geometric parameters
(blur radii and sigmas, glass-blur displacement, motion lengths, the elastic grid) are in pixels
of a 32 px image for the CIFAR table and of a 224 px image for the ImageNet table and are scaled
by S / 32 resp. S / 224; below 32 px the CIFAR pixel values are kept unscaled (scaling them down
would make every blur vanish on 8 x 8 images). Zoom factors, pixelate fractions and the elastic
parameters (fractions of the image side in the originals) are size-free.

Randomness. Every image gets its own ``torch.Generator``, seeded from ``(seed, corruption name,
key)`` where the key is the image's index in its dataset when ``indices`` are given (what
:func:`corruption_accuracy` does) and otherwise a hash of the image's bytes; so the same seed gives
the same corrupted image whatever batch it comes in, and the five severities of one type reuse the
same random field (they differ only by their parameters).

Severity and distance. Two parameter sets (``parameters=``). "published": the CIFAR-10-C and
ImageNet-C tables as published; with them the mean distance to the clean image does not grow at
every severity step for six types: glass blur (more blur smooths the pixel shuffle away), elastic
(CIFAR: its affine part shrinks with severity; ImageNet-C: severities 1 and 2 are its strongest),
pixelate (0.95 and 0.9 of 8 px round to the same size; close non-integer block ratios alias),
frost (the image weight falls faster than the frost weight grows), snow (severity 3 raises the
flake threshold) and fog (ImageNet-C severities 3 and 4 share one strength). "monotone" (the
default) keeps the published tables for the other nine types and replaces those six rows by ones
that keep the published scale and make every step stronger (``_MONOTONE`` in the source, each with
its reason); tests/evaluate/test_corruptions.py pins strict growth for all 15 types at 8, 32 and
224 px. Integer parameters interpolated between the tables round half up.

Where this differs from the original generator (``make_cifar_c.py`` / ``make_imagenet_c.py``):

* glass blur: the original swaps each pixel with a random neighbour (offsets -delta..delta-1),
  sequentially over the image, between two Gaussian blurs of a uint8 image; here every pixel is
  gathered at once from a random neighbour with offsets -delta..delta (the same local shuffle,
  vectorised and symmetric; pixels may repeat), in floats;
* defocus blur: a disk of the radius, Gaussian-blurred by the alias sigma, on a grid of
  radius + 3 sigma (the original: at least 17 x 17 with a 3 x 3 Gaussian);
* motion blur (also inside snow): the ImageMagick one-sided motion blur is a line kernel of
  length ``radius`` with Gaussian weights ``sigma`` along a random angle, splatted bilinearly;
* fog: the diamond-square plasma fractal is replaced by spectral 1/f noise with the same
  per-octave decay (amplitude divided by ``decay`` per doubling of frequency); as in the
  original it is made on a 256 x 256 map (the next power of two for larger images), normalised
  to [0, 1] over the map and cropped to the image, so on small images the fog is a gentle
  gradient of a large cloud;
* snow: the flakes are clipped to [0, 1] before their motion blur, as in the original;
* frost: the original blends crops of six frost photographs; here a procedural, seeded frost
  texture (see :func:`frost_texture`) is blended with the same weights;
* elastic: one random affine (three points moved by up to ``affine`` px) followed by a smooth
  displacement field (uniform noise low-passed by a Gaussian ``sigma``, times ``alpha``), sampled
  bilinearly with reflection; the low-pass is done in the Fourier domain (periodic), which keeps
  the field's statistics;
* brightness: +c on the HSV value (exactly what the original does, computed without the HSV
  round trip: for fixed hue and saturation RGB is proportional to V); on 1 channel x + c;
* pixelate: box downsampling as PIL's BOX filter (the mean of the pixels whose centres fall in
  each block), then nearest-neighbour upsampling with centred pixels (what BOX does upwards);
* jpeg: PIL per image (uint8 round trip), 1 channel as mode "L".

Example:
    >>> import torch
    >>> x = torch.rand(4, 3, 32, 32)
    >>> corrupt(x, "fog", 3).shape
    torch.Size([4, 3, 32, 32])
    >>> len(list_corruptions())
    15

References:
    Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
    Perturbations", ICLR 2019.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trustvision._utils.registry import Registry
from trustvision.errors import TrustVisionError
from trustvision.evaluate.calibration import expected_calibration_error

__all__ = [
    "corrupt",
    "list_corruptions",
    "corruption_params",
    "corruption_accuracy",
    "CorruptionResult",
    "frost_texture",
    "CATEGORIES",
    "SEVERITIES",
    "PARAMETERS",
]

SEVERITIES = (1, 2, 3, 4, 5)

#: type -> (CIFAR-10-C parameters per severity, ImageNet-C parameters per severity, geometric
#: components: indices into each tuple scaled with the image size)
_TABLES: dict[str, tuple[list, list, tuple[int, ...]]] = {
    # sigma of additive Gaussian noise
    "gaussian-noise": ([.04, .06, .08, .09, .10], [.08, .12, .18, .26, .38], ()),
    # photons per unit intensity: Poisson(x * c) / c
    "shot-noise": ([500, 250, 100, 75, 50], [60, 25, 12, 5, 3], ()),
    # fraction of salt-and-pepper values
    "impulse-noise": ([.01, .02, .03, .05, .07], [.03, .06, .09, .17, .27], ()),
    # (disk radius, alias blur sigma) in px
    "defocus-blur": ([(.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1)],
                     [(3, .1), (4, .5), (6, .5), (8, .5), (10, .5)], (0, 1)),
    # (Gaussian sigma px, max displacement px, iterations)
    "glass-blur": ([(.05, 1, 1), (.25, 1, 1), (.4, 1, 1), (.25, 1, 2), (.4, 1, 2)],
                   [(.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)], (0, 1)),
    # (line length px, Gaussian sigma px along it); random angle in [-45, 45] degrees
    "motion-blur": ([(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
                    [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)], (0, 1)),
    # (largest zoom, exclusive; step): the mean of the image zoomed by 1, 1 + step, ...
    "zoom-blur": ([(1.06, .01), (1.11, .01), (1.16, .01), (1.21, .01), (1.26, .01)],
                  [(1.11, .01), (1.16, .01), (1.21, .02), (1.26, .02), (1.31, .03)], ()),
    # (flake mean, flake std, flake zoom, threshold, motion length px, motion sigma px, image weight)
    "snow": ([(.1, .2, 1, .6, 8, 3, .95), (.1, .2, 1, .5, 10, 4, .9), (.15, .3, 1.75, .55, 10, 4, .9),
              (.25, .3, 2.25, .6, 12, 6, .85), (.3, .3, 1.25, .65, 14, 12, .8)],
             [(.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
              (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)], (4, 5)),
    # (image weight, frost weight)
    "frost": ([(1, .2), (1, .3), (.9, .4), (.85, .4), (.75, .45)],
              [(1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75)], ()),
    # (fog strength, per-octave decay of the fractal)
    "fog": ([(.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)],
            [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)], ()),
    # added to the HSV value
    "brightness": ([.05, .1, .15, .2, .3], [.1, .2, .3, .4, .5], ()),
    # factor on the deviation from the image mean
    "contrast": ([.75, .5, .4, .3, .15], [.4, .3, .2, .1, .05], ()),
    # (alpha, sigma, affine) as fractions of the image side (ImageNet-C: of 244/224 of it; see _elastic)
    "elastic-transform": ([(0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03)],
                          [(2, .7, .1), (2, .08, .2), (.05, .01, .02), (.07, .01, .02), (.12, .01, .02)], ()),
    # side of the low-resolution image as a fraction of the side
    "pixelate": ([.95, .9, .85, .75, .65], [.6, .5, .4, .3, .25], ()),
    # JPEG quality
    "jpeg-compression": ([80, 65, 58, 50, 40], [25, 18, 15, 10, 7], ()),
}

#: The "monotone" parameter set (the default): the published tables above, except six types whose
#: published severities are not increasing in effect (the mean distance to the clean image falls
#: at some step on 8 .. 224 px images). Their rows below keep the published ends of the scale and
#: make every step stronger; measured on smooth synthetic and real images (digits, faces, textures,
#: photos) at 8 .. 224 px (tests/evaluate/test_corruptions.py). ``parameters="published"`` gives the
#: original tables, for comparison with published CIFAR-10-C / ImageNet-C numbers.
_MONOTONE: dict[str, tuple[list, list, tuple[int, ...]]] = {
    # more blur smooths the shuffle away: the shuffle (displacement, iterations) grows with the
    # severity and the blur grows slowly; the displacement is in pixels, not scaled with the size
    "glass-blur": ([(.05, 1, 1), (.1, 1, 2), (.15, 1, 3), (.2, 2, 3), (.2, 3, 4)],
                   [(.7, 1, 2), (.9, 2, 2), (1, 2, 4), (1.1, 3, 4), (1.5, 4, 5)], (0,)),
    # published severity 3 raises the flake threshold (fewer flakes) and severity 5 too
    "snow": ([(.1, .2, 1, .6, 8, 3, .95), (.1, .2, 1, .5, 10, 4, .9), (.15, .3, 1.75, .5, 10, 4, .85),
              (.25, .3, 2.25, .6, 12, 6, .8), (.3, .3, 1.25, .6, 14, 12, .75)],
             [(.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .85, 12, 8, .65),
              (.55, .3, 4.5, .8, 12, 8, .6), (.55, .3, 2.5, .8, 12, 12, .55)], (4, 5)),
    # published: the image weight falls faster than the frost weight grows from severity 3 on
    "frost": ([(1, .2), (1, .3), (.95, .4), (.9, .5), (.85, .6)],
              [(1, .4), (.9, .6), (.85, .7), (.8, .8), (.75, .9)], ()),
    # published ImageNet-C severities 3 and 4 share one strength, and a falling decay (finer fog)
    # lowers the distance again: the strength grows, the decay stays at 2
    "fog": ([(.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)],
            [(1.5, 2), (2, 2), (2.5, 2), (3, 2), (4, 2)], ()),
    # published: the affine part shrinks while the elastic part grows (CIFAR); ImageNet-C's first two
    # severities are its strongest. Here the affine part grows and ImageNet-C's rows are in order.
    "elastic-transform": ([(0, 0, .04), (.05, .2, .05), (.08, .06, .06), (.1, .04, .07), (.1, .03, .08)],
                          [(.05, .01, .02), (.08, .01, .03), (.12, .01, .04), (2, .7, .1), (2, .08, .2)], ()),
    # published 0.95 and 0.9 of 8 px round to one size, and close non-integer ratios alias
    "pixelate": ([.875, .75, .625, .5, .375], [.6, .5, .4, .3, .25], ()),
}
PARAMETERS = ("monotone", "published")

#: category -> types, in the order of the papers' figures
CATEGORIES = {
    "noise": ("gaussian-noise", "shot-noise", "impulse-noise"),
    "blur": ("defocus-blur", "glass-blur", "motion-blur", "zoom-blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic-transform", "pixelate", "jpeg-compression"),
}
_ORDER = [n for names in CATEGORIES.values() for n in names]
_INTEGER = {"glass-blur": (2,), "jpeg-compression": (0,)}
_GEOMETRIC_MEAN = {"shot-noise"}

_CORRUPTIONS: Registry[Callable] = Registry("corruption", "`trustvision.evaluate.corruptions.list_corruptions()`")


def list_corruptions() -> list[str]:
    """The 15 corruption names, grouped noise / blur / weather / digital as in the papers."""
    return [n for n in _ORDER if n in _CORRUPTIONS] + sorted(n for n in _CORRUPTIONS.names() if n not in _ORDER)


def _check_severity(severity: Any) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise TrustVisionError(f"corruption severity must be an integer 1..5, got {severity!r}")
    return int(severity)


def _check_parameters(parameters: str) -> str:
    if parameters not in PARAMETERS:
        raise TrustVisionError(f"corruption parameters must be one of {', '.join(PARAMETERS)}, got {parameters!r}")
    return parameters


def corruption_params(name: str, severity: int, size: int, parameters: str = "monotone") -> tuple[float, ...]:
    """The parameters of corruption ``name`` at ``severity`` (1..5) for images whose shorter side
    is ``size`` px, geometric ones already in pixels of that image (see the module docstring);
    ``parameters``: "monotone" (default: every severity step stronger) or "published"."""
    _CORRUPTIONS.get(name)
    severity = _check_severity(severity)
    tables = _MONOTONE if _check_parameters(parameters) == "monotone" else {}
    cifar, imagenet, geometric = tables.get(name) or _TABLES[name]
    a = np.atleast_1d(np.asarray(cifar[severity - 1], dtype=np.float64)).copy()
    b = np.atleast_1d(np.asarray(imagenet[severity - 1], dtype=np.float64)).copy()
    for i in geometric:
        a[i] *= max(size, 32) / 32
        b[i] *= size / 224
    t = min(1.0, max(0.0, (size - 64) / 64))
    if name in _GEOMETRIC_MEAN:
        p = np.exp((1 - t) * np.log(a) + t * np.log(b))
    else:
        p = (1 - t) * a + t * b
    for i in _INTEGER.get(name, ()):
        p[i] = math.floor(p[i] + 0.5)  # ties up (round() would send 2.5 to 2, 3.5 to 4)
    return tuple(float(v) for v in p)


# -- shared helpers ----------------------------------------------------------------------------


def _seed_of(seed: int, name: str, key: bytes) -> int:
    h = hashlib.blake2b(key, digest_size=8, key=f"{int(seed)}:{name}".encode()[:64])
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _generators(x: torch.Tensor, name: str, seed: int, indices) -> list[torch.Generator]:
    if indices is not None:
        keys = [f"index:{int(i)}".encode() for i in indices]
    else:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        keys = [arr[i].tobytes() for i in range(arr.shape[0])]
    return [torch.Generator().manual_seed(_seed_of(seed, name, k)) for k in keys]


def _per_image(gens, draw: Callable[[torch.Generator], torch.Tensor], device) -> torch.Tensor:
    return torch.stack([draw(g) for g in gens]).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.pad(x, (r, r, r, r), mode="replicate") if r else x


def _filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of ``x`` (N, C, H, W) with ``k``: one (K, K) kernel for all images
    or (N, K, K), one per image (K odd). Replicate padding. Kernels from 5 x 5 on are applied in
    the Fourier domain (on one CPU thread several times faster than a single-channel conv2d)."""
    n, c, h, w = x.shape
    kk = k.shape[-1]
    r = kk // 2
    per_image = k.dim() == 3
    xp = _pad(x, r)
    hp, wp = xp.shape[-2:]
    if kk >= 5:
        kernel = k.to(x.dtype) if per_image else k.to(x.dtype)[None]
        kpad = torch.zeros(kernel.shape[0], hp, wp, dtype=x.dtype, device=x.device)
        kpad[:, :kk, :kk] = kernel.flip(-1, -2)
        kpad = torch.roll(kpad, shifts=(-r, -r), dims=(-2, -1))
        out = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(kpad)[:, None], s=(hp, wp))
        return out[..., r:r + h, r:r + w].contiguous()
    if per_image:
        weight = k.to(x.dtype).repeat_interleave(c, 0)[:, None]
        return F.conv2d(xp.reshape(1, n * c, hp, wp), weight, groups=n * c).view(n, c, h, w)
    return F.conv2d(xp.reshape(n * c, 1, hp, wp), k.to(x.dtype)[None, None]).view(n, c, h, w)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (replicate padding), kernel radius ceil(3 sigma): separable sums of shifted
    copies for small kernels, the Fourier domain for large ones."""
    if sigma < 1e-3:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    if r > 4:
        return _filter(x, g[:, None] * g[None])
    h, w = x.shape[-2:]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = sum(g[i] * y[..., :, i:i + w] for i in range(2 * r + 1))
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return sum(g[i] * y[..., i:i + h, :] for i in range(2 * r + 1))


def _line_kernels(length: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """(N, K, K) one-sided motion kernels: Gaussian weights (``sigma``) at distances 0..``length``
    from the centre along each angle (degrees, counter-clockwise), splatted bilinearly."""
    r = max(1, math.ceil(length))
    kk = 2 * r + 1
    t = torch.linspace(0, length, max(2, math.ceil(4 * length) + 1), dtype=torch.float64)
    wt = torch.exp(-t ** 2 / (2 * max(sigma, 1e-3) ** 2))
    a = torch.deg2rad(angles.double())[:, None]
    px, py = r + t * torch.cos(a), r - t * torch.sin(a)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    kern = torch.zeros(angles.shape[0], kk * kk, dtype=torch.float64)
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = (x0 + dx).clamp(0, kk - 1).long(), (y0 + dy).clamp(0, kk - 1).long()
        kern.scatter_add_(1, yi * kk + xi, wgt * wt)
    kern = kern / kern.sum(1, keepdim=True)
    return kern.view(-1, kk, kk).float()


def _fractal(gens, h: int, w: int, decay: float, device, map_size: int | None = None) -> torch.Tensor:
    """(N, 1, H, W) spectral 1/f noise: amplitude divided by ``decay`` per octave (per doubling
    of frequency), made on a ``map_size`` square map (default H x W), normalised to [0, 1] over
    the map and cropped to its top-left H x W corner."""
    mh, mw = (max(map_size, h), max(map_size, w)) if map_size else (h, w)
    beta = 1 + math.log2(max(decay, 1.0001))
    white = _per_image(gens, lambda g: torch.randn(mh, mw, generator=g), device)
    fy = torch.fft.fftfreq(mh, device=device)[:, None]
    fx = torch.fft.rfftfreq(mw, device=device)[None]
    f = torch.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = f ** (-beta)
    amp[0, 0] = 0.0
    field_ = torch.fft.irfft2(torch.fft.rfft2(white) * amp, s=(mh, mw))
    lo = field_.amin((-2, -1), keepdim=True)
    hi = field_.amax((-2, -1), keepdim=True)
    return ((field_ - lo) / (hi - lo).clamp_min(1e-12))[:, None, :h, :w]


def _zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """Centre crop of 1/z of the side, resized back (bilinear)."""
    n = x.shape[0]
    theta = x.new_tensor([[1 / z, 0, 0], [0, 1 / z, 0]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -- the 15 types ------------------------------------------------------------------------------


def _register(name: str):
    def deco(fn):
        _CORRUPTIONS.add(name, fn)
        return fn

    return deco


@_register("gaussian-noise")
def _gaussian_noise(x, p, gens):
    noise = _per_image(gens, lambda g: torch.randn(x.shape[1:], generator=g), x.device)
    return x + noise.to(x.dtype) * p[0]


@_register("shot-noise")
def _shot_noise(x, p, gens):
    lam = (x.clamp(0, 1) * p[0]).cpu()
    out = torch.stack([torch.poisson(lam[i], generator=g) for i, g in enumerate(gens)])
    return out.to(x.device, x.dtype) / p[0]


@_register("impulse-noise")
def _impulse_noise(x, p, gens):
    u = _per_image(gens, lambda g: torch.rand(x.shape[1:], generator=g), x.device).to(x.dtype)
    out = torch.where(u < p[0] / 2, torch.zeros_like(x), x)
    return torch.where((u >= p[0] / 2) & (u < p[0]), torch.ones_like(x), out)


@_register("defocus-blur")
def _defocus_blur(x, p, gens):
    radius, alias = p
    r = max(1, math.ceil(radius) + math.ceil(3 * alias))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    if alias > 1e-3:
        disk = _gaussian_blur(disk[None, None], alias)[0, 0]
    return _filter(x, (disk / disk.sum()).to(x.device))


@_register("glass-blur")
def _glass_blur(x, p, gens):
    sigma, delta, iters = p[0], max(1, math.floor(p[1] + 0.5)), int(p[2])
    n, c, h, w = x.shape
    y = _gaussian_blur(x, sigma)
    rows = torch.arange(h, device=x.device)[:, None]
    cols = torch.arange(w, device=x.device)[None]
    for _ in range(iters):
        off = _per_image(gens, lambda g: torch.randint(-delta, delta + 1, (2, h, w), generator=g), x.device)
        src = (rows + off[:, 0]).clamp(0, h - 1) * w + (cols + off[:, 1]).clamp(0, w - 1)
        y = y.flatten(2).gather(2, src.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)
    return _gaussian_blur(y, sigma)


@_register("motion-blur")
def _motion_blur(x, p, gens):
    angles = torch.stack([torch.rand((), generator=g) * 90 - 45 for g in gens])
    return _filter(x, _line_kernels(p[0], p[1], angles).to(x.device))


@_register("zoom-blur")
def _zoom_blur(x, p, gens):
    stop, step = p
    k = max(1, math.ceil((stop - 1) / step - 1e-6))
    out = x.clone()
    for i in range(k):
        out += x if i == 0 else _zoom(x, 1 + step * i)
    return out / (k + 1)


@_register("snow")
def _snow(x, p, gens):
    loc, scale, zoom, threshold, length, sigma, weight = p
    n, c, h, w = x.shape
    flakes = _per_image(gens, lambda g: torch.randn(1, h, w, generator=g), x.device).to(x.dtype) * scale + loc
    if zoom > 1.0001:
        flakes = _zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    angles = torch.stack([torch.rand((), generator=g) * 90 - 135 for g in gens])
    flakes = _filter(flakes, _line_kernels(length, sigma, angles).to(x.device))
    out = weight * x + (1 - weight) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return out + flakes + flakes.flip(-1, -2)


def frost_texture(gens: Sequence[torch.Generator], h: int, w: int, channels: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, C, H, W) procedural frost in [0, 1], one per generator: a bright 1/f haze (decay 1.6)
    plus ice needles (sparse seeds drawn out along three random directions by one-sided line
    kernels of about a quarter of the side and summed) on a floor of 0.3, tinted pale blue on 3
    channels: bright and high-contrast, like the frost photographs of ImageNet-C."""
    s = min(h, w)
    haze = _fractal(gens, h, w, 1.6, device)
    seeds = _per_image(gens, lambda g: (torch.rand(1, h, w, generator=g) < 0.03).float(), device)
    needles = torch.zeros_like(seeds)
    for j in range(3):
        angles = torch.stack([torch.rand((), generator=g) * 360 for g in gens])
        length = max(2.0, s / 4 * (0.6 + 0.2 * j))
        needles += _filter(seeds, _line_kernels(length, length / 2, angles).to(device)) * length
    needles = (needles / needles.amax((-2, -1), keepdim=True).clamp_min(1e-6)).clamp(0, 1) ** 0.7
    tex = (0.3 + 0.4 * haze + 0.7 * needles).clamp(0, 1)
    if channels == 3:
        tint = torch.tensor([0.86, 0.93, 1.0], device=device).view(1, 3, 1, 1)
        return tex * tint
    return tex.expand(-1, channels, -1, -1) * 0.93


@_register("frost")
def _frost(x, p, gens):
    n, c, h, w = x.shape
    return p[0] * x + p[1] * frost_texture(gens, h, w, c, x.device).to(x.dtype)


@_register("fog")
def _fog(x, p, gens):
    n, c, h, w = x.shape
    top = x.amax((1, 2, 3), keepdim=True)
    # as in both originals: a 256 x 256 map (larger images: the next power of two), cropped
    m = max(256, 1 << (max(h, w) - 1).bit_length())
    out = x + p[0] * _fractal(gens, h, w, p[1], x.device, map_size=m).to(x.dtype)
    return out * top / (top + p[0])


@_register("brightness")
def _brightness(x, p, gens):
    if x.shape[1] != 3:
        return x + p[0]
    v = x.amax(1, keepdim=True)
    v2 = (v + p[0]).clamp(max=1.0)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2.expand_as(x))


@_register("contrast")
def _contrast(x, p, gens):
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * p[0] + m


@_register("elastic-transform")
def _elastic(x, p, gens):
    n, c, h, w = x.shape
    s = min(h, w)
    # CIFAR-10-C gives fractions of the side; ImageNet-C multiplies by 244 on 224 px images (its
    # comment: "244 should have been 224"), so from 128 px on the fractions are of 244 / 224 sides
    t = min(1.0, max(0.0, (s - 64) / 64))
    s = s * ((1 - t) + t * 244 / 224)
    alpha, sigma, affine = p[0] * s, p[1] * s, p[2] * s
    # a random affine from three points moved by up to `affine` px (pixel coordinates)
    cx, cy, q = w / 2, h / 2, s / 3
    src = torch.tensor([[cx + q, cy + q], [cx + q, cy - q], [cx - q, cy - q]], dtype=torch.float64)
    moved = _per_image(gens, lambda g: (torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1), "cpu")
    dst = src + moved * affine
    ones = torch.ones(n, 3, 1, dtype=torch.float64)
    # the map from output to input pixel: solve [dst 1] M = src
    m = torch.linalg.solve(torch.cat([dst, ones], 2), src.expand(n, 3, 2))
    # smooth random displacement
    u = _per_image(gens, lambda g: torch.rand(2, h, w, generator=g, dtype=torch.float64) * 2 - 1, "cpu")
    if sigma > 1e-3:
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None]
        gain = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))
        u = torch.fft.irfft2(torch.fft.rfft2(u) * gain, s=(h, w))
    disp = u * alpha
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    px, py = xx + disp[:, 0], yy + disp[:, 1]
    pts = torch.stack([px, py, torch.ones_like(px)], -1)  # (N, H, W, 3)
    srcpix = pts @ m[:, None]  # (N, H, W, 2) in pixels
    grid = torch.stack([(srcpix[..., 0] + 0.5) / w * 2 - 1, (srcpix[..., 1] + 0.5) / h * 2 - 1], -1)
    return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _box_matrix(n: int, m: int, dtype, device) -> torch.Tensor:
    """(m, n) weights of a box downsampling from n to m pixels (PIL's BOX filter): output pixel i
    averages the input pixels whose centres fall in its footprint [i, i + 1) * n / m."""
    centres = torch.arange(n, dtype=torch.float64) + 0.5
    lo = torch.arange(m, dtype=torch.float64)[:, None] * n / m
    w = ((centres[None] >= lo) & (centres[None] < lo + n / m)).double()
    return (w / w.sum(1, keepdim=True).clamp_min(1)).to(device, dtype)


@_register("pixelate")
def _pixelate(x, p, gens):
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * p[0])), max(1, int(w * p[0]))
    small = _box_matrix(h, sh, x.dtype, x.device) @ x @ _box_matrix(w, sw, x.dtype, x.device).T
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


@_register("jpeg-compression")
def _jpeg(x, p, gens):
    from PIL import Image

    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(p[0]))
        buf.seek(0)
        back = np.asarray(Image.open(buf).convert("L" if a.shape[-1] == 1 else "RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(back.reshape(a.shape).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


# -- public API --------------------------------------------------------------------------------


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            indices: Iterable[int] | None = None, parameters: str = "monotone") -> torch.Tensor:
    """``images`` (N, C, H, W) or (C, H, W), floats in [0, 1], C = 1 or 3, with corruption ``name``
    at ``severity`` 1..5: a tensor of the same shape, dtype and device, in [0, 1].

    ``indices``: one integer per image (e.g. its index in the dataset) to seed its random field
    from; without them each image is seeded from its bytes. Either way the result of an image does
    not depend on the other images of the batch. Parameters per type and image size: see the
    module docstring and :func:`corruption_params` (``parameters``: "monotone", the default, or
    "published").
    """
    fn = _CORRUPTIONS.get(name)
    severity = _check_severity(severity)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TrustVisionError("corrupt() takes a float tensor of images in [0, 1] (N, C, H, W); convert "
                               "uint8 images with x.float() / 255")
    single = images.dim() == 3
    x = images[None] if single else images
    if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 2:
        raise TrustVisionError(f"corrupt() takes images of shape (N, C, H, W) with C = 1 or 3 and H, W >= 2, "
                               f"got {tuple(images.shape)}")
    if x.shape[0] == 0:
        return images.clone()
    if indices is not None:
        indices = [int(i) for i in indices]
        if len(indices) != x.shape[0]:
            raise TrustVisionError(f"corrupt() got {len(indices)} indices for {x.shape[0]} images; give one "
                                   "per image")
    gens = _generators(x, name, seed, indices)
    params = corruption_params(name, severity, min(x.shape[-2:]), parameters)
    with torch.no_grad():
        work = x.detach().float().clamp(0, 1)
        out = fn(work, params, gens).clamp(0, 1).to(images.dtype)
    return out[0] if single else out


@dataclass
class CorruptionResult:
    """Accuracy under corruption (Hendrycks & Dietterich 2019). Higher accuracy, lower ECE are better.

    Attributes:
        corruptions: the types evaluated, in order; ``severities``: the severities evaluated.
        accuracy: type -> accuracy per severity (same order as ``severities``).
        mean_accuracy: mean over every type x severity (the CIFAR-10-C / RobustBench headline).
        ece: ECE (``n_bins`` equal-width bins on top-1 confidence) per severity, pooled over types.
        confidence: mean top-1 confidence per severity, pooled over types.
        clean_accuracy, clean_ece: on the uncorrupted images; ``n``: images; ``seed``: the seed.
    """

    corruptions: list[str]
    severities: list[int]
    accuracy: dict[str, list[float]]
    mean_accuracy: float
    ece: list[float]
    confidence: list[float]
    clean_accuracy: float
    clean_ece: float
    n: int
    seed: int
    n_bins: int = 15
    parameters: str = "monotone"
    mean_ece: float = field(init=False)

    def __post_init__(self):
        self.mean_ece = float(np.mean(self.ece)) if self.ece else float("nan")

    def by_severity(self) -> list[float]:
        """Accuracy per severity, mean over the types."""
        return [float(np.mean([self.accuracy[c][j] for c in self.corruptions])) for j in range(len(self.severities))]

    def to_json(self) -> dict:
        return {"corruptions": list(self.corruptions), "severities": list(self.severities),
                "accuracy": {k: list(v) for k, v in self.accuracy.items()}, "mean_accuracy": self.mean_accuracy,
                "accuracy_by_severity": self.by_severity(), "ece": list(self.ece), "mean_ece": self.mean_ece,
                "confidence": list(self.confidence), "clean_accuracy": self.clean_accuracy,
                "clean_ece": self.clean_ece, "n": self.n, "seed": self.seed, "n_bins": self.n_bins,
                "parameters": self.parameters}


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        return x.float(), torch.as_tensor(y).long()
    if hasattr(data, "tensors"):
        x, y = data.tensors()
        return x.float(), y.long()
    raise TrustVisionError("corruption_accuracy() takes an ImageDataset or an (images, labels) pair of tensors")


@torch.no_grad()
def _corrupt_predict(model: torch.nn.Module, xb: torch.Tensor, name: str, severity: int, seed: int, start: int,
                     parameters: str) -> torch.Tensor:
    """One unit of :func:`corruption_accuracy`: the softmax (float64, CPU) of ``model`` on the
    images ``xb`` (items ``start ..`` of the data) under one corruption and severity."""
    p = next(iter(model.parameters()), None)
    dev = xb.device if p is None else p.device
    with torch.no_grad():
        xc = corrupt(xb, name, severity, seed, indices=range(start, start + xb.shape[0]), parameters=parameters)
        return torch.softmax(model(xc.to(dev)).double(), 1).cpu()


def corruption_accuracy(model: torch.nn.Module, data, severities: Sequence[int] = SEVERITIES,
                        corruptions: Sequence[str] | None = None, batch_size: int = 256, seed: int = 0,
                        device: str | torch.device = "cpu", n_bins: int = 15,
                        track: Callable[..., Iterable] | None = None,
                        parameters: str = "monotone", executor: Any = None, cache: Any = None) -> CorruptionResult:
    """Accuracy of ``model`` on ``data`` (an ImageDataset or ``(images, labels)``) under every
    corruption (default all 15) at every severity, the mean over them all, and the ECE per severity
    (pooled over types; :func:`trustvision.evaluate.calibration.expected_calibration_error`,
    ``n_bins`` equal-width bins). Image i is seeded from ``(seed, type, i)``. ``track(iterable,
    total, description)`` may wrap the loop over type x severity in a progress bar. ``parameters``:
    the parameter set, "monotone" (default) or "published" (:func:`corruption_params`).

    The work comes in units of one batch under one corruption and severity
    (:mod:`trustvision._utils.parallel`): ``executor`` (``map(fn, calls)``, e.g. a Ray pool) runs
    them elsewhere, with the same result (each image's corruption is seeded by its index, never
    by the batch); with ``cache`` (the audit's scratch store) each unit's probabilities are stored
    as it finishes and found again by a resumed run."""
    from trustvision._utils.digest import digest, tensor_from_json, tensor_to_json, weights_digest
    from trustvision._utils.parallel import Unit, run_units

    _check_parameters(parameters)
    names = list(corruptions) if corruptions is not None else list_corruptions()
    for c in names:
        _CORRUPTIONS.get(c)
    sev = [_check_severity(s) for s in severities]
    if not names or not sev:
        raise TrustVisionError("corruption_accuracy() needs at least one corruption and one severity")
    x, y = _as_tensors(data)
    if x.shape[0] == 0:
        raise TrustVisionError("corruption_accuracy() got no images")
    was_training = model.training
    model.eval()
    starts = list(range(0, x.shape[0], batch_size))
    try:
        with torch.no_grad():
            clean = torch.cat([torch.softmax(model(x[a:a + batch_size].to(device)).double(), 1).cpu()
                               for a in starts])
        prefix = digest(weights_digest(model), parameters, int(seed)) if cache is not None else None
        jobs = [(c, s) for c in names for s in sev]
        units = [Unit((x[a:a + batch_size], c, s, int(seed), a, parameters),
                      key=None if prefix is None else digest(prefix, c, s, a, x[a:a + batch_size]))
                 for c, s in jobs for a in starts]
        results = run_units(model, _corrupt_predict, units, executor=executor, cache=cache, encode=tensor_to_json,
                            decode=lambda d, u: tensor_from_json(d))
        it = track(jobs, total=len(jobs), description="corruptions") if track else jobs
        probs: dict[tuple[str, int], torch.Tensor] = {}
        for c, s in it:
            probs[(c, s)] = torch.cat([next(results) for _ in starts])
    finally:
        model.train(was_training)
    acc = {c: [float((probs[(c, s)].argmax(1) == y).double().mean()) for s in sev] for c in names}
    eces, confs = [], []
    for s in sev:
        p = torch.cat([probs[(c, s)] for c in names])
        eces.append(expected_calibration_error(p, y.repeat(len(names)), n_bins))
        confs.append(float(p.max(1).values.mean()))
    return CorruptionResult(
        corruptions=names, severities=sev, accuracy=acc,
        mean_accuracy=float(np.mean([v for row in acc.values() for v in row])), ece=eces, confidence=confs,
        clean_accuracy=float((clean.argmax(1) == y).double().mean()),
        clean_ece=expected_calibration_error(clean, y, n_bins), n=int(x.shape[0]), seed=int(seed), n_bins=n_bins,
        parameters=parameters)
