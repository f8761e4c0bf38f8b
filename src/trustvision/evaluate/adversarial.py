"""Adversarial robustness: FGSM, PGD-Linf and PGD-L2, robust accuracy over an eps sweep and the
minimal eps that flips each prediction (bisection over eps with PGD).

Conventions (those of torchattacks and RobustBench): inputs are images in [0, 1] of shape
(N, C, H, W), normalisation lives inside the model, attacks are untargeted on the true label and
maximise the cross-entropy; every adversarial image stays inside the eps ball around its clean
image *and* inside [0, 1]. Images the model already misclassifies count as non-robust.

* FGSM (Goodfellow et al., ICLR 2015): ``x + eps * sign(grad)``, one step, no random start.
* PGD (Madry et al., ICLR 2018): a random start in the ball, then ``steps`` steps of size
  ``alpha = 2.5 * eps / steps`` (the paper's rule; 10 steps by default), each followed by the
  projection onto the ball and [0, 1]. Linf steps along ``sign(grad)``; L2 along
  ``grad / ||grad||_2``. Per image PGD returns the **best iterate it visited** (the random start
  included): the first criterion is misclassification, the second the loss. With a fixed
  ``alpha`` the iterates of ``steps=k`` are a prefix of those of ``steps=K > k`` (same seed), so
  more steps are never weaker; with the default ``alpha`` (which shrinks with ``steps``) the
  trajectories differ and only the random start is shared.
* Random starts are seeded per image from ``(seed, the image's bytes)``, so an image gets the
  same start in any batch: batched == one by one, and results do not depend on batch order.

* AutoAttack "standard" (Croce & Hein, ICML 2020) for the strongest figure, through the
  ``pyautoattack`` package (a repackaging of the original code; ``pip install
  'trustvision[autoattack]'``): APGD-CE (100 iterations), APGD-T (9 target classes, or the
  number of classes - 1 when there are fewer, x 100 iterations), FAB-T (9 targets) and Square
  (5000 queries), each attack run only on the points still robust. ``steps`` does not apply
  (the iterations are the algorithm's); eps is one radius for all images. Its randomness is
  seeded from ``seed`` inside a forked RNG, so the caller's global RNG state is untouched; unlike
  PGD its result depends on the batch (the package draws one random stream per batch).

The eps sweep (:func:`eps_sweep`) follows the image size. At CIFAR scale (32 x 32) and above it
is Linf ``0, 1, 2, 4, 8, 16 / 255`` (8/255 the headline; ImageNet's 4/255 is in it) and L2
``0, 0.125, 0.25, 0.5, 1.0`` (0.5 the headline). Smaller images keep the L2 norm of a
full-budget Linf perturbation, ``eps * sqrt(H * W)``, at its CIFAR-scale value: the Linf grid
is multiplied by ``sqrt(32 * 32 / (H * W))`` (x 4 for 8 x 8 digits: ``0, 4, 8, 16, 32, 64 /
255``, headline 32/255 = two grey levels of the 17-level digits); their L2 grid is CIFAR's.
Larger images keep the Linf grid and multiply the L2 grid by ``sqrt(H * W / 1024)`` (x 7 at
224 px: headline 3.5, near RobustBench's 3.0). Channels are not counted.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.full((3, 1, 2, 2), 0.5), torch.tensor([0, 1, 0])
    >>> adv = pgd(net, x, y, eps=0.1, norm="linf", seed=0)
    >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
    True
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F

from trustvision.errors import TrustVisionError

__all__ = [
    "ATTACKS", "NORM_OF", "list_attacks", "attack", "fgsm", "pgd", "eps_sweep", "headline_eps", "format_eps",
    "autoattack", "RobustAccuracy", "robust_accuracy", "MinimalEps", "minimal_eps", "heatmap_change",
]

#: a radius (or step size): one float for all images, or a (N,) tensor with one per image
EpsLike = Union[float, torch.Tensor]


def _device_of(model: torch.nn.Module, x: torch.Tensor) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else x.device


def _per_image(v, n: int, device, dtype) -> torch.Tensor:
    """A float or (N,) tensor -> (N,) tensor."""
    t = torch.as_tensor(v, dtype=dtype, device=device)
    return t.expand(n).clone() if t.dim() == 0 else t.reshape(n).to(device=device, dtype=dtype)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def _image_seed(seed: int, img: torch.Tensor) -> int:
    h = hashlib.blake2b(img.detach().cpu().contiguous().numpy().tobytes(), digest_size=8,
                        key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, seed: int) -> torch.Tensor:
    """Per image a seeded point of the eps ball around x (Linf: uniform in the box; L2: a uniform
    direction at a radius drawn uniformly in [0, eps], as torchattacks does), clipped to [0, 1]."""
    noise = []
    for img in x.detach().cpu():
        g = torch.Generator().manual_seed(_image_seed(seed, img))
        if norm == "linf":
            noise.append(torch.rand(img.shape, generator=g) * 2 - 1)
        else:
            d = torch.randn(img.shape, generator=g)
            r = torch.rand((), generator=g)
            noise.append(d / d.norm().clamp_min(1e-12) * r)
    delta = torch.stack(noise).to(device=x.device, dtype=x.dtype) * _view(eps, x)
    return (x + delta).clamp(0, 1)


def _project(x_adv: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """The nearest point of the eps ball around x0 (Linf: clip; L2: rescale), then clipped to
    [0, 1] (clipping towards x0, which is in [0, 1], never leaves the ball)."""
    delta = x_adv - x0
    if norm == "linf":
        e = _view(eps, x0)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        scale = (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * _view(scale, delta)
    return (x0 + delta).clamp(0, 1)


def _loss_and_grad(model, x: torch.Tensor, y: torch.Tensor):
    """Per-image cross-entropy, its gradient w.r.t. x, and the logits (one forward + backward)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, logits.detach()


def _batched(fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
             batch_size: int | None, model) -> torch.Tensor:
    dev = _device_of(model, x)
    bs = batch_size or len(x) or 1
    out = [fn(x[i:i + bs].to(dev), y[i:i + bs].to(dev), eps[i:i + bs].to(dev)).to(x.device)
           for i in range(0, len(x), bs)]
    return torch.cat(out) if out else x.clone()


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *,
         batch_size: int | None = 256) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        model: classifier on [0, 1] images returning logits.
        x: (N, C, H, W) in [0, 1]; y: (N,) true labels.
        eps: Linf radius, a float or one per image (N,).
    Returns: adversarial images (N, C, H, W) on x's device.
    """
    eps_t = _per_image(eps, len(x), x.device, x.dtype)

    def run(xb, yb, eb):
        _, g, _ = _loss_and_grad(model, xb, yb)
        return (xb + _view(eb, xb) * g.sign()).clamp(0, 1).detach()

    return _batched(run, x, y, eps_t, batch_size, model)


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, norm: str = "linf",
        steps: int = 10, alpha: EpsLike | None = None, random_start: bool = True, seed: int = 0,
        batch_size: int | None = 256) -> torch.Tensor:
    """PGD (Madry et al. 2018) in the Linf or L2 ball, keeping per image the best iterate.

    Args:
        model: classifier on [0, 1] images returning logits (generative classifiers too).
        x: (N, C, H, W) in [0, 1]; y: (N,) true labels.
        eps: radius, a float or one per image (N,); eps = 0 returns x.
        norm: "linf" or "l2".
        steps: gradient steps (each one forward + backward; one more forward scores the last).
        alpha: step size (float or (N,)); default ``2.5 * eps / steps``.
        random_start: start at a seeded random point of the ball (per image from seed and image).
        seed: seed of the random starts.
        batch_size: images per forward/backward pass (None: all at once).
    Returns: (N, C, H, W) adversarial images on x's device: per image the first visited point
        that is misclassified, else the visited point of highest loss.
    """
    if norm not in ("linf", "l2"):
        raise TrustVisionError(f"PGD norm must be 'linf' or 'l2', got {norm!r}")
    if steps < 0:
        raise TrustVisionError(f"PGD steps must be >= 0, got {steps}")
    n = len(x)
    eps_t = _per_image(eps, n, x.device, x.dtype)
    if (eps_t < 0).any():
        raise TrustVisionError("eps must be >= 0")
    alpha_t = 2.5 * eps_t / max(steps, 1) if alpha is None else _per_image(alpha, n, x.device, x.dtype)
    packed = torch.cat([eps_t[:, None], alpha_t[:, None]], 1)

    @torch.no_grad()
    def run(xb, yb, pb):
        x0 = xb.detach()
        e, a = _view(pb[:, 0], x0), _view(pb[:, 1], x0)
        if norm == "linf":  # the intersection of the box and [0, 1], as per-pixel bounds
            lo, hi = (x0 - e).clamp_(min=0), (x0 + e).clamp_(max=1)
        cur = _random_start(x0, pb[:, 0], norm, seed) if random_start else x0.clone()
        best = best_key = None
        same_eps = norm == "l2" and bool((pb[:, 0] == pb[0, 0]).all())
        single = len(x0) == 1
        if single:  # Python numbers, read once
            y1, e1, a1 = int(yb[0]), float(pb[0, 0]), float(pb[0, 1])
            vnorm = torch.linalg.vector_norm
        for t in range(steps + 1):
            if t < steps:  # one forward + backward: the loss of this iterate and its gradient
                cur.requires_grad_(True)
                with torch.enable_grad():
                    logits = model(cur)
                    loss = F.cross_entropy(logits, yb, reduction="none")
                    (g,) = torch.autograd.grad(loss.sum(), cur)
                if not single:
                    loss = loss.detach()
            else:  # the last iterate only needs scoring
                logits = model(cur)
                loss = F.cross_entropy(logits, yb, reduction="none")
            # misclassified ranks above any loss (the first misclassified iterate is kept)
            if single:  # one image: compare Python numbers (saves ~6 small tensor ops per step)
                key = math.inf if int(logits.argmax()) != y1 else float(loss)
                if best is None or key > best_key:
                    best, best_key = cur.detach(), key
            else:
                key = torch.where(logits.argmax(1) != yb, math.inf, loss)
                if best is None:
                    best, best_key = cur.detach(), key
                else:
                    better = key > best_key
                    best = torch.where(_view(better, cur), cur, best)
                    best_key = torch.where(better, key, best_key)
            if t == steps:
                break
            if norm == "linf" and single:  # in place on the gradient, a Python step size
                cur = torch.add(cur, g.sign_(), alpha=a1).clamp_(lo, hi)
            elif norm == "linf":
                cur = torch.clamp(torch.addcmul(cur, a, g.sign()), lo, hi)
            elif single:  # one image: the same step with Python scalars (fewer small tensor ops)
                delta = (cur - x0).add_(g, alpha=a1 / max(float(vnorm(g)), 1e-12)).renorm_(2, 0, e1)
                cur = delta.add_(x0).clamp_(0, 1)
            else:  # a unit L2 step, then back into the ball (renorm: one op when eps is shared)
                step = F.normalize(g.flatten(1), dim=1, eps=1e-12).view_as(g)
                delta = torch.addcmul(cur - x0, a, step)
                delta = delta.renorm(2, 0, float(pb[0, 0])) if same_eps else _project(x0 + delta, x0, pb[:, 0],
                                                                                       norm) - x0
                cur = (x0 + delta).clamp_(0, 1)
        return best

    return _batched(run, x, y, packed, batch_size, model)


def _pyautoattack():
    try:
        import pyautoattack
    except ImportError:
        raise TrustVisionError("AutoAttack needs the pyautoattack package: pip install 'trustvision[autoattack]'") \
            from None
    return pyautoattack


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, norm: str = "linf",
               seed: int = 0, batch_size: int | None = 256, version: str = "standard") -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) ``version`` ("standard": APGD-CE, APGD-T, FAB-T, Square on
    the points still robust) in the Linf or L2 ball of radius ``eps`` (one float) via
    ``pyautoattack``; returns (N, C, H, W) adversarial images on x's device (an image no attack
    broke is returned unchanged). Deterministic for a seed and a batch size."""
    if norm not in ("linf", "l2"):
        raise TrustVisionError(f"AutoAttack norm must be 'linf' or 'l2', got {norm!r}")
    e = torch.as_tensor(eps, dtype=torch.float64).flatten()
    if len(e) == 0 or not bool((e == e[0]).all()):
        raise TrustVisionError("AutoAttack takes one radius for all images; pass a float eps")
    e = float(e[0])
    if e < 0:
        raise TrustVisionError("eps must be >= 0")
    if e == 0 or len(x) == 0:
        return x.clone()
    aa_pkg = _pyautoattack()
    dev = _device_of(model, x)
    bs = batch_size or len(x)
    with torch.no_grad():
        n_classes = int(model(x[:1].to(dev)).shape[1])
    if n_classes < 2:
        raise TrustVisionError("AutoAttack needs a classifier with at least 2 classes")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        aa = aa_pkg.AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=e, seed=int(seed),
                               version=version, device=dev)
        aa.verbose = False
        # the targeted attacks aim at the runner-up classes: at most n_classes - 1 of them
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
        adv, _ = aa.run_standard_evaluation(x.to(dev), y.to(dev), batch_size=bs)
    return adv.to(x.device)


#: attack name -> (norm, function(model, x, y, eps, steps=, seed=, batch_size=))
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": lambda model, x, y, eps, steps=10, seed=0, batch_size=256: fgsm(model, x, y, eps, batch_size=batch_size),
    "pgd-linf": lambda model, x, y, eps, steps=10, seed=0, batch_size=256: pgd(
        model, x, y, eps, norm="linf", steps=steps, seed=seed, batch_size=batch_size),
    "pgd-l2": lambda model, x, y, eps, steps=10, seed=0, batch_size=256: pgd(
        model, x, y, eps, norm="l2", steps=steps, seed=seed, batch_size=batch_size),
    "autoattack": lambda model, x, y, eps, steps=10, seed=0, batch_size=256: autoattack(
        model, x, y, eps, norm="linf", seed=seed, batch_size=batch_size),
    "autoattack-l2": lambda model, x, y, eps, steps=10, seed=0, batch_size=256: autoattack(
        model, x, y, eps, norm="l2", seed=seed, batch_size=batch_size),
}
#: the threat model of each attack
NORM_OF = {"fgsm": "linf", "pgd-linf": "linf", "pgd-l2": "l2", "autoattack": "linf", "autoattack-l2": "l2"}
#: display names
TITLES = {"fgsm": "FGSM", "pgd-linf": "PGD-Linf", "pgd-l2": "PGD-L2", "autoattack": "AutoAttack-Linf",
          "autoattack-l2": "AutoAttack-L2"}


def list_attacks() -> list[str]:
    """Names accepted by :func:`attack` and :func:`robust_accuracy`."""
    return list(ATTACKS)


def _get(name: str):
    if name not in ATTACKS:
        raise TrustVisionError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: EpsLike, *,
           steps: int = 10, seed: int = 0, batch_size: int | None = 256) -> torch.Tensor:
    """Adversarial images (N, C, H, W) of attack ``name`` (see :func:`list_attacks`) at ``eps``."""
    return _get(name)(model, x, y, eps, steps=steps, seed=seed, batch_size=batch_size)


_LINF = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
_L2 = (0.0, 0.125, 0.25, 0.5, 1.0)


def eps_sweep(image_size: int | Sequence[int], norm: str = "linf") -> list[float]:
    """The eps grid for images of ``image_size`` (an int or (H, W)) in ``norm`` (module docstring:
    CIFAR's grid at 32 x 32, scaled by sqrt of the pixel count ratio on the side that needs it)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
    ratio = math.sqrt(h * w / 1024)
    if norm == "linf":
        return [e * max(1.0, 1 / ratio) for e in _LINF]
    if norm == "l2":
        return [e * max(1.0, ratio) for e in _L2]
    raise TrustVisionError(f"norm must be 'linf' or 'l2', got {norm!r}")


def headline_eps(image_size: int | Sequence[int], norm: str = "linf") -> float:
    """The headline eps of the sweep: 8/255 (Linf) or 0.5 (L2) at CIFAR scale, scaled likewise."""
    return eps_sweep(image_size, norm)[4 if norm == "linf" else 3]


def format_eps(eps: float, norm: str = "linf") -> str:
    """Linf radii in grey levels of an 8-bit image (``8/255``, ``18.9/255``), L2 radii with 3
    significant digits; 0 is ``0``."""
    k = eps * 255
    if norm == "linf" and eps > 0:
        return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{k:.3g}/255"
    return f"{eps:.3g}"


@torch.no_grad()
def _correct(model, x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    dev = _device_of(model, x)
    bs = batch_size or len(x) or 1
    return torch.cat([model(x[i:i + bs].to(dev)).argmax(1).cpu() == y[i:i + bs].cpu()
                      for i in range(0, len(x), bs)]) if len(x) else torch.zeros(0, dtype=torch.bool)


@dataclass
class RobustAccuracy:
    """Accuracy under one attack at each eps: ``accuracy[i]`` at ``eps[i]`` (higher is better);
    ``correct[i]`` per image; ``clean_accuracy`` without attack."""

    attack: str
    norm: str
    eps: list[float]
    accuracy: list[float]
    clean_accuracy: float
    n: int
    steps: int
    seed: int
    correct: list[list[bool]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return asdict(self)


#: attacks whose result does not depend on the batch (seeded per image): they may be sharded
SHARDABLE = ("fgsm", "pgd-linf", "pgd-l2")


def _attack_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, steps: int,
                    seed: int, batch_size: int | None) -> torch.Tensor:
    """One unit of :func:`robust_accuracy`: whether each image of ``x`` is still classified as
    ``y`` after attack ``name`` at ``eps`` (bool, CPU)."""
    adv = _get(name)(model, x, y, float(eps), steps=steps, seed=seed, batch_size=batch_size)
    with torch.no_grad():
        return _correct(model, adv, y, batch_size)


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd-linf",
                    eps_list: Sequence[float] | None = None, *, steps: int = 10, seed: int = 0,
                    batch_size: int | None = 256, track: Callable | None = None,
                    executor: Any = None, cache: Any = None) -> RobustAccuracy:
    """Accuracy of ``model`` on ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,), under ``attack``
    at every eps of ``eps_list`` (default :func:`eps_sweep` for the image size). An image counts
    as robust at eps when it is classified correctly clean *and* attacked (eps = 0: clean
    accuracy). Higher is better.

    The attacks of :data:`SHARDABLE` run in units of one batch of ``batch_size`` images at one eps
    (:mod:`trustvision._utils.parallel`; their random starts are seeded per image, so the batching
    does not change them): ``executor`` (``map(fn, calls)``, e.g. a Ray pool,
    :mod:`trustvision.audit.distributed`) runs them elsewhere with the same result; AutoAttack,
    whose randomness follows the batch, runs here on all images at once, one unit per eps. With
    ``cache`` (the audit's scratch store) each unit's per-image verdicts are stored as it finishes
    and found again by a resumed run."""
    from trustvision._utils.digest import digest, weights_digest
    from trustvision._utils.parallel import Unit, run_units

    name = attack
    _get(name)
    eps_list = list(eps_sweep(x.shape[-2:], NORM_OF[name]) if eps_list is None else eps_list)
    clean = _correct(model, x, y, batch_size)
    n = len(x)
    bs = (batch_size or n or 1) if name in SHARDABLE else (n or 1)
    starts = list(range(0, n, bs))
    prefix = digest(weights_digest(model), name, steps, seed, batch_size) if cache is not None else None
    attacked = [e for e in eps_list if e != 0]
    units = [Unit((x[a:a + bs], y[a:a + bs], name, float(e), steps, seed, batch_size),
                  key=None if prefix is None else digest(prefix, float(e), x[a:a + bs], y[a:a + bs]))
             for e in attacked for a in starts]
    results = run_units(model, _attack_correct, units, executor=executor if name in SHARDABLE else None,
                        cache=cache, encode=lambda t: [bool(v) for v in t.tolist()],
                        decode=lambda d, u: torch.tensor(d, dtype=torch.bool) if len(d) == len(u.args[0]) else None)
    rows = []
    it = track(eps_list, len(eps_list), f"{name}") if track else eps_list
    for e in it:
        if e == 0:
            ok = clean.clone()
        else:
            ok = clean & (torch.cat([next(results) for _ in starts]) if starts else clean)
        rows.append(ok)
    acc = [float(r.double().mean()) if n else float("nan") for r in rows]
    return RobustAccuracy(attack=name, norm=NORM_OF[name], eps=[float(e) for e in eps_list], accuracy=acc,
                          clean_accuracy=float(clean.double().mean()) if n else float("nan"), n=n, steps=steps,
                          seed=seed, correct=[r.tolist() for r in rows])


@dataclass
class MinimalEps:
    """Per image the smallest eps (within ``tolerance``) at which PGD flips the prediction:
    0 for images misclassified clean, None (inf) where PGD at ``eps_max`` does not flip it.
    ``median`` over all images (None when more than half are unflipped). Higher is better."""

    norm: str
    eps: list[float | None]
    median: float | None
    eps_max: float
    iterations: int
    steps: int
    tolerance: float
    n_flipped: int
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def minimal_eps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "linf", *,
                eps_max: float | None = None, iterations: int = 10, steps: int = 10, seed: int = 0,
                batch_size: int | None = 256) -> MinimalEps:
    """The minimal eps of PGD-``norm`` that flips each image's prediction, by bisection.

    Per image the interval [lo, hi] = [0, eps_max] (default: the largest eps of
    :func:`eps_sweep`) is halved ``iterations`` times, all images of a round attacked in one
    batched PGD call with per-image eps (the same seeded start rule as :func:`pgd`); the result
    is ``hi`` (an upper bound within ``eps_max / 2**iterations``). PGD is a heuristic, so the
    value is an upper bound of the true minimal eps. Higher median is better.
    """
    if norm not in ("linf", "l2"):
        raise TrustVisionError(f"norm must be 'linf' or 'l2', got {norm!r}")
    eps_max = float(eps_max if eps_max is not None else eps_sweep(x.shape[-2:], norm)[-1])
    n = len(x)
    clean = _correct(model, x, y, batch_size)
    adv = pgd(model, x, y, eps_max, norm=norm, steps=steps, seed=seed, batch_size=batch_size)
    flips = clean & ~_correct(model, adv, y, batch_size)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), eps_max, dtype=torch.float64)
    idx = flips.nonzero().flatten()
    for _ in range(iterations if len(idx) else 0):
        mid = (lo[idx] + hi[idx]) / 2
        a = pgd(model, x[idx], y[idx], mid.to(x.dtype), norm=norm, steps=steps, seed=seed, batch_size=batch_size)
        flipped = ~_correct(model, a, y[idx], batch_size)
        hi[idx] = torch.where(flipped, mid, hi[idx])
        lo[idx] = torch.where(flipped, lo[idx], mid)
    values: list[float | None] = []
    for i in range(n):
        values.append(0.0 if not clean[i] else float(hi[i]) if flips[i] else None)
    inf = [math.inf if v is None else v for v in values]
    med = float(torch.tensor(inf, dtype=torch.float64).median()) if n else math.nan
    # torch.median takes the lower middle; use the usual mean of the two middles for even n
    if n and n % 2 == 0:
        s = sorted(inf)
        med = (s[n // 2 - 1] + s[n // 2]) / 2
    return MinimalEps(norm=norm, eps=values, median=med if math.isfinite(med) else None, eps_max=eps_max,
                      iterations=iterations, steps=steps, tolerance=eps_max / 2 ** iterations,
                      n_flipped=int(flips.sum()), n=n)


def heatmap_change(clean: torch.Tensor, adversarial: torch.Tensor, top: float = 0.1) -> dict[str, list]:
    """How much each heatmap changed under attack: per image (N, 1, H, W each) the Spearman rank
    correlation of the clean and adversarial heatmaps (1 = same ranking, 0 = unrelated; None
    when one is constant) and the overlap of their top ``top`` fraction of pixels (|A & B| / k;
    1 = same pixels). Higher = more stable (Stock & Cisse 2018: an explanation that changes
    completely under an imperceptible perturbation should not be trusted)."""
    from scipy.stats import rankdata

    a = clean.detach().double().cpu().flatten(1).numpy()
    b = adversarial.detach().double().cpu().flatten(1).numpy()
    k = max(1, round(top * a.shape[1]))
    rho, overlap = [], []
    for u, v in zip(a, b):
        if u.std() == 0 or v.std() == 0:
            rho.append(None)
        else:
            ru, rv = rankdata(u), rankdata(v)
            rho.append(float(((ru - ru.mean()) * (rv - rv.mean())).sum()
                             / math.sqrt(((ru - ru.mean()) ** 2).sum() * ((rv - rv.mean()) ** 2).sum())))
        tu = set(u.argsort(kind="stable")[::-1][:k].tolist())
        tv = set(v.argsort(kind="stable")[::-1][:k].tolist())
        overlap.append(len(tu & tv) / k)
    return {"spearman": rho, "top_overlap": overlap, "k": k}
