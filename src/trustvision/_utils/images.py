"""Helpers shared by the explanation methods and the faithfulness metric.

Target resolution, input checks, Gaussian-blur baselines scaled to the image size (and, for the
mask optimisers, a blur strengthened per image until the model no longer sees the class in it),
mask upsampling, patch masks, and chunked evaluation (the ``internal_batch_size`` knob, fixed or
chosen from the model's measured pass time and memory).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator, Sequence, Union

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
    "blur_ladder",
    "gaussian_blur",
    "make_baseline",
    "baseline_probability",
    "uninformative_baseline",
    "baseline_levels",
    "BASELINE_KEEPS",
    "default_mask_size",
    "as_pair",
    "upsample",
    "patch_masks",
    "chunks",
    "AutoChunk",
    "class_probability",
]

TargetType = Union[None, int, Sequence[int], torch.Tensor]
BaselineType = Union[str, float, torch.Tensor]


def check_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Return ``inputs`` as a float (N, C, H, W) batch; a single (C, H, W) image gets N = 1; an
    empty batch (N = 0) is refused."""
    if not isinstance(inputs, torch.Tensor):
        raise TrustVisionError(f"inputs must be a torch.Tensor of images, got {type(inputs).__name__}")
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4:
        raise TrustVisionError(
            f"inputs must be images of shape (N, C, H, W), got shape {tuple(inputs.shape)}"
        )
    if inputs.shape[0] == 0:
        raise TrustVisionError(f"inputs is an empty batch, shape {tuple(inputs.shape)}: there is no image to use")
    if not inputs.is_floating_point():
        inputs = inputs.float()
    return inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm/Dropout fixed) and restore every module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    training = any(flag for _, flag in flags)
    if training:  # (a model already in eval mode is left alone: nothing to set or restore)
        model.eval()
    try:
        yield model
    finally:
        if training:
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


_KERNELS: dict = {}


def _gauss_kernel(k: int, sigma: float, device, dtype) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``k`` taps (kept per size, sigma, device and dtype: the
    adaptive baseline asks for the same few blurs for every image)."""
    key = (k, float(sigma), str(device), dtype)
    g = _KERNELS.get(key)
    if g is None:
        if len(_KERNELS) > 256:
            _KERNELS.clear()
        r = torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g = _KERNELS[key] = g / g.sum()
    return g


def gaussian_blur(
    x: torch.Tensor, kernel_size: int | None = None, sigma: float | None = None
) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, H, W) batch (reflect borders, replicate if too small)."""
    n, c, h, w = x.shape
    if kernel_size is None or sigma is None:
        k0, s0 = blur_params(h, w)
        kernel_size = kernel_size or k0
        sigma = sigma or s0
    row, col = _blur_filters(kernel_size, sigma, c, x.device, x.dtype)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, row, groups=c)
    return F.conv2d(y, col, groups=c)


def _blur_filters(k: int, sigma: float, c: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column filters of :func:`gaussian_blur` for ``c`` channels (kept with the
    kernel)."""
    key = ("filters", k, float(sigma), c, str(device), dtype)
    hit = _KERNELS.get(key)
    if hit is None:
        g = _gauss_kernel(k, sigma, device, dtype)
        hit = _KERNELS[key] = (g.view(1, 1, 1, -1).expand(c, 1, 1, k), g.view(1, 1, -1, 1).expand(c, 1, k, 1))
    return hit


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


#: a baseline "keeps the class" when the model's probability of the class on it is at least this
#: fraction of its probability on the image itself (the deletion game then cannot be won)
BASELINE_KEEPS = 0.5


def blur_ladder(height: int, width: int) -> list[tuple[int, float] | None]:
    """Ever stronger blurs: the paper's scaled blur (:func:`blur_params`), then kernel radius and
    sigma doubled until the kernel spans the image, then ``None``: the image's mean colour per
    channel (the limit of an infinitely wide blur).

    8x8 -> (3, 1.8), (5, 3.6), (9, 7.1), (17, 14.3), mean; 224x224 -> (51, 50), (101, 100), (201, 200),
    (401, 400), (801, 800), mean.
    """
    k, sigma = blur_params(height, width)
    levels: list[tuple[int, float] | None] = [(k, sigma)]
    radius = k // 2
    while 2 * radius + 1 < 2 * max(height, width) + 1:
        radius, sigma = radius * 2, sigma * 2
        levels.append((2 * radius + 1, sigma))
    levels.append(None)
    return levels


#: what comes after the blurs when even the mean colour keeps the class (colour is the evidence):
#: constant images without colour, grey then black
_CONSTANT_LEVELS = (("grey image", 0.5), ("black image", 0.0))


def baseline_levels(height: int, width: int) -> list[str]:
    """Names of the levels :func:`uninformative_baseline` tries, weakest first: the blurs of
    :func:`blur_ladder` ("blurred image"), the image's mean colour, a grey and a black image."""
    n_blur = len(blur_ladder(height, width)) - 1
    return ["blurred image"] * n_blur + ["mean-colour image"] + [name for name, _ in _CONSTANT_LEVELS]


def _baseline_level(x: torch.Tensor, level: int, ladder: list) -> torch.Tensor:
    if level < len(ladder) - 1:
        return gaussian_blur(x, *ladder[level])
    if level == len(ladder) - 1:
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    return torch.full_like(x, _CONSTANT_LEVELS[level - len(ladder)][1])


@torch.no_grad()
def baseline_probability(model: nn.Module, baseline: torch.Tensor, target: torch.Tensor,
                         batch_size: "int | None | AutoChunk" = None) -> torch.Tensor:
    """The model's probability of class ``target[i]`` on image ``baseline[i]``: (N,), in chunks of
    ``batch_size`` images (None: all at once; an :class:`AutoChunk`: its chunking)."""
    total = baseline.shape[0]
    parts: list[torch.Tensor] = []

    def work(sl: slice) -> None:  # (a pass in one piece takes the tensors whole)
        whole = sl.stop - sl.start == total
        parts.append(class_probability(model, baseline if whole else baseline[sl], target if whole else target[sl]))

    chunker = batch_size if isinstance(batch_size, AutoChunk) else AutoChunk(batch_size or total)
    chunker.run(total, work)
    out = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else baseline.new_empty(0)
    return out if out.dtype == baseline.dtype else out.to(baseline.dtype)


@torch.no_grad()
def uninformative_baseline(
    model: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    image_probability: torch.Tensor | None = None,
    keeps: float = BASELINE_KEEPS,
    batch_size: "int | None | AutoChunk" = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per image, the weakest baseline of :func:`baseline_levels` that does not keep the class.

    The paper's blur (51 / 50 at 224 px, scaled) is tried first; an image whose blurred version
    still gives the model ``keeps`` (0.5) or more of the class probability it gives the image
    itself is blurred harder (kernel radius and sigma doubled), up to its mean colour; where even
    the mean colour keeps the class (the colour is the evidence), a grey and then a black image
    are tried. An image that keeps the class on every level gets the level on which the
    probability was lowest; the caller flags it (the returned probability says by how much).

    Returns the baselines (N, C, H, W), the class probability on them (N,), the level used per
    image (N,) (indices into :func:`baseline_levels`: 0 = the paper's blur) and the number of
    images the model was run on. Each image's choice depends on that image alone (a batch gives
    the same baselines as one image at a time).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Brightness(nn.Module):  # p(class 0) = sigmoid(10 * (mean - 0.3)): blurs keep it
        ...     def forward(self, x):
        ...         v = 10 * (x.mean((1, 2, 3)) - 0.3)
        ...         return torch.stack([v, torch.zeros_like(v)], 1)
        >>> x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.5
        >>> t = torch.zeros(2, dtype=torch.long)
        >>> base, p, level, runs = uninformative_baseline(Brightness(), x, t)
        >>> [baseline_levels(8, 8)[i] for i in level.tolist()], runs  # only black removes the class
        (['black image', 'black image'], 16)
    """
    x = check_inputs(inputs)
    n, _, h, w = x.shape
    t = target.to(x.device)
    runs = 0
    if image_probability is None:
        image_probability = baseline_probability(model, x, t, batch_size)
        runs += n
    # (the bookkeeping per image in Python floats: the same decisions as on the tensors, since
    # keeps * p and the comparisons are exact in both, with a handful of small operations)
    limit = [keeps * v for v in image_probability.to(x.dtype).tolist()]
    ladder = blur_ladder(h, w)
    best = [math.inf] * n
    level_of = [0] * n
    chosen: list = [None] * n  # per image (the level's baselines, its row there)
    todo = list(range(n))
    for j in range(len(baseline_levels(h, w))):
        idx = None if len(todo) == n else torch.tensor(todo, device=x.device)
        b = _baseline_level(x if idx is None else x[idx], j, ladder)
        p = baseline_probability(model, b, t if idx is None else t[idx], batch_size).tolist()
        runs += b.shape[0]
        for r, i in enumerate(todo):
            if p[r] < best[i] or chosen[i] is None:  # (a NaN probability keeps the first level)
                best[i], level_of[i], chosen[i] = p[r], j, (b, r)
        todo = [i for r, i in enumerate(todo) if p[r] >= limit[i]]
        if not todo:
            break
    if n == 1:
        base = chosen[0][0]
    else:
        base = torch.empty_like(x)
        for b in {id(bb): bb for bb, _ in chosen}.values():  # one copy per level's batch
            mine = [(i, r) for i, (bb, r) in enumerate(chosen) if bb is b]
            dest = torch.tensor([i for i, _ in mine], device=x.device)
            base[dest] = b[torch.tensor([r for _, r in mine], device=x.device)]
    return (base, torch.tensor(best, device=x.device, dtype=x.dtype),
            torch.tensor(level_of, dtype=torch.long, device=x.device), runs)


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


def _memory_budget(device: torch.device) -> int:
    """Bytes a chunk of rows may use: half the free memory of a GPU; on the CPU a quarter of the
    available memory, at most 8 GiB (2 GiB when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024 // 4, 8 << 30)
    except OSError:
        pass
    return 2 << 30


class AutoChunk:
    """Chunk sizes of repeated batched passes: fixed, or chosen online from measured time and memory.

    With ``fixed`` (a user's ``internal_batch_size``) every pass is cut in the fewest pieces of at
    most that many rows, of equal size within one row (few distinct shapes). Otherwise the first chunks of the first passes are probes of ``start``,
    ``2 * start``, ``4 * start``, ... rows (real work, nothing is computed twice): each is timed
    (synchronised on a GPU) and, for passes with a backward, the bytes autograd saves per row
    are counted. Every size is probed ``PROBES`` times and keeps its fastest (the first call at a
    new batch shape can cost several times the next: kernels and buffers are made for it).
    Doubling stops once two sizes in a row are not 10% faster per row than every smaller one
    (on a CPU a model's time per row often holds still from 2 to 4 rows and falls again at 8),
    or when the next size would not fit the memory budget (:func:`_memory_budget`, with 2x
    headroom on the saved bytes). Then every size is probed once more, smallest first, and from
    then on passes are cut into equal chunks of at most the largest size within 3% of the fastest
    measured (within it a larger chunk makes fewer calls). The small sizes are probed at the start
    of a run, when its passes can be slower than later on (memory being mapped, caches cold), so
    each gets a second look before the choice; a wider tolerance (10% until 2026-12) kept chunks
    up to 10% slower per row than the best.
    ``start``: the largest power of two whose rows hold at most 256 KiB of input (1 row for a
    224 px RGB image, 1024 for an 8x8 digit).

    Only the speed depends on the choice; results agree to float rounding whatever the chunking.

    Example:
        >>> seen = []
        >>> AutoChunk(fixed=3).run(7, lambda sl: seen.append((sl.start, sl.stop)))
        >>> seen  # at most 3 rows per piece, in pieces of equal size (within one row)
        [(0, 2), (2, 4), (4, 7)]
    """

    PROBES = 3  # timed probes per size
    KEEP = 1.03  # after the second look, the largest size within 3% of the fastest is kept

    def __init__(self, fixed: int | None = None, *, row_bytes: int = 4, device: torch.device | str = "cpu",
                 grad: bool = False, max_rows: int | None = None):
        self.fixed = int(fixed) if fixed else None
        self.device = torch.device(device)
        self.grad = bool(grad)
        self.row_bytes = max(1, int(row_bytes))
        start = 1 << max(0, int(math.floor(math.log2(max(1, (256 << 10) // self.row_bytes)))))
        self.max_rows = max_rows
        self.size = start if max_rows is None else max(1, min(start, max_rows))
        self.best: int | None = None
        self._rates: dict[int, float] = {}  # size -> its fastest rows per second
        self._tries: dict[int, int] = {}  # size -> probes timed
        self._flat = 0  # sizes in a row not faster than the smaller ones
        self._confirm: list[int] | None = None  # sizes left to probe once more before choosing

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def chunk_size(self) -> int | None:
        """The size in use: the fixed one, the chosen one, or None while still probing."""
        return self.fixed or self.best

    def run(self, total: int, fn: Callable[[slice], None]) -> None:
        """Call ``fn(slice)`` on pieces covering ``range(total)``, in order."""
        if total <= 0:
            return
        size = self.chunk_size()
        if total <= (size or self.size - 1):  # one piece (while probing: a remainder, not a probe)
            fn(slice(0, total))
            return
        if size is not None:
            parts = math.ceil(total / size)  # pieces of equal size (within one row): few shapes
            bounds = [i * total // parts for i in range(parts + 1)]
            for a, b in zip(bounds, bounds[1:]):
                fn(slice(a, b))
            return
        start = 0
        while start < total:
            size = self.chunk_size()
            if size is not None:  # decided during this pass: the rest in chosen pieces
                self.run(total - start, lambda sl: fn(slice(sl.start + start, sl.stop + start)))
                return
            rows = min(self.size, total - start)
            sl = slice(start, start + rows)
            if rows < self.size:  # a remainder: not a probe of this size
                fn(sl)
            else:
                self._probe(sl, fn)
            start += rows

    def _probe(self, sl: slice, fn: Callable[[slice], None]) -> None:
        rows = sl.stop - sl.start
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        self._sync()
        t0 = time.perf_counter()
        if self.grad and self.max_rows is None:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(sl)
        else:
            fn(sl)
        self._sync()
        seconds = max(time.perf_counter() - t0, 1e-9)
        if self.max_rows is None:
            per_row = 2 * saved[0] / rows + 4 * self.row_bytes
            self.max_rows = max(1, int(_memory_budget(self.device) // per_row))
        self._rates[rows] = max(self._rates.get(rows, 0.0), rows / seconds)
        self._tries[rows] = self._tries.get(rows, 0) + 1
        if self._confirm is not None:  # the second look: once more each, smallest first
            self._confirm = [s for s in self._confirm if s != rows]
        else:
            if self._tries[rows] < self.PROBES and rows <= self.max_rows:
                return  # (the same size again)
            smaller = [r for s, r in self._rates.items() if s < rows]
            self._flat = 0 if not smaller or self._rates[rows] > 1.1 * max(smaller) else self._flat + 1
            if not (self._flat >= 2 or 2 * rows > self.max_rows):
                self.size = 2 * rows
                return
            self._confirm = sorted(s for s in self._rates if s <= self.max_rows)
            if len(self._confirm) == 1:  # (one size: nothing to compare it with)
                self._confirm = []
        if self._confirm:
            self.size = self._confirm[0]
        else:
            self._choose()

    def _choose(self) -> None:
        fastest = max(self._rates.values())
        self.best = min(max(s for s, r in self._rates.items() if r >= fastest / self.KEEP), self.max_rows)
