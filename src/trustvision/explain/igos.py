"""I-GOS and iGOS++: mask optimisation with integrated-gradient descent directions, batched.

References:
    Qi, Khorram, Li. "Visualizing Deep Networks by Optimizing with Integrated Gradients." AAAI 2020.
    Khorram, Lawson, Li. "iGOS++: Integrated Gradient Optimized Saliency by Bilateral
    Perturbations." ACM CHIL 2021.

Both follow Captum's contract: ``IGOS(model).attribute(inputs, target=None, ...)`` returns
heatmaps of shape (N, 1, H, W), higher = more important. Unlike the reference code, the whole
batch is optimised together: masks, the integrated gradients (all ``ig_steps`` points of all
images, in chunks whose size is measured from the model's own pass time and memory, or
``internal_batch_size``) and a per-image Armijo line search (every image keeps its own step size;
only images still searching are re-evaluated).

Why masks stayed blank, and what is done about it (each has a test in tests/explain/test_igos.py):

1. *Saturation.* The descent direction is the integrated gradient: the gradient of the class
   score averaged over the points ``alpha * M`` (alpha = 1/K..1), with noise on each. At ``M = 1``
   a confident model's softmax is saturated: deleting a few cells does not move the score at the
   mask itself while the area term grows, so the direction is an *ascent* direction of that one
   point and an Armijo test on it rejects every step. The line search first judges steps on the
   objective itself (what the heatmap is judged by); where no step passes and the class score at
   the mask is saturated (>= 0.9, or the mask has not moved yet), it judges them on the
   integrated objective with this iteration's noise (the function whose gradient the direction
   is; old and new values on the same noise, the old one free from the gradient pass). Where
   even that finds no step because no affordable deletion lowers the class score, the area
   weight of that image is divided by 4 (at most 3 times) so that its most important cells can
   go; ``ExplanationInfo.area_weight`` says where.
2. *Noise that changes the model's mind.* The paper's noise (0.2 in normalised units) makes a
   texture classifier see another texture everywhere on the path (p -> 0), or on a flat baseline
   the very texture explained (p -> 1), and a small digits net see one class: no gradient. The noise is halved per image until it moves the
   class probability by at most 0.2 on the image, halfway to the baseline and on the baseline
   (``ExplanationInfo.noise_std``).
3. *A baseline that keeps the class.* The paper's blur, scaled to small images, leaves the class
   in the image (p = 0.95-1.0 at 32 px). By default the blur is strengthened per image until the
   model's probability of the class on it is below half of that on the image, up to the mean
   colour, then a grey and a black image
   (:func:`~trustvision._utils.images.uninformative_baseline`); an image whose baseline keeps
   the class anyway is flagged.

Noise. Each image's noise is drawn from a generator seeded by (``seed``, a hash of the image's
pixels, the iteration), so an image gets the same heatmap alone, in any batch, in any order and
with any chunking (to float rounding).

Precision. ``attribute(..., autocast=True)`` runs the model's passes of the optimisation under
bf16 autocast (``torch.autocast`` on the inputs' device, CPU or CUDA) while the masks, losses, line
search and heatmaps stay float32. The heatmaps are not the float32 ones bit for bit; they agree
in rank as far as bf16 leaves the model's own gradients alone: on the trained digits CNN a mean
Spearman of 0.97 (I-GOS) and 0.99 (iGOS++), closer than a new noise seed (0.92 / 0.95), on a
random-weight ResNet-50, whose input gradients bf16 changes almost entirely, 0.25 / 0.34
(``tests/explain/test_autocast.py``, ``benchmarks/gpu_check.py``).

Reliability. :class:`~trustvision.explain.ExplanationInfo` flags per image a low confidence, a
class the model does not predict, a baseline on which the model still sees the class, and a
constant heatmap (the mask did not move), with the reasons in words; ``unreliable`` is any of
them and an :class:`~trustvision.explain.ExplanationWarning` says how many and why.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> heat = IGOS(net).attribute(torch.rand(2, 1, 8, 8), iterations=2, ig_steps=2)
    >>> tuple(heat.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

import hashlib
import struct
import time
import warnings
from typing import Sequence

import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision._utils.images import (
    BASELINE_KEEPS,
    AutoChunk,
    BaselineType,
    TargetType,
    as_pair,
    baseline_levels,
    baseline_probability,
    check_inputs,
    default_mask_size,
    eval_mode,
    make_baseline,
    resolve_target,
    uninformative_baseline,
    upsample,
)
from trustvision.explain._base import (
    ExplanationInfo,
    ExplanationWarning,
    Explainer,
    constant_heatmaps,
    reliability_warning,
)

__all__ = ["IGOS", "IGOSPlusPlus", "ExplanationInfo", "ExplanationWarning", "total_variation"]

ARMIJO_C1 = 1e-4  # sufficient-decrease constant
ARMIJO_SHRINK = 0.2  # step *= 0.2 on failure
INITIAL_STEP = 1.0  # first trial step, in units of 1 / max|g| over the cells that can move
MIN_STEP = 1e-5  # give up when the largest cell change falls below this (8 trials)
MIN_STEP_INTEGRATED = 1e-3  # the same on the integrated fallback (5 trials)
# A step must lower the objective (a sum of probabilities and penalties, O(1)) by more than this:
# smaller changes are float32 rounding (a batch and its chunks differ there), not progress.
MIN_DECREASE = 1e-6
LINE_SEARCH_POINTS = 5  # integrated-gradient points the fallback scores (alpha = 0.2, 0.4, ..., 1)
SATURATED = 0.9  # a class probability this high at the mask: the softmax is saturated there
AREA_LOWERINGS = 3  # a mask that does not move gets its area weight divided by 4, at most 3 times
CONSTANT_TOL = 1e-4  # a heatmap whose max - min is below this did not move
NOISE_CHANGE = 0.2  # noise may move the class probability by at most this much (mean |dp|)
NOISE_DRAWS = 2  # noisy copies per image, point and noise level in that check
NOISE_HALVINGS = 6  # the noise is halved at most this many times, then switched off

def check_autocast(autocast) -> bool:
    """``autocast`` as a bool (a one-line error for anything else, e.g. the string ``"bf16"``)."""
    if not isinstance(autocast, bool):
        raise TrustVisionError(f"autocast must be true or false (the model's passes in bf16 autocast), "
                               f"got {autocast!r}")
    return autocast


def model_logits(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """``model(x)``; with ``autocast`` run under ``torch.autocast(x.device.type, torch.bfloat16)``
    (the backward through it follows) and the bf16 logits cast to float32, so that everything
    computed from them (softmax, losses, line search) stays float32."""
    if not autocast:
        return model(x)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        out = model(x)
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertical and horizontal neighbours, per image: (N,)."""
    dv = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1)
    dh = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1)
    zero = mask.new_zeros(mask.shape[0])
    return (dv.mean(1) if dv.shape[1] else zero) + (dh.mean(1) if dh.shape[1] else zero)


def _weighted_tv(mask_up: torch.Tensor, image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Image-weighted TV of a full-resolution mask: weights exp(-||dI||^2 / sigma), per image."""
    wv = torch.exp(-(image[..., 1:, :] - image[..., :-1, :]).pow(2).sum(1, keepdim=True) / sigma)
    wh = torch.exp(-(image[..., :, 1:] - image[..., :, :-1]).pow(2).sum(1, keepdim=True) / sigma)
    dv = (wv * (mask_up[..., 1:, :] - mask_up[..., :-1, :]).pow(2)).flatten(1)
    dh = (wh * (mask_up[..., :, 1:] - mask_up[..., :, :-1]).pow(2)).flatten(1)
    zero = mask_up.new_zeros(mask_up.shape[0])
    return (dv.mean(1) if dv.shape[1] else zero) + (dh.mean(1) if dh.shape[1] else zero)


def _image_keys(x: torch.Tensor) -> list[int]:
    """A 64-bit key per image from its pixels (identical images share it)."""
    flat = x.detach().to("cpu", torch.float32).contiguous().view(x.shape[0], -1)
    return [int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little")
            for row in flat]


def _noise_seed(seed: int, key: int, iteration: int) -> int:
    """The seed of one image's noise in one iteration: a hash of (seed, image key, iteration)."""
    packed = struct.pack("<qQq", int(seed), key, int(iteration))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class _MaskExplainer(Explainer, register=False):
    """Shared machinery: batched integrated gradients of the class score w.r.t. masks, and a
    projected descent with a per-image Armijo line search (see the module docstring).
    Subclasses define the state (one or two masks), the objective and the heatmap.

    Args:
        model: classifier on [0, 1] images (N, C, H, W) returning logits.
        low_confidence: images whose explained class has a lower probability are flagged (and
            a warning is raised): the method works poorly there (0.5).
        line_search_group: Armijo trial steps scored per batched pass; the result does not
            depend on it, only the work: more trials per pass mean fewer model calls but more
            trials scored in vain (most steps are accepted at the 1st to 3rd trial). ``None``
            (default): measured, from 2 to 8, as many as fit in rows that cost the model at most
            twice two rows (a tiny model is called, not computed: 8; a ResNet on a CPU: 2).
        line_search_points: integrated-gradient points the line search scores per term (5,
            spread evenly over alpha, the last one alpha = 1; at most ``ig_steps``).
    """

    kind = "heatmap"
    in_audit = True
    n_masks = 1

    def __init__(self, model: nn.Module, low_confidence: float = 0.5, line_search_group: int | None = None,
                 line_search_points: int = LINE_SEARCH_POINTS):
        super().__init__(model)
        self.low_confidence = float(low_confidence)
        self.line_search_group = None if line_search_group is None else int(line_search_group)
        self.line_search_points = int(line_search_points)
        self._chunkers: dict = {}
        self._cheap: dict = {}

    # -- pieces a subclass defines ---------------------------------------------------------

    def _terms(self, z: torch.Tensor) -> list[tuple[int, int, torch.Tensor, float]]:
        """Score terms of the objective: (source of kept pixels, source of replaced pixels,
        mask, sign); source 0 = image, 1 = baseline. Each term is sign * p_c(Phi(X, Y, mask))."""
        raise NotImplementedError

    def _chain(self, z: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """Map the gradients w.r.t. each term's mask back to the state ``z``."""
        raise NotImplementedError

    def _regulariser(self, z: torch.Tensor, images: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
        """Area and smoothness penalties per image (N,)."""
        raise NotImplementedError

    def _heat(self, z: torch.Tensor) -> torch.Tensor:
        """Low-resolution heatmap (N, 1, h, w) from the state."""
        raise NotImplementedError

    # -- the algorithm ---------------------------------------------------------------------

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        baselines: BaselineType = "adaptive-blur",
        mask_size: int | Sequence[int] | None = None,
        iterations: int = 15,
        ig_steps: int = 20,
        l1: float = 1.0,
        l2: float | None = None,
        noise: float | None = None,
        initial_step: float | None = None,
        autocast: bool = False,
        return_info: bool = False,
        return_mask: bool = False,
    ):
        """Heatmaps (N, 1, H, W) for ``inputs`` (N, C, H, W) in [0, 1]; higher = more important.

        Args:
            target: class per image (int, sequence or (N,) tensor); ``None`` = predicted class.
            baselines: ``"adaptive-blur"`` (default: the paper's Gaussian blur, kernel 51 /
                sigma 50 at 224 px scaled to the image, blurred harder per image until the
                model's probability of the class on it is below half of that on the image, up to
                the image's mean colour, then a grey and a black image; see
                :func:`~trustvision._utils.images.uninformative_baseline`), ``"blur"`` (the paper's
                scaled blur alone, the deletion/insertion metric's baseline), ``"zero"``, a
                number or a tensor broadcastable to ``inputs``. Whatever the choice, the model's
                probability of the class on the baseline is checked and an image whose baseline
                keeps the class is flagged.
            mask_size: mask resolution; ``None`` = 28x28 at 224 px, an eighth of the image but at
                least 16, full resolution for images of 16 px or less.
            iterations, ig_steps: descent iterations and integrated-gradient points (15, 20).
            l1: weight of the area term mean|1-M| (1).
            l2: weight of the (bilateral) TV term; ``None`` = 20 at the paper's 28x28 mask and
                20 * cells / 784 otherwise, so one cell's edge costs the same at every mask
                size (TV is a mean over neighbour pairs; on an 8x8 mask an unscaled 20 makes
                every hole cost more than the class score can gain).
            internal_batch_size: most rows (image x point x term) per forward/backward; ``None``
                = chosen from the model's measured time per pass and memory
                (:class:`~trustvision._utils.images.AutoChunk`; kept for later calls on the same
                shape).
            noise: std of the Gaussian noise added to every integrated-gradient point, in
                [0, 1] pixel units; ``None`` = 0.2 in normalised units (0.2 x the model's
                ``norm_std`` when it has one, else 0.2 x 0.225, ImageNet's std). Per image it is
                halved while it changes the model's mind (see the module docstring; the value
                used is ``ExplanationInfo.noise_std``). 0 disables it.
            initial_step: first Armijo step; ``None`` = per image 1 / max|g| over the cells that
                can move (the most important cell can move by a whole unit), then x0.2 until
                sufficient decrease.
            seed: seed of the noise (each image's noise is drawn from (seed, its pixels)).
            autocast: run the model's passes of the optimisation (the integrated gradients'
                forward + backward, the line search's forwards) under
                ``torch.autocast(<the inputs' device type>, torch.bfloat16)`` (CPU and CUDA;
                ``--method-kw autocast=true`` on the command line). Only the model runs in
                bf16: its logits are cast to float32, and the masks, the losses, the line search
                and the heatmaps stay float32. The explained class, the reported probabilities,
                the baseline and the noise check (a few forwards per image, deciding what is
                explained) run in float32 either way. The heatmaps agree with the float32 ones
                in rank, not bit for bit (see "Precision" in the module docstring). Default
                False.
            return_info: also return an :class:`ExplanationInfo` (it is always in
                ``self.last_info``).
            return_mask: return the low-resolution heatmap (N, 1, h, w) instead of upsampling.
        """
        x = check_inputs(inputs).detach()
        if iterations < 0 or ig_steps < 1:
            raise TrustVisionError("iterations must be >= 0 and ig_steps >= 1")
        autocast = check_autocast(autocast)
        n, _, h, w = x.shape
        mh, mw = default_mask_size(h, w) if mask_size is None else as_pair(mask_size)
        if mh < 1 or mw < 1:
            raise TrustVisionError(f"mask_size must be positive, got {mask_size!r}")
        if l2 is None:
            l2 = 20.0 * (mh * mw) / (28.0 * 28.0)
        if noise is None:
            std = getattr(self.model, "norm_std", None)
            noise = 0.2 * (float(std.float().mean()) if isinstance(std, torch.Tensor) else 0.225)
        device = x.device
        fw_chunk = self._chunker(x, False, internal_batch_size)  # the float32 set-up's forwards

        with eval_mode(self.model):
            with torch.no_grad():
                parts: list[torch.Tensor] = []
                fw_chunk.run(n, lambda sl: parts.append(torch.softmax(self.model(x[sl]), dim=1)))
                probs = torch.cat(parts)
            t = resolve_target(self.model, x, target) if target is not None else probs.argmax(1)
            p_t = probs.gather(1, t.view(-1, 1)).squeeze(1)
            setup_runs = n  # forward passes before the optimisation (counted in forward_passes)
            if isinstance(baselines, str) and baselines == "adaptive-blur":
                base, p_base, level, runs = uninformative_baseline(
                    self.model, x, t, p_t, batch_size=fw_chunk)
                names = baseline_levels(h, w)
                base_names = [names[j] for j in level.tolist()]
                setup_runs += runs
            else:
                base = make_baseline(x, baselines)
                p_base = baseline_probability(self.model, base, t, fw_chunk)
                base_names = [_baseline_name(baselines)] * n
                setup_runs += n
            keys = _image_keys(x)
            sigma, runs = self._calibrate_noise(x, base, t, float(noise), keys, int(seed), fw_chunk)
            setup_runs += runs
            k_ls = max(1, min(self.line_search_points, ig_steps))
            ls_points = [round((i + 1) * ig_steps / k_ls) - 1 for i in range(k_ls)]
            self._ctx = dict(
                autocast=autocast,
                src=torch.cat([x, base]), diff=torch.cat([x - base, base - x]), n=n, t=t,
                size=(h, w), images=x, keys=keys, seed=int(seed), sigma=sigma, noisy=bool((sigma > 0).any()),
                gen=torch.Generator(device=device), k=ig_steps, ls_points=ls_points,
                alphas=torch.arange(1, ig_steps + 1, device=device, dtype=x.dtype) / ig_steps,
                fb_chunk=self._chunker(x, True, internal_batch_size, autocast),
                fw_chunk=self._chunker(x, False, internal_batch_size, autocast),
                fb=0, fw=setup_runs, spec=self._term_spec(x.dtype), cheap=self._cheap_rows(x, autocast),
            )
            z = torch.ones(n, self.n_masks, mh, mw, device=device, dtype=x.dtype)
            failures = torch.zeros(n, dtype=torch.long)
            moved = torch.zeros(n, dtype=torch.long)
            area = torch.full((n,), float(l1), device=device, dtype=x.dtype)  # per image, see below
            lowered = torch.zeros(n, dtype=torch.long)
            real, p_del = self._objective(z, area, l2, with_score=True)
            everyone = torch.ones(n, dtype=torch.bool)
            for it in range(iterations):
                g_score, ls_score = self._direction(z, it)
                g, loss = self._penalised(z, g_score, ls_score, area, l2)
                z, real, p_del, failed, accepted = self._line_search(
                    z, g, loss, real, p_del, it, area, l2, initial_step, everyone)
                # Area continuation: a mask still constant after its line search means that no
                # deletion pays its area cost (a saturated model keeps the class until most of the
                # image is gone): its area weight is divided by 4 (at most AREA_LOWERINGS times in
                # all) and the step searched again at once, along the same integrated gradient
                # with the new penalty (no new gradient pass). Images whose mask moves are not
                # affected.
                while True:
                    stuck = torch.tensor(constant_heatmaps(self._heat(z), CONSTANT_TOL)) & (lowered < AREA_LOWERINGS)
                    if not bool(stuck.any()):
                        break
                    lowered += stuck.long()
                    area = torch.where(stuck.to(device), area / 4, area)
                    g, loss = self._penalised(z, g_score, ls_score, area, l2)
                    real, p_del = self._objective(z, area, l2, with_score=True)
                    z, real, p_del, failed2, accepted2 = self._line_search(
                        z, g, loss, real, p_del, it, area, l2, initial_step, stuck)
                    failed = torch.where(stuck, failed2, failed)
                    accepted = accepted | accepted2
                failures += failed.long()
                moved += accepted.long()
            final_loss = real
            heat = self._heat(z).detach()
            passes = (self._ctx["fb"], self._ctx["fw"])
            self._ctx = {}
        constant = constant_heatmaps(heat, CONSTANT_TOL)
        if not return_mask:
            heat = upsample(heat, (h, w))

        pred = probs.argmax(1)
        info = ExplanationInfo(
            target=t.tolist(),
            target_probability=[round(v, 6) for v in p_t.tolist()],
            predicted=pred.tolist(),
            low_confidence=(p_t < self.low_confidence).tolist(),
            not_predicted=(pred != t).tolist(),
            final_loss=final_loss.tolist(),
            forward_backward_passes=passes[0],
            forward_passes=passes[1],
            line_search_failures=failures.tolist(),
            accepted_steps=moved.tolist(),
            area_weight=area.tolist(),
            noise_std=[round(v, 6) for v in sigma.tolist()],
            constant=constant,
            baseline_probability=[round(v, 6) for v in p_base.tolist()],
            baseline_keeps_class=(p_base >= BASELINE_KEEPS * p_t).tolist(),
            low_confidence_threshold=self.low_confidence,
            baseline_name=base_names,
        )
        self.last_info = info
        message = reliability_warning(self.title, info)
        if message:
            warnings.warn(message, ExplanationWarning, stacklevel=3)  # the caller of attribute
        return (heat, info) if return_info else heat

    @torch.no_grad()
    def _calibrate_noise(self, x: torch.Tensor, base: torch.Tensor, t: torch.Tensor, sigma: float,
                         keys: list[int], seed: int, batch_size) -> tuple[torch.Tensor, int]:
        """Per image the noise std (N,) and the number of images the model ran on.

        ``sigma`` is halved until the noise leaves the class probability nearly as it is all along
        the path: on the image, halfway to the baseline and on the baseline, over ``NOISE_DRAWS``
        noisy copies of each the mean |p(. + noise) - p(.)| must stay within ``NOISE_CHANGE``
        (0.2). Noise that changes the model's mind gives no gradient: a texture classifier reads
        Gaussian noise of 0.05 as another texture (p -> 0 all along the path) or, on a flat
        baseline, as the very texture explained (p -> 1 all along the path); a small digits net
        reads noise as one class. After ``NOISE_HALVINGS`` halvings the noise is switched off.
        Each image's draws come from its own seed (independent of the batch)."""
        n = x.shape[0]
        out = torch.zeros(n, device=x.device, dtype=x.dtype)
        runs = 0
        if sigma <= 0:
            return out, runs
        points = torch.stack([x, 0.5 * (x + base), base], 1)  # (N, 3, C, H, W)
        npt = points.shape[1]
        clean = baseline_probability(self.model, points.flatten(0, 1), t.repeat_interleave(npt),
                                     batch_size).view(n, npt)
        runs += npt * n
        gen = torch.Generator(device=x.device)
        todo = list(range(n))
        for level in range(NOISE_HALVINGS + 1):
            sd = sigma * 0.5**level
            eps = []
            for i in todo:
                gen.manual_seed(_noise_seed(seed, keys[i], -1 - level))
                eps.append(torch.randn((NOISE_DRAWS, npt, *x.shape[1:]), generator=gen, device=x.device,
                                       dtype=x.dtype))
            idx = torch.tensor(todo, device=x.device)
            noisy = (points[idx].unsqueeze(1) + sd * torch.stack(eps)).flatten(0, 2)  # (r * D * 3, ...)
            tt = t[idx].repeat_interleave(NOISE_DRAWS * npt)
            p = baseline_probability(self.model, noisy, tt, batch_size).view(len(todo), NOISE_DRAWS, npt)
            runs += noisy.shape[0]
            change = (p - clean[idx].unsqueeze(1)).abs().mean(1)  # (r, 3)
            keep = (change <= NOISE_CHANGE).all(1).tolist()
            for i, k in zip(todo, keep):
                if k:
                    out[i] = sd
            todo = [i for i, k in zip(todo, keep) if not k]
            if not todo:
                break
        return out, runs

    @torch.no_grad()
    def _cheap_rows(self, x: torch.Tensor, autocast: bool = False) -> int:
        """The most rows one forward call takes for at most twice the time of two rows (measured
        once per image shape, 2, 4, ... 64 rows, best of two after a warm-up call): how many
        line-search trials a call can score nearly for free."""
        if self.line_search_group is not None:
            return 1
        key = (tuple(x.shape[1:]), x.dtype, str(x.device), autocast)
        if key not in self._cheap:
            def seconds(k: int) -> float:
                xb = x[:1].expand(k, *x.shape[1:]).contiguous()
                model_logits(self.model, xb, autocast)  # the first call at a new shape builds kernels: not timed
                best = float("inf")
                for _ in range(2):
                    if x.device.type == "cuda":
                        torch.cuda.synchronize(x.device)
                    t0 = time.perf_counter()
                    model_logits(self.model, xb, autocast)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize(x.device)
                    best = min(best, time.perf_counter() - t0)
                return best

            two, k = seconds(2), 2  # (one row often takes a faster path than any batch)
            while k < 64 and seconds(2 * k) <= 2 * two:
                k *= 2
            self._cheap[key] = k
        return self._cheap[key]

    def _chunker(self, x: torch.Tensor, grad: bool, fixed: int | None, autocast: bool = False) -> AutoChunk:
        """The chunking of forward(+backward) passes on images shaped like ``x`` (kept per shape
        and precision, so later calls reuse what was measured)."""
        if fixed:
            return AutoChunk(fixed)
        key = (tuple(x.shape[1:]), x.dtype, str(x.device), grad, autocast)
        if key not in self._chunkers:
            other = self._chunkers.get(key[:3] + (not grad, autocast))
            self._chunkers[key] = AutoChunk(
                row_bytes=x[0].numel() * x.element_size(), device=x.device, grad=grad,
                max_rows=None if grad or other is None else other.max_rows,
            )
        return self._chunkers[key]

    # -- evaluation of rows ----------------------------------------------------------------

    def _noise(self, img: torch.Tensor, slot: torch.Tensor, it: int) -> torch.Tensor | None:
        """The noise of rows (image ``img[r]``, noise slot ``slot[r]`` = term * K + point, -1 = no
        noise) in iteration ``it``; rows of one image are contiguous. Each image's noise of an
        iteration is one draw of (terms * K, C, H, W) from its own seed."""
        c = self._ctx
        if not c["noisy"]:
            return None
        shape = c["images"].shape[1:]
        slots = c["spec"][0].shape[0] * c["k"]
        out = torch.empty((img.shape[0], *shape), device=c["images"].device, dtype=c["images"].dtype)
        images, counts = torch.unique_consecutive(img, return_counts=True)
        start = 0
        for i, cnt in zip(images.tolist(), counts.tolist()):
            c["gen"].manual_seed(_noise_seed(c["seed"], c["keys"][i], it))
            eps = torch.randn((slots + 1, *shape), generator=c["gen"], device=out.device, dtype=out.dtype)
            eps[-1] = 0
            out[start : start + cnt] = eps[slot[start : start + cnt].to(out.device)]
            start += cnt
        return out.mul_(c["sigma"][img.to(out.device)].view(-1, 1, 1, 1))

    def _term_spec(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per term (CPU): the source of the kept pixels, of the replaced pixels, and the sign."""
        terms = self._terms(torch.ones(1, self.n_masks, 1, 1, dtype=dtype))
        return (torch.tensor([kp for kp, *_ in terms]), torch.tensor([rp for _, rp, *_ in terms]),
                torch.tensor([s for *_, s in terms], dtype=dtype))

    def _rows(self, img, term, point, masks, it, grad: bool):
        """Scores (R,) of rows: row r shows image ``img[r]`` through term ``term[r]`` with mask
        ``alphas[point[r]] * masks[r]`` (R, 1, h, w) plus the noise of iteration ``it`` (none if
        ``it`` is None; ``point[r] = -1``: alpha = 1 without noise); with ``grad`` also the gradient of each row's signed score w.r.t. its mask
        point. ``img``, ``term``, ``point`` are CPU long tensors."""
        c = self._ctx
        n, k = c["n"], c["k"]
        dev = masks.device
        kept, repl, sign = c["spec"]
        src_i = (repl[term] * n + img).to(dev)  # the pixels shown where the mask is 0
        diff_i = ((kept[term] == 1).long() * n + img).to(dev)  # kept - replaced
        signs = sign[term].to(dev)
        targets = c["t"][img.to(dev)]
        slot = torch.where(point >= 0, term * k + point, -1)  # -1: no noise
        point = torch.where(point >= 0, point, k - 1)  # -1: alpha = 1
        alphas = c["alphas"][point.to(dev)].view(-1, 1, 1, 1)
        scores = masks.new_empty(masks.shape[0])
        grads = torch.empty_like(masks) if grad else None

        def work(sl: slice) -> None:
            p = alphas[sl] * masks[sl]
            if grad:
                p.requires_grad_(True)
            with torch.set_grad_enabled(grad):
                phi = torch.addcmul(c["src"][src_i[sl]], c["diff"][diff_i[sl]], upsample(p, c["size"]))
                if it is not None:
                    eps = self._noise(img[sl], slot[sl], it)
                    if eps is not None:
                        phi = phi + eps
                logits = model_logits(self.model, phi, c["autocast"])
                s = torch.softmax(logits, dim=1).gather(1, targets[sl].view(-1, 1)).squeeze(1)
                if grad:
                    total = (s * signs[sl]).sum()
                    # a model whose output ignores its input has no graph back to the mask: zero gradient
                    (g,) = torch.autograd.grad(total, p, allow_unused=True) if total.requires_grad else (None,)
                    grads[sl] = 0 if g is None else g
            scores[sl] = s.detach()
            c["fb" if grad else "fw"] += phi.shape[0]

        (c["fb_chunk"] if grad else c["fw_chunk"]).run(masks.shape[0], work)
        return scores, grads

    def _signed(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per term the masks (terms, N, 1, h, w) and signs (terms,)."""
        terms = self._terms(z)
        masks = torch.stack([m for _, _, m, _ in terms])
        signs = torch.tensor([s for *_, s in terms], device=z.device, dtype=z.dtype)
        return masks, signs

    @torch.no_grad()
    def _objective(self, z: torch.Tensor, l1: torch.Tensor, l2: float, rows: torch.Tensor | None = None,
                   with_score: bool = False):
        """The objective itself at states ``z`` (noise-free, one point per term: the mask) of
        images ``rows`` (CPU; default all, in order); with ``with_score`` also the class
        probability of the first (deletion) term."""
        c = self._ctx
        m = z.shape[0]
        rows = torch.arange(m) if rows is None else rows
        masks, signs = self._signed(z)
        nt = masks.shape[0]
        img = rows.repeat_interleave(nt)
        term = torch.arange(nt).repeat(m)
        point = torch.full_like(img, -1)  # alpha = 1, no noise
        s, _ = self._rows(img, term, point, masks.transpose(0, 1).flatten(0, 1), None, grad=False)
        s = s.view(m, nt)
        rd = rows.to(z.device)
        value = (s * signs).sum(1) + self._regulariser(z, c["images"][rd], l1[rd], l2)
        return (value, s[:, 0]) if with_score else value

    def _direction(self, z: torch.Tensor, it: int):
        """The integrated gradients of the score terms at ``z`` (the score part of the descent
        direction) and the score part of the integrated objective on the line-search points,
        with this iteration's noise (the value the line search compares against)."""
        c = self._ctx
        n, k = c["n"], c["k"]
        masks, signs = self._signed(z.detach())
        nt = masks.shape[0]
        # Row (i, term, point) = (i * nt + term) * k + point: the rows of an image are contiguous.
        img = torch.arange(n).repeat_interleave(nt * k)
        term = torch.arange(nt).repeat_interleave(k).repeat(n)
        point = torch.arange(k).repeat(n * nt)
        rows = masks.transpose(0, 1).unsqueeze(2).expand(n, nt, k, *masks.shape[2:]).reshape(-1, *masks.shape[2:])
        scores, grads = self._rows(img, term, point, rows, it, grad=True)
        ig = grads.view(n, nt, k, *masks.shape[2:]).mean(2)  # (n, nt, 1, h, w)
        g = self._chain(z, list(ig.transpose(0, 1).unbind(0)))
        ls = scores.view(n, nt, k)[:, :, c["ls_points"]].mean(2)  # (n, nt)
        return g, (ls * signs).sum(1)

    def _penalised(self, z: torch.Tensor, g_score: torch.Tensor, ls_score: torch.Tensor, l1: torch.Tensor,
                   l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The descent direction and the integrated objective: the score parts plus the gradient
        and the value of the area and smoothness penalties."""
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            reg = self._regulariser(zz, self._ctx["images"], l1, l2)
            (greg,) = torch.autograd.grad(reg.sum(), zz)
        return g_score + greg, ls_score + reg.detach()

    @torch.no_grad()
    def _integrated(self, cand: torch.Tensor, rows: torch.Tensor, it: int, l1: torch.Tensor, l2: float):
        """The integrated objective of candidate states ``cand`` (M, masks, h, w) for images
        ``rows`` (M,) (CPU, rows of one image contiguous) on the line-search points, with the noise
        of iteration ``it``."""
        c = self._ctx
        masks, signs = self._signed(cand)
        nt, m = masks.shape[0], cand.shape[0]
        pts = torch.tensor(c["ls_points"])
        kp = pts.shape[0]
        img = rows.repeat_interleave(nt * kp)
        term = torch.arange(nt).repeat_interleave(kp).repeat(m)
        point = pts.repeat(m * nt)
        r = masks.transpose(0, 1).unsqueeze(2).expand(m, nt, kp, *masks.shape[2:]).reshape(-1, *masks.shape[2:])
        s, _ = self._rows(img, term, point, r, it, grad=False)
        rd = rows.to(cand.device)
        reg = self._regulariser(cand, c["images"][rd], l1[rd], l2)
        return (s.view(m, nt, kp).mean(2) * signs).sum(1) + reg

    @torch.no_grad()
    def _line_search(self, z, g, loss, real, p_del, it, l1, l2, initial_step, only):
        """Per-image projected Armijo backtracking on z - step * g, clamped to [0, 1].

        The steps tried are step0 * 0.2^j (j = 0, 1, ...). First on the objective itself
        (noise-free, at the mask: what the heatmap is judged by), down to a largest cell change of
        ``MIN_STEP``. An image for which no step lowers it while its deletion score is saturated
        (the class probability at the mask ``p_del`` >= ``SATURATED``, or the mask has not moved
        yet: the softmax does not move when a few cells go, so the integrated-gradient direction
        is not a descent direction of that one point) is searched again on the integrated
        objective with this iteration's noise (the function whose gradient the direction is),
        down to ``MIN_STEP_INTEGRATED``. A step must lower the value by the Armijo amount and by
        more than float rounding (``MIN_DECREASE``). Every image takes the first step that
        passes, exactly as a sequential search would; the next ``line_search_group`` steps of
        every image still searching are scored in one batched pass. Only the images in ``only``
        (CPU bools) search. Returns the new state, its objective and deletion score, the images
        that gave up (no step accepted) and the images whose accepted step changed the mask.
        """
        n = z.shape[0]
        # the scale of the step: the largest change among cells that can move (a cell at M = 1
        # pushed up by the area term cannot, and must not make the other cells' steps tiny)
        movable = ((g > 0) & (z > 0)) | ((g < 0) & (z < 1))
        gmax = (g.abs() * movable).flatten(1).amax(1).clamp_min(1e-12)
        step0 = INITIAL_STEP / gmax if initial_step is None else torch.full_like(gmax, float(initial_step))
        can_move = movable.flatten(1).any(1).cpu() & only
        new_z, new_real, new_p = z.clone(), real.clone(), p_del.clone()

        def score_real(cand, rows):
            return self._objective(cand, l1, l2, rows, with_score=True)

        def score_integrated(cand, rows):
            return self._integrated(cand, rows, it, l1, l2), None

        done = self._ladder(z, g, step0, gmax, real, can_move, MIN_STEP, score_real, new_z, new_real, 1, new_p)
        saturated = (p_del >= SATURATED).cpu() | torch.tensor(constant_heatmaps(self._heat(z), CONSTANT_TOL))
        retry = can_move & ~done & saturated
        done2 = torch.zeros(n, dtype=torch.bool)
        if bool(retry.any()):
            fallback_val = torch.empty_like(real)
            done2 = self._ladder(z, g, step0, gmax, loss, retry, MIN_STEP_INTEGRATED, score_integrated,
                                 new_z, fallback_val, len(self._ctx["ls_points"]))
            if bool(done2.any()):  # the noise-free objective of the states taken on the fallback
                rows = done2.nonzero().squeeze(1)
                rd = rows.to(z.device)
                new_real[rd], new_p[rd] = self._objective(new_z[rd], l1, l2, rows, with_score=True)
        accepted = done | done2
        moved = accepted & ((new_z - z).flatten(1).abs().amax(1) > 0).cpu()
        return new_z, new_real, new_p, can_move & ~accepted, moved

    def _ladder(self, z, g, step0, gmax, old, active, min_step, score, out_z, out_val, points,
                out_aux=None) -> torch.Tensor:
        """Armijo backtracking of the images in ``active`` (CPU bools) on ``score(cand, rows)``
        (-> values and an extra per-candidate number or None; ``points`` model rows per term and
        trial) against ``old``; accepted states, values (and extras) are written into ``out_z`` /
        ``out_val`` (/ ``out_aux``). Returns which images accepted a step (CPU bools)."""
        # Trial k of an image has step step0 * SHRINK**k, the power read from one table, so the
        # steps (and so the states and values) are the same bits whatever number of trials one
        # call scores (``group``, chosen from measured pass times).
        tried = torch.zeros(active.shape[0], dtype=torch.long)  # CPU: trials scored per image
        active = active.clone()
        accepted = torch.zeros_like(active)
        nt = self._ctx["spec"][0].shape[0]
        while bool(active.any()):
            rows = active.nonzero().squeeze(1)  # CPU
            rd = rows.to(z.device)
            r = rows.shape[0]
            group = self.line_search_group or max(2, min(8, self._ctx["cheap"] // (r * nt * points)))
            k = tried[rows].unsqueeze(1) + torch.arange(group + 1)  # (r, G + 1): these trials, then the next
            powers = _shrink_powers(int(k.max()) + 1, z.dtype, z.device)[k.to(z.device)]
            steps_next = step0[rd].unsqueeze(1) * powers
            steps, next_step = steps_next[:, :group], steps_next[:, group]  # (r, G), (r,)
            cand = (z[rd].unsqueeze(1) - steps.view(r, group, 1, 1, 1) * g[rd].unsqueeze(1)).clamp(0, 1)
            # trials whose largest cell change is below min_step are not scored (except an image's first)
            valid = (steps * gmax[rd].unsqueeze(1) >= min_step) | (k[:, :group] == 0).to(z.device)
            vflat = valid.flatten()
            val = torch.full((r * group,), float("inf"), device=z.device, dtype=z.dtype)
            aux = torch.zeros_like(val)
            v, a = score(cand.flatten(0, 1)[vflat], rows.repeat_interleave(group)[vflat.cpu()])
            val[vflat] = v
            if a is not None:
                aux[vflat] = a
            val, aux = val.view(r, group), aux.view(r, group)
            # Projected Armijo: the decrease predicted by the step actually taken after clamping
            # (equal to step * ||g||^2 when nothing is clamped).
            pred = (g[rd].unsqueeze(1) * (z[rd].unsqueeze(1) - cand)).flatten(2).sum(2)
            ok = (val <= old[rd].unsqueeze(1) - ARMIJO_C1 * pred - MIN_DECREASE) & valid  # (r, G)
            any_ok = ok.any(1)
            first = ok.float().argmax(1)  # first satisfying trial per image
            idx = any_ok.nonzero().squeeze(1)
            out_z[rd[idx]] = cand[idx, first[idx]]
            out_val[rd[idx]] = val[idx, first[idx]]
            if out_aux is not None:
                out_aux[rd[idx]] = aux[idx, first[idx]]
            tried[rows] += group
            give_up = ~any_ok & (next_step * gmax[rd] < min_step)
            any_ok, give_up = any_ok.cpu(), give_up.cpu()
            accepted[rows[any_ok]] = True
            active[rows[any_ok | give_up]] = False
        return accepted


_POWERS: dict = {}


def _shrink_powers(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ARMIJO_SHRINK ** k for k < n (at least), computed once in Python floats (kept per dtype and
    device)."""
    key = (dtype, str(device))
    table = _POWERS.get(key)
    if table is None or table.shape[0] < n:
        size = max(n, 32, 2 * (0 if table is None else table.shape[0]))
        table = torch.tensor([ARMIJO_SHRINK**k for k in range(size)], dtype=torch.float64).to(device, dtype)
        _POWERS[key] = table
    return table


def _baseline_name(baselines: BaselineType) -> str:
    if isinstance(baselines, str):
        return {"blur": "blurred image", "zero": "black image", "black": "black image"}.get(baselines, "baseline")
    if isinstance(baselines, (int, float)):
        return f"constant {baselines:g} image"
    return "baseline"


class IGOS(_MaskExplainer):
    """I-GOS (Qi et al., AAAI 2020): one deletion mask M, start at M = 1 (image unchanged),

    minimise  p_c(I * up(M) + B * (1 - up(M))) + l1 * mean|1 - M| + l2 * TV(M)

    with integrated gradients of the score along alpha * M (alpha = 1/K..1, noise on every
    point) as the descent direction and a per-image Armijo line search on the same integrated
    objective; M is clamped to [0, 1]. The heatmap is 1 - up(M) (N, 1, H, W): high where deleting
    the pixels destroys the class. Cost: ``ig_steps`` forward+backward passes per image and
    iteration, plus line-search forwards (5 per trial step).
    """

    name, title, order = "igos", "I-GOS", 10
    n_masks = 1

    def _terms(self, z):
        return [(0, 1, z[:, 0:1], 1.0)]

    def _chain(self, z, grads):
        return grads[0]

    def _regulariser(self, z, images, l1, l2):
        m = z[:, 0:1]
        # M stays in [0, 1], so |1 - M| = 1 - M (and its gradient is -1 even at M = 1).
        return l1 * (1 - m).flatten(1).mean(1) + l2 * total_variation(m)

    def _heat(self, z):
        return 1 - z[:, 0:1]


class IGOSPlusPlus(_MaskExplainer):
    """iGOS++ (Khorram et al., CHIL 2021): a deletion mask M_d and an insertion mask M_i.

    With del(M) = p_c(I * up(M) + B * (1 - up(M))) and ins(M) = -p_c(B * up(M) + I * (1 - up(M)))
    (insertion reveals the image where M is small), both masks start at 1 and minimise

    del(M_d) + ins(M_i) + del(M_d M_i) + ins(M_d M_i) + l1 * mean|1 - M_d M_i| + l2 * BTV(M_d M_i)

    where BTV = 0.5 * (TV(M) + image-weighted TV of up(M), weights exp(-||dI||^2 / 0.01)).
    The heatmap is 1 - up(M_d M_i). Cost: 4 x ``ig_steps`` forward+backward passes per image and
    iteration, plus line-search forwards (4 x 5 per image and trial step).
    """

    name, title, order = "igos++", "iGOS++", 11
    n_masks = 2
    bilateral_sigma = 0.01

    def _terms(self, z):
        md, mi = z[:, 0:1], z[:, 1:2]
        m = md * mi
        return [(0, 1, md, 1.0), (1, 0, mi, -1.0), (0, 1, m, 1.0), (1, 0, m, -1.0)]

    def _chain(self, z, grads):
        g_del, g_ins, g_pd, g_pi = grads
        md, mi = z[:, 0:1], z[:, 1:2]
        gp = g_pd + g_pi
        return torch.cat([g_del + gp * mi, g_ins + gp * md], dim=1)

    def _regulariser(self, z, images, l1, l2):
        m = z[:, 0:1] * z[:, 1:2]
        btv = 0.5 * (
            total_variation(m)
            + _weighted_tv(upsample(m, images.shape[-2:]), images, self.bilateral_sigma)
        )
        return l1 * (1 - m).flatten(1).mean(1) + l2 * btv

    def _heat(self, z):
        return 1 - z[:, 0:1] * z[:, 1:2]
