"""I-GOS and iGOS++: mask optimisation with integrated-gradient descent directions, batched.

References:
    Qi, Khorram, Li. "Visualizing Deep Networks by Optimizing with Integrated Gradients." AAAI 2020.
    Khorram, Lawson, Li. "iGOS++: Integrated Gradient Optimized Saliency by Bilateral
    Perturbations." ACM CHIL 2021.

Both follow Captum's contract: ``IGOS(model).attribute(inputs, target=None, ...)`` returns
heatmaps of shape (N, 1, H, W), higher = more important. Unlike the reference code, the whole
batch is optimised together: masks, the integrated gradients (all ``ig_steps`` points of all
images in one forward/backward, or in ``internal_batch_size`` chunks) and a per-image Armijo line
search (every image keeps its own step size; only images still searching are re-evaluated).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> heat = IGOS(net).attribute(torch.rand(2, 1, 8, 8), iterations=2, ig_steps=2)
    >>> tuple(heat.shape)
    (2, 1, 8, 8)
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision._utils.images import (
    BaselineType,
    TargetType,
    as_pair,
    check_inputs,
    chunks,
    default_mask_size,
    eval_mode,
    make_baseline,
    resolve_target,
    upsample,
)
from trustvision.explain._base import ExplanationInfo, ExplanationWarning, Explainer

__all__ = ["IGOS", "IGOSPlusPlus", "ExplanationInfo", "ExplanationWarning", "total_variation"]

ARMIJO_C1 = 1e-4  # sufficient-decrease constant
ARMIJO_SHRINK = 0.2  # step *= 0.2 on failure
MIN_STEP = 1e-5  # give up when the largest cell change falls below this


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


class _MaskExplainer(Explainer, register=False):
    """Shared machinery: batched integrated gradients of the class score w.r.t. masks, and a
    projected descent with a per-image Armijo line search. Subclasses define the state (one or
    two masks), the objective and the heatmap.

    Args:
        model: classifier on [0, 1] images (N, C, H, W) returning logits.
        low_confidence: images whose explained class has a lower probability are flagged (and
            a warning is raised): the method works poorly there (0.5).
        line_search_group: Armijo trial steps scored per batched forward pass (4); the result
            does not depend on it, only the number of sequential model calls does.
    """

    kind = "heatmap"
    in_audit = True
    n_masks = 1

    def __init__(self, model: nn.Module, low_confidence: float = 0.5, line_search_group: int = 4):
        super().__init__(model)
        self.low_confidence = float(low_confidence)
        self.line_search_group = int(line_search_group)

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
        baselines: BaselineType = "blur",
        mask_size: int | Sequence[int] | None = None,
        iterations: int = 15,
        ig_steps: int = 20,
        l1: float = 1.0,
        l2: float | None = None,
        noise: float | None = None,
        initial_step: float | None = None,
        return_info: bool = False,
        return_mask: bool = False,
    ):
        """Heatmaps (N, 1, H, W) for ``inputs`` (N, C, H, W) in [0, 1]; higher = more important.

        Args:
            target: class per image (int, sequence or (N,) tensor); ``None`` = predicted class.
            baselines: ``"blur"`` (Gaussian, kernel 51 / sigma 50 at 224 px, scaled to the
                image), ``"zero"``, a number or a tensor broadcastable to ``inputs``.
            mask_size: mask resolution; ``None`` = 28x28 at 224 px, an eighth of the image but at
                least 16, full resolution for images of 16 px or less.
            iterations, ig_steps: descent iterations and integrated-gradient points (15, 20).
            l1: weight of the area term mean|1-M| (1).
            l2: weight of the (bilateral) TV term; ``None`` = 20 at the paper's 28x28 mask and
                20 * cells / 784 otherwise, so one cell's edge costs the same at every mask
                size (TV is a mean over neighbour pairs; on an 8x8 mask an unscaled 20 makes
                every hole cost more than the class score can gain).
            internal_batch_size: most images per forward/backward; ``None`` = all
                ``ig_steps`` points of all images at once (Captum's convention).
            noise: std of the Gaussian noise added to every integrated-gradient point, in
                [0, 1] pixel units; ``None`` = 0.2 in normalised units (0.2 x the model's
                ``norm_std`` when it has one, else 0.2 x 0.225, ImageNet's std). 0 disables it.
            initial_step: first Armijo step; ``None`` = per image 1 / max|g| (the most
                important cell can move by a whole unit), then x0.2 until sufficient decrease.
            seed: seed of the noise.
            return_info: also return an :class:`ExplanationInfo` (it is always in
                ``self.last_info``).
            return_mask: return the low-resolution heatmap (N, 1, h, w) instead of upsampling.
        """
        x = check_inputs(inputs)
        if iterations < 0 or ig_steps < 1:
            raise TrustVisionError("iterations must be >= 0 and ig_steps >= 1")
        n, _, h, w = x.shape
        mh, mw = default_mask_size(h, w) if mask_size is None else as_pair(mask_size)
        if mh < 1 or mw < 1:
            raise TrustVisionError(f"mask_size must be positive, got {mask_size!r}")
        if l2 is None:
            l2 = 20.0 * (mh * mw) / (28.0 * 28.0)
        device = x.device
        x = x.detach()
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        if noise is None:
            std = getattr(self.model, "norm_std", None)
            noise = 0.2 * (float(std.float().mean()) if isinstance(std, torch.Tensor) else 0.225)

        with eval_mode(self.model):
            with torch.no_grad():
                base = make_baseline(x, baselines)
                probs = torch.softmax(self.model(x), dim=1)
            t = resolve_target(self.model, x, target) if target is not None else probs.argmax(1)
            self._ctx = dict(
                src=torch.cat([x, base]), n=n, t=t, size=(h, w), images=x, gen=gen,
                noise=float(noise), ibs=internal_batch_size, fb=0, fw=0,
            )
            z = torch.ones(n, self.n_masks, mh, mw, device=device, dtype=x.dtype)
            loss = self._objective(z, torch.arange(n, device=device), l1, l2)
            failures = torch.zeros(n, dtype=torch.long)
            alphas = torch.arange(1, ig_steps + 1, device=device, dtype=x.dtype) / ig_steps
            for _ in range(iterations):
                g = self._direction(z, alphas, l1, l2)
                z, loss, failed = self._line_search(z, g, loss, l1, l2, initial_step)
                failures += failed.cpu().long()
            heat = self._heat(z).detach()
            if not return_mask:
                heat = upsample(heat, (h, w))

        p_t = probs.gather(1, t.view(-1, 1)).squeeze(1)
        pred = probs.argmax(1)
        info = ExplanationInfo(
            target=t.tolist(),
            target_probability=[round(v, 6) for v in p_t.tolist()],
            predicted=pred.tolist(),
            low_confidence=(p_t < self.low_confidence).tolist(),
            not_predicted=(pred != t).tolist(),
            final_loss=loss.tolist(),
            forward_backward_passes=self._ctx["fb"],
            forward_passes=self._ctx["fw"],
            line_search_failures=failures.tolist(),
        )
        self._ctx = {}
        self.last_info = info
        bad = [i for i, u in enumerate(info.unreliable) if u]
        if bad:
            warnings.warn(
                f"{self.title}: {len(bad)} of {n} images are explained for a class the model does "
                f"not predict or gives probability < {self.low_confidence} (images {bad[:10]}"
                f"{'...' if len(bad) > 10 else ''}); their heatmaps are unreliable "
                "(see ExplanationInfo.unreliable)",
                ExplanationWarning,
                stacklevel=3,  # the caller of attribute (through the keyword check)
            )
        return (heat, info) if return_info else heat

    # Objective value per image (forward passes only, no gradient).
    @torch.no_grad()
    def _objective(self, z: torch.Tensor, rows: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
        c = self._ctx
        n_rows = rows.shape[0]
        terms = self._terms(z)
        total = torch.zeros(n_rows, device=z.device, dtype=z.dtype)
        xs, ys, ms, signs = [], [], [], []
        for kept, repl, mask, sign in terms:
            xs.append(rows + kept * c["n"])
            ys.append(rows + repl * c["n"])
            ms.append(mask)
            signs.append(torch.full((n_rows,), sign, device=z.device, dtype=z.dtype))
        xi, yi, m, s = torch.cat(xs), torch.cat(ys), torch.cat(ms), torch.cat(signs)
        tt = c["t"][rows].repeat(len(terms))
        scores = torch.empty_like(s)
        for sl in chunks(xi.shape[0], c["ibs"]):
            up = upsample(m[sl], c["size"])
            phi = c["src"][xi[sl]] * up + c["src"][yi[sl]] * (1 - up)
            p = torch.softmax(self.model(phi), dim=1).gather(1, tt[sl].view(-1, 1)).squeeze(1)
            scores[sl] = p
            c["fw"] += phi.shape[0]
        total += (s * scores).view(len(terms), n_rows).sum(0)
        return total + self._regulariser(z, c["images"][rows], l1, l2)

    def _direction(self, z: torch.Tensor, alphas: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
        """Descent direction: integrated gradients of the score terms + gradient of the penalties."""
        c = self._ctx
        n = c["n"]
        k = alphas.shape[0]
        rows = torch.arange(n, device=z.device)
        terms = self._terms(z)
        nt = len(terms)
        # Row r of the big batch: alpha index r // (nt*n), term (r // n) % nt, image r % n.
        xi = torch.cat([rows + kept * n for kept, _, _, _ in terms]).repeat(k)
        yi = torch.cat([rows + repl * n for _, repl, _, _ in terms]).repeat(k)
        masks = torch.cat([m for _, _, m, _ in terms])  # (nt*n, 1, h, w)
        signs = torch.tensor([s for *_, s in terms], device=z.device, dtype=z.dtype)
        signs = signs.repeat_interleave(n).repeat(k)
        points = (alphas.view(k, 1, 1, 1, 1) * masks.unsqueeze(0)).reshape(-1, *masks.shape[1:])
        tt = c["t"].repeat(nt * k)
        grads = torch.empty_like(points)
        for sl in chunks(points.shape[0], c["ibs"]):
            p = points[sl].detach().requires_grad_(True)
            up = upsample(p, c["size"])
            phi = c["src"][xi[sl]] * up + c["src"][yi[sl]] * (1 - up)
            if c["noise"] > 0:
                phi = phi + c["noise"] * torch.randn(
                    phi.shape, generator=c["gen"], device=phi.device, dtype=phi.dtype
                )
            with torch.enable_grad():
                score = torch.softmax(self.model(phi), dim=1).gather(1, tt[sl].view(-1, 1))
                (g,) = torch.autograd.grad((score.squeeze(1) * signs[sl]).sum(), p)
            grads[sl] = g
            c["fb"] += phi.shape[0]
        ig = grads.view(k, nt * n, *masks.shape[1:]).mean(0).view(nt, n, *masks.shape[1:])
        g = self._chain(z, list(ig.unbind(0)))
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            reg = self._regulariser(zz, c["images"], l1, l2).sum()
            (greg,) = torch.autograd.grad(reg, zz)
        return g + greg

    @torch.no_grad()
    def _line_search(self, z, g, loss, l1, l2, initial_step):
        """Per-image Armijo backtracking on the projected step z - step*g, clamped to [0, 1].

        Each image takes the first step of step0 * 0.2^j (j = 0, 1, ...) with sufficient
        decrease, exactly as a sequential search would; to save round trips the next
        ``line_search_group`` trial steps of every image still searching are scored in one
        batched forward pass.
        """
        n = z.shape[0]
        group = max(1, int(self.line_search_group))
        gmax = g.flatten(1).abs().amax(1).clamp_min(1e-12)
        gnorm2 = g.flatten(1).pow(2).sum(1)
        if initial_step is None:
            step = 1.0 / gmax
        else:
            step = torch.full_like(gmax, float(initial_step))
        new_z, new_loss = z.clone(), loss.clone()
        failed = torch.zeros(n, dtype=torch.bool, device=z.device)
        active = gnorm2 > 0
        shrink = ARMIJO_SHRINK ** torch.arange(group, device=z.device, dtype=z.dtype)  # (G,)
        while bool(active.any()):
            rows = active.nonzero().squeeze(1)
            r = rows.shape[0]
            steps = step[rows].unsqueeze(0) * shrink.unsqueeze(1)  # (G, r)
            valid = steps * gmax[rows].unsqueeze(0) >= MIN_STEP
            valid[0] = True  # the first trial of a round is always tried
            cand = (z[rows].unsqueeze(0) - steps.view(group, r, 1, 1, 1) * g[rows].unsqueeze(0))
            cand = cand.clamp(0, 1)  # (G, r, masks, h, w)
            flat_valid = valid.flatten()
            val = torch.full((group * r,), float("inf"), device=z.device, dtype=z.dtype)
            val[flat_valid] = self._objective(
                cand.flatten(0, 1)[flat_valid], rows.repeat(group)[flat_valid], l1, l2
            )
            val = val.view(group, r)
            # Projected Armijo: the decrease predicted by the step actually taken after clamping
            # (equal to step * ||g||^2 when nothing is clamped).
            pred = (g[rows].unsqueeze(0) * (z[rows].unsqueeze(0) - cand)).flatten(2).sum(2)
            ok = (val <= loss[rows].unsqueeze(0) - ARMIJO_C1 * pred) & valid  # (G, r)
            any_ok = ok.any(0)
            first = ok.float().argmax(0)  # first satisfying trial per image
            acc = rows[any_ok]
            pick = first[any_ok]
            idx = any_ok.nonzero().squeeze(1)
            new_z[acc] = cand[pick, idx]
            new_loss[acc] = val[pick, idx]
            active[acc] = False
            rej = rows[~any_ok]
            step[rej] = step[rej] * ARMIJO_SHRINK**group
            give_up = rej[step[rej] * gmax[rej] < MIN_STEP]
            active[give_up] = False
            failed[give_up] = True
        return new_z, new_loss, failed


class IGOS(_MaskExplainer):
    """I-GOS (Qi et al., AAAI 2020): one deletion mask M, start at M = 1 (image unchanged),

    minimise  p_c(I * up(M) + B * (1 - up(M))) + l1 * mean|1 - M| + l2 * TV(M)

    with integrated gradients of the score along alpha * M (alpha = 1/K..1, noise on every
    point) as the descent direction and a per-image Armijo line search; M is clamped to [0, 1].
    The heatmap is 1 - up(M) (N, 1, H, W): high where deleting the pixels destroys the class.
    Cost: ``ig_steps`` forward+backward passes per image and iteration, plus line-search forwards.
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
    iteration, plus line-search forwards (4 per image and trial step).
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
