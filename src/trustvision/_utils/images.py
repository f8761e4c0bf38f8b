"""Helpers shared by the explanation methods and the faithfulness metric.

Target resolution, input checks, Gaussian-blur baselines scaled to the image size, mask
upsampling, patch masks, and chunked evaluation (the ``internal_batch_size`` knob).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from trustvision.errors import TrustVisionError

__all__ = [
    "TargetType",
    "BaselineType",
    "check_inputs",
    "resolve_target",
    "eval_mode",
    "blur_params",
    "gaussian_blur",
    "make_baseline",
    "default_mask_size",
    "as_pair",
    "upsample",
    "patch_masks",
    "chunks",
    "class_probability",
]

TargetType = Union[None, int, Sequence[int], torch.Tensor]
BaselineType = Union[str, float, torch.Tensor]


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Return ``inputs`` as a float (N, C, H, W) batch; a single (C, H, W) image gets N = 1."""
    if not isinstance(inputs, torch.Tensor):
        raise TrustVisionError(f"inputs must be a torch.Tensor of images, got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4:
        raise TrustVisionError(
            f"inputs must be images of shape (N, C, H, W), got shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        inputs = inputs.float()
    return inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm/Dropout fixed) and restore every module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def resolve_target(model: nn.Module, inputs: torch.Tensor, target: TargetType) -> torch.Tensor:
    """Class index per image, (N,) long on the inputs' device; ``None`` = the predicted class."""
    n = inputs.shape[0]
    if target is None:
        return model(inputs).argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.long, device=inputs.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise TrustVisionError(f"target has {t.numel()} entries for {n} images; give one per image")
    return t


def class_probability(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax probability of class ``target[i]`` for image ``x[i]``: (N,)."""
    return torch.softmax(model(x), dim=1).gather(1, target.view(-1, 1)).squeeze(1)


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def blur_params(height: int, width: int) -> tuple[int, float]:
    """Gaussian kernel size and sigma of the I-GOS blur (51, 50 at 224 px), scaled to the image.

    The kernel stays odd and at least 3 wide, so even 8x8 images get a real blur.
    """
    scale = min(height, width) / 224.0
    k = max(3, int(round(51 * scale)))
    if k % 2 == 0:
        k += 1
    return k, max(50.0 * scale, 0.5)


def _gauss_kernel(k: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(
    x: torch.Tensor, kernel_size: int | None = None, sigma: float | None = None
) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, H, W) batch (reflect borders, replicate if too small)."""
    n, c, h, w = x.shape
    if kernel_size is None or sigma is None:
        k0, s0 = blur_params(h, w)
        kernel_size = kernel_size or k0
        sigma = sigma or s0
    g = _gauss_kernel(kernel_size, sigma, x.device, x.dtype)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    return y


def make_baseline(inputs: torch.Tensor, baselines: BaselineType) -> torch.Tensor:
    """The reference images B, same shape as ``inputs``.

    ``"blur"``: Gaussian blur scaled to the image size; ``"zero"``/``"black"``: zeros; a number:
    a constant image; a tensor broadcastable to the inputs: that tensor.
    """
    if isinstance(baselines, str):
        if baselines == "blur":
            return gaussian_blur(inputs)
        if baselines in ("zero", "black"):
            return torch.zeros_like(inputs)
        raise TrustVisionError(
            f"unknown baseline {baselines!r}; use 'blur', 'zero', a number or a tensor"
        )
    if isinstance(baselines, (int, float)):
        return torch.full_like(inputs, float(baselines))
    if isinstance(baselines, torch.Tensor):
        try:
            return baselines.to(inputs.device, inputs.dtype).expand_as(inputs).clone()
        except RuntimeError:
            raise TrustVisionError(
                f"baseline of shape {tuple(baselines.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}"
            ) from None
    raise TrustVisionError(f"baselines must be 'blur', 'zero', a number or a tensor, got {baselines!r}")


def default_mask_size(height: int, width: int) -> tuple[int, int]:
    """I-GOS mask resolution: 28x28 at 224 px (an eighth), at least 16, full resolution below.

    8x8 -> 8x8, 28x28 -> 16x16, 32x32 -> 16x16, 224x224 -> 28x28, 448x448 -> 56x56.
    """

    def one(s: int) -> int:
        return min(s, max(16, int(round(s / 8))))

    return (one(height), one(width))


def upsample(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of a (N, 1, h, w) mask to ``size``; identity when sizes agree."""
    size = as_pair(size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def patch_masks(sets: torch.Tensor, grid: tuple[int, int], size: Sequence[int]) -> torch.Tensor:
    """Pixel masks (M, 1, H, W) of patch indicator vectors ``sets`` (M, gh*gw) on a grid.

    Patch ``r * gw + c`` covers rows ``[floor(r*H/gh), floor((r+1)*H/gh))`` (likewise columns), so
    grids that do not divide the image still tile it exactly.
    """
    gh, gw = grid
    h, w = as_pair(size)
    rows = torch.div(torch.arange(h, device=sets.device) * gh, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w, device=sets.device) * gw, w, rounding_mode="floor")
    cells = sets.reshape(-1, gh, gw).to(torch.float32)
    return cells[:, rows][:, :, cols].unsqueeze(1)


def chunks(total: int, size: int | None) -> Iterator[slice]:
    """Slices covering ``range(total)`` in pieces of at most ``size`` (all at once if None)."""
    size = total if not size or size <= 0 else int(size)
    for start in range(0, total, max(size, 1)):
        yield slice(start, min(start + size, total))


def num_chunks(total: int, size: int | None) -> int:
    size = total if not size or size <= 0 else int(size)
    return math.ceil(total / max(size, 1))
