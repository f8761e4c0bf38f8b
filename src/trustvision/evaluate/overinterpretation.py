"""Overinterpretation (Carter et al., NeurIPS 2021): how little of an image a classifier needs.

References:
    Carter, Jain, Mueller, Gifford. "Overinterpretation reveals image classification model
    pathologies." NeurIPS 2021.
    Carter, Mueller, Jain, Gifford. "What made you do this? Understanding black-box decisions with
    sufficient input subsets." AISTATS 2019.

Every experiment reads the subsets off one full backward selection per image
(:class:`trustvision.explain.sis.BackSelection`, stored as its removal order, as the paper's
CIFAR scripts do), computed for the predicted class with the removed pixels replaced by the
*training-set mean pixel* (:func:`training_mean`; the paper's "zero after normalisation"):

1. **SIS sizes** (:func:`sis_sizes`): the SIS at ``threshold`` of each confidently classified image
   (f >= threshold) as a fraction of the features.
2. **Subset table** (:func:`subset_table`): accuracy and mean confidence of the model on its test
   images showing only the 5% (10%, 20%) of pixels kept last by backward selection, vs the same
   number of random pixels (fixed seed); all other pixels set to the mask value.
3. **Retraining** (:func:`retrain_on_subsets`): a fresh model of the same architecture
   (:func:`fresh_model`) trained only on the 5% backward-selection subsets of the training images
   (masks computed on and applied to the same un-augmented images; no augmentation), tested on the
   5% subsets of the test images, vs the same with random 5% subsets. A high accuracy means the
   subsets carry a statistically valid signal that people would not call evidence.
4. **Border test** (:func:`border_test`): a fresh model trained and tested on the image border
   only (a frame whose width makes it hold as close to 5% of the pixels as a whole pixel allows,
   :func:`border_width`: at 8 x 8 the 1-pixel frame holds 43.8%, at 32 x 32 12.1%, at 299 x 299
   the 4-pixel frame 5.3%) vs a fresh model on the full images.
5. **Remedies** (:func:`remedies`): SIS sizes and the 5% subset figures of a deep ensemble and of
   a model trained with input dropout (keep probability 0.8; off at evaluation: the model is
   evaluated in eval mode and :func:`trustvision.train.fit` drops pixels only in its training
   loop), side by side with a plain model trained the same way.

:func:`overinterpretation` runs all of it and returns an :class:`OverinterpretationResult`.
The default method is exact SIS when the image has at most 256 features (8 x 8 digits, 16 x 16)
and Batched Gradient SIS above (:func:`default_method`). Backward selections can be kept in a
``cache`` (anything with ``get(key)`` and ``cache[key] = value``, e.g. a dict or the audit's
per-check scratch store): each image's result is stored when its chunk finishes, keyed by the
model's weights, the selector's settings and the image's bytes, so an interrupted run resumes
without recomputing finished images.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Corner(nn.Module):  # class 0 when the top-left pixel is bright
    ...     def forward(self, x):
    ...         v = 8 * x[:, 0, 0, 0] - 4
    ...         return torch.stack([v, -v], 1)
    >>> x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    >>> x[:, 0, 0, 0] = 1.0
    >>> sel = backward_selections(Corner(), x, mask=torch.zeros(1, 1, 1))
    >>> sis_sizes(sel, 0.9)["median_fraction"]
    0.0625
    >>> row = subset_table(Corner(), x, torch.zeros(4, dtype=torch.long), sel, torch.zeros(1, 1, 1), [0.0625])[0]
    >>> row["bs_accuracy"], row["pixels"]
    (1.0, 1)
    >>> border_width(8, 8)
    (1, 0.4375)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from trustvision._utils.images import chunks, eval_mode
from trustvision._utils.progress import silent_tracker
from trustvision._utils.digest import digest as _digest, weights_digest as _weights_digest
from trustvision.errors import TrustVisionError
from trustvision.explain.sis import SIS, BackSelection, BatchedGradientSIS, SISResult, mask_images, parse_features

__all__ = [
    "EXACT_MAX_FEATURES", "METHODS", "OverinterpretationResult", "default_method", "training_mean",
    "make_selector", "backward_selections", "sis_sizes", "kept_last_masks", "random_masks", "show_only",
    "score_subsets", "subset_table", "fresh_model", "training_settings", "train_model", "retrain_on_subsets",
    "border_width", "border_mask", "border_test", "remedies", "overinterpretation",
]

#: exact SIS where the image has at most this many features (pixels), Batched Gradient SIS above
EXACT_MAX_FEATURES = 256
METHODS = ("auto", "exact", "bgsis")


# -- the selector --------------------------------------------------------------------------


def default_method(image_size: Sequence[int], features: str = "pixel") -> str:
    """``"exact"`` when the image (H, W) has at most :data:`EXACT_MAX_FEATURES` features (exact
    backward selection costs p (p + 1) / 2 evaluations: 2,080 at 8 x 8, 524,800 at 32 x 32),
    else ``"bgsis"``."""
    k = parse_features(features)
    h, w = int(image_size[0]), int(image_size[1])
    return "exact" if math.ceil(h / k) * math.ceil(w / k) <= EXACT_MAX_FEATURES else "bgsis"


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W), labels (N,)) of a dataset or an ``(images, labels)`` pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], torch.as_tensor(data[1]).long()
    if hasattr(data, "tensors"):
        x, y = data.tensors()
        return x, torch.as_tensor(y).long()
    items = [data[i] for i in range(len(data))]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def _take(data, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded sample of ``n`` items (:func:`_sample`) of a dataset or ``(images, labels)``:
    (images, labels, indices); a dataset reads only the sampled items."""
    if isinstance(data, (tuple, list)) or not hasattr(data, "subset"):
        x, y = _as_tensors(data)
        idx = _sample(len(y), n, seed)
        return x[idx], y[idx], idx
    idx = _sample(len(data), n, seed)
    x, y = _as_tensors(data if len(idx) == len(data) else data.subset(idx))
    return x, y, idx


def training_mean(train) -> torch.Tensor:
    """The mean pixel (C, 1, 1) of a training split (a dataset or images (N, C, H, W)): the mask
    value of ``mask="mean"`` (the paper's zero after normalisation; the zoo models normalise with
    a fixed 0.5, which is not the data's mean)."""
    from trustvision.data import TensorImageDataset

    if not isinstance(train, (torch.Tensor, tuple, list, TensorImageDataset)) and hasattr(train, "subset"):
        from trustvision.data.loading import image_batches

        total, count = None, 0  # a split on disk: streamed, a float64 sum per channel
        for xb in image_batches(train):
            part = xb.double().sum((0, 2, 3))
            total = part if total is None else total + part
            count += xb.shape[0] * xb.shape[2] * xb.shape[3]
        if total is None:
            raise TrustVisionError("the training-set mean needs a non-empty batch of images (N, C, H, W)")
        return (total / count).float().view(-1, 1, 1)
    x = train if isinstance(train, torch.Tensor) else _as_tensors(train)[0]
    if x.ndim != 4 or x.shape[0] == 0:
        raise TrustVisionError("the training-set mean needs a non-empty batch of images (N, C, H, W)")
    return x.double().mean((0, 2, 3)).float().view(-1, 1, 1)


def make_selector(model: nn.Module, image_size: Sequence[int], *, method: str = "auto", threshold: float = 0.9,
                  mask: Any = "mean", features: str = "pixel", seed: int = 0, k: int | None = None,
                  internal_batch_size: int | None = None) -> SIS:
    """The :class:`SIS` (``"exact"``) or :class:`BatchedGradientSIS` (``"bgsis"``) for ``method``
    (``"auto"``: :func:`default_method`)."""
    if method not in METHODS:
        raise TrustVisionError(f"unknown SIS method {method!r}; use one of {', '.join(METHODS)}")
    if method == "auto":
        method = default_method(image_size, features)
    if method == "exact":
        return SIS(model, threshold=threshold, mask=mask, features=features, internal_batch_size=internal_batch_size)
    return BatchedGradientSIS(model, threshold=threshold, k=k, mask=mask, seed=seed, features=features,
                              internal_batch_size=internal_batch_size)


def _selector_spec(sel: SIS) -> dict:
    spec = {"method": sel.name, "features": sel.features,
            "mask": _digest(sel.mask) if isinstance(sel.mask, torch.Tensor) else sel.mask}
    if isinstance(sel, BatchedGradientSIS):  # its bisection depends on the threshold
        spec.update(threshold=sel.threshold, k=sel.k, noise=sel.noise, seed=sel.seed)
    return spec


def _to_json(b: BackSelection) -> dict:
    d = {k: v for k, v in asdict(b).items() if k not in ("image", "mask_image")}
    d["grid"] = list(b.grid)
    return d


def _from_json(d: dict, image: torch.Tensor, mask_image: torch.Tensor) -> BackSelection:
    return BackSelection(**{**d, "grid": tuple(d["grid"])}, image=image, mask_image=mask_image)


def _backselect_unit(model: nn.Module, x: torch.Tensor, t: torch.Tensor, selector: dict) -> list[dict]:
    """One unit of :func:`backward_selections` run elsewhere (a Ray actor): the selections of one
    chunk of images, as JSON (``selector``: the keywords of :func:`make_selector`)."""
    sel = make_selector(model, x.shape[-2:], **selector)
    return [_to_json(b) for b in sel.backselect_batch(x, t)]


def backward_selections(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | Sequence[int] | None = None,
    *,
    method: str = "auto",
    threshold: float = 0.9,
    mask: Any = "mean",
    features: str = "pixel",
    seed: int = 0,
    k: int | None = None,
    chunk: int | None = None,
    internal_batch_size: int | None = None,
    cache: Any = None,
    track: Callable[..., Iterable] = silent_tracker,
    description: str = "backward selection",
    executor: Any = None,
) -> list[BackSelection]:
    """The full backward selection of each image of ``images`` (N, C, H, W) in [0, 1] for class
    ``targets`` (None: the predicted class), ``chunk`` images at a time in lockstep (default 16
    exact, 32 BGSIS).

    ``mask="mean"`` here is the model's normalisation mean (the :class:`SIS` convention); pass
    :func:`training_mean` to get the training-set mean pixel. With ``cache`` (``get(key)``,
    ``cache[key] = json``) each image's selection is stored as soon as its chunk finishes and
    images already in it are not recomputed. ``executor`` (``map(fn, calls)``, e.g. a Ray pool):
    the chunks are selected there (the same chunks, so the same result).
    """
    x = images.detach()
    if x.ndim != 4:
        raise TrustVisionError(f"images must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    sel = make_selector(model, x.shape[-2:], method=method, threshold=threshold, mask=mask, features=features,
                        seed=seed, k=k, internal_batch_size=internal_batch_size)
    if targets is None:
        with eval_mode(model), torch.no_grad():
            t = torch.cat([model(x[s]).argmax(1) for s in chunks(n, 256)]) if n else torch.zeros(0, dtype=torch.long)
    else:
        t = torch.as_tensor(targets, dtype=torch.long, device=x.device).view(-1)
    out: list[BackSelection | None] = [None] * n
    keys: list[str | None] = [None] * n
    if cache is not None and n:
        prefix = _digest(_weights_digest(model), _selector_spec(sel))
        with eval_mode(model):
            bases = mask_images(model, x, sel.mask)
        for i in range(n):
            keys[i] = _digest(prefix, int(t[i]), x[i])
            hit = cache.get(keys[i])
            if hit is not None:
                out[i] = _from_json(hit, x[i].cpu(), bases[i].cpu())
    todo = [i for i in range(n) if out[i] is None]
    size = chunk or (16 if type(sel) is SIS else 32)
    groups = [todo[s : s + size] for s in range(0, len(todo), size)]
    remote = None
    if getattr(executor, "map", None) is not None and groups:
        from trustvision._utils.parallel import Unit, run_units

        spec = {"method": method, "threshold": threshold, "mask": mask, "features": features, "seed": seed, "k": k,
                "internal_batch_size": internal_batch_size}
        units = [Unit((x[torch.as_tensor(g)], t[torch.as_tensor(g)], spec)) for g in groups]
        remote = run_units(model, _backselect_unit, units, executor=executor)
        with eval_mode(model):
            fills = mask_images(model, x, sel.mask)
    for g in track(groups, total=len(groups), description=description, weight=len):
        idx = torch.as_tensor(g, dtype=torch.long, device=x.device)
        if remote is None:
            chosen = sel.backselect_batch(x[idx], t[idx])
        else:
            chosen = [_from_json(d, x[i].cpu(), fills[i].cpu()) for i, d in zip(g, next(remote))]
        for i, b in zip(g, chosen):
            out[i] = b
            if cache is not None:
                cache[keys[i]] = _to_json(b)
    return out  # type: ignore[return-value]


# -- what the selections say -----------------------------------------------------------------


def sis_sizes(selections: Sequence[BackSelection], threshold: float) -> dict:
    """The SIS at ``threshold`` of each selection: ``fractions`` (SIS size / features) of the
    confidently classified images (status ``"ok"``), their ``median_fraction``, ``mean_fraction``
    and quartiles, and how many images had each status (``"below-threshold"``: f < threshold,
    ``"no-subset-needed"``: the fully masked image keeps f >= threshold)."""
    results = [b.sis(threshold) for b in selections]
    fr = torch.tensor([r.fraction for r in results if r.ok], dtype=torch.float64)
    q = (lambda v: float(torch.quantile(fr, v))) if fr.numel() else (lambda v: None)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "below-threshold", "no-subset-needed")}
    return {"threshold": float(threshold), "n": len(results), "counts": counts,
            "confident": counts["ok"] + counts["no-subset-needed"],
            "fractions": fr.tolist(), "sizes": [r.size for r in results if r.ok],
            "median_fraction": q(0.5), "q25_fraction": q(0.25), "q75_fraction": q(0.75),
            "mean_fraction": float(fr.mean()) if fr.numel() else None,
            "mean_confidence": (float(sum(r.confidence for r in results if r.ok) / counts["ok"])
                                if counts["ok"] else None)}


def _subset_size(fraction: float, p: int) -> int:
    return max(1, min(p, int(round(fraction * p))))


def _to_pixels(m: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    return m if k == 1 else m.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w]


def kept_last_masks(selections: Sequence[BackSelection], fraction: float,
                    image_size: Sequence[int] | None = None) -> torch.Tensor:
    """Bool pixel masks (N, H, W): the ``round(fraction * p)`` features (at least one) each
    backward selection removed last (True = kept)."""
    if not selections:
        return torch.zeros(0, 0, 0, dtype=torch.bool)
    out = []
    for b in selections:
        h, w = image_size or b.image.shape[-2:]
        p = b.grid[0] * b.grid[1]
        out.append(_to_pixels(b.kept_last(_subset_size(fraction, p)), parse_features(b.features), int(h), int(w)))
    return torch.stack(out)


def random_masks(n: int, image_size: Sequence[int], fraction: float, seed: int = 0,
                 features: str = "pixel") -> torch.Tensor:
    """Bool pixel masks (n, H, W), each ``round(fraction * p)`` features drawn at random (one
    seeded generator for all images)."""
    k = parse_features(features)
    h, w = int(image_size[0]), int(image_size[1])
    gh, gw = math.ceil(h / k), math.ceil(w / k)
    p = gh * gw
    m = _subset_size(fraction, p)
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(n, p, dtype=torch.bool)
    for i in range(n):
        out[i, torch.randperm(p, generator=g)[:m]] = True
    return _to_pixels(out.view(n, gh, gw), k, h, w)


def show_only(images: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """``images`` (N, C, H, W) with every pixel outside ``masks`` (N, H, W; True = kept) set to
    ``fill`` (a number, (C, 1, 1) or (C, H, W))."""
    f = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return torch.where(masks.to(images.device).unsqueeze(1), images, f.expand_as(images[:1]))


@torch.no_grad()
def score_subsets(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                  fill: torch.Tensor | float, batch_size: int = 256) -> dict:
    """Accuracy (higher = the subsets alone still classify) and mean top-1 confidence of ``model``
    on the images showing only ``masks``; ``predicted`` per image."""
    pred, conf = [], []
    with eval_mode(model):
        for s in chunks(images.shape[0], batch_size):
            p = torch.softmax(model(show_only(images[s], masks[s], fill)).double(), 1)
            c, k = p.max(1)
            pred.append(k.cpu())
            conf.append(c.cpu())
    pred_t, conf_t = torch.cat(pred), torch.cat(conf)
    return {"accuracy": float((pred_t == labels.cpu()).double().mean()), "mean_confidence": float(conf_t.mean()),
            "predicted": pred_t.tolist()}


def subset_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 selections: Sequence[BackSelection], fill: torch.Tensor | float,
                 fractions: Sequence[float] = (0.05, 0.1, 0.2), seed: int = 0) -> list[dict]:
    """The paper's central table: per fraction, accuracy and mean confidence on the subsets kept
    last by backward selection (``bs_*``) and on random subsets of the same size (``random_*``,
    seeded with ``seed``)."""
    rows = []
    hw = images.shape[-2:]
    features = selections[0].features if selections else "pixel"
    for i, f in enumerate(fractions):
        bs = score_subsets(model, images, labels, kept_last_masks(selections, f, hw), fill)
        rnd = score_subsets(model, images, labels, random_masks(images.shape[0], hw, f, seed + i, features), fill)
        p = selections[0].grid[0] * selections[0].grid[1] if selections else hw[0] * hw[1]
        rows.append({"fraction": float(f), "pixels": _subset_size(f, p) * parse_features(features) ** 2,
                     "features": _subset_size(f, p), "n": int(images.shape[0]),
                     "bs_accuracy": bs["accuracy"], "bs_confidence": bs["mean_confidence"],
                     "random_accuracy": rnd["accuracy"], "random_confidence": rnd["mean_confidence"]})
    return rows


# -- training fresh models -------------------------------------------------------------------


def fresh_model(model: nn.Module):
    """An untrained model of the architecture ``model`` was built with (``tv_config``:
    architecture, sizes, keyword arguments and normalisation), from ``models.create``."""
    from trustvision import models

    cfg = getattr(model, "tv_config", None) or {}
    arch = cfg.get("architecture")
    why = ("retraining needs a model made by models.create or loaded from a checkpoint (its tv_config names "
           "a registered architecture)")
    if not arch or not all(k in cfg for k in ("num_classes", "in_chans", "image_size")):
        raise TrustVisionError(f"cannot build a fresh {type(model).__name__}: it records no architecture; {why}")
    if arch not in models.list_models() and ":" not in arch:
        raise TrustVisionError(f"cannot build a fresh {type(model).__name__}: architecture {arch!r} is not a "
                               f"registered model; {why}")
    kw = dict(cfg.get("kwargs") or {})
    norm = cfg.get("normalization") or {}
    if arch != "ensemble" and "mean" in norm and "mean" not in kw:
        kw.update(mean=list(norm["mean"]), std=list(norm["std"]))
    return models.create(arch, int(cfg["num_classes"]), int(cfg["in_chans"]), list(cfg["image_size"]), **kw)


def training_settings(model: nn.Module, epochs: int | None = None) -> dict:
    """``fit`` keywords for retraining: the model's stored recipe (lr, batch size, optimiser,
    weight decay, schedule; Adam 3e-3, batch 64 when unknown), ``epochs`` (default: the stored
    number, else 15), never augmentation nor input dropout."""
    tr = ((getattr(model, "tv_config", None) or {}).get("training") or {})
    return {"epochs": int(epochs or tr.get("epochs") or 15), "lr": float(tr.get("lr") or 3e-3),
            "batch_size": int(tr.get("batch_size") or 64), "opt": tr.get("opt") or "adam",
            "weight_decay": float(tr.get("weight_decay") or 0.0), "sched": tr.get("sched") or "cosine"}


def train_model(template: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, settings: dict,
                seed: int = 0, device: str = "cpu", input_dropout: float | None = None,
                ensemble: int | None = None, name: str = "subsets"):
    """A fresh model like ``template`` (:func:`fresh_model`; an ensemble of ``ensemble`` of them
    when given) trained with :func:`trustvision.train.fit` on ``images`` / ``labels`` (no
    augmentation; ``input_dropout``: keep probability), returned in eval mode."""
    from trustvision import models
    from trustvision.data import TensorImageDataset
    from trustvision.train import fit, fit_ensemble

    k = int(labels.max()) + 1 if labels.numel() else 1
    classes = [str(i) for i in range(max(k, int(getattr(template, "num_classes", k))))]
    ds = TensorImageDataset(images.cpu().clamp(0, 1), labels.cpu(), classes, name, "train")
    if ensemble:
        base = fresh_model(template)
        cfg = base.tv_config
        member, member_kw = cfg["architecture"], dict(cfg["kwargs"])
        if member == "ensemble":  # an ensemble of the audited ensemble's members
            member, member_kw = member_kw.get("member", "small-cnn"), dict(member_kw.get("member_kwargs") or {})
            base = base.members[0]
        norm = {kk: getattr(base, f"norm_{kk}").flatten().tolist() for kk in ("mean", "std")}
        net = models.create("ensemble", cfg["num_classes"], cfg["in_chans"], cfg["image_size"], member=member,
                            n=int(ensemble), member_kwargs={kk: v for kk, v in member_kw.items()
                                                            if kk not in ("mean", "std")}, **norm)
        fit_ensemble(net, ds, seed=seed, device=device, progress=False, input_dropout=input_dropout, **settings)
    else:
        net = fresh_model(template)
        fit(net, ds, seed=seed, device=device, progress=False, input_dropout=input_dropout, **settings)
    return net.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str) -> float:
    with eval_mode(model):
        pred = torch.cat([model(images[s].to(device)).argmax(1).cpu() for s in chunks(images.shape[0], 256)])
    return float((pred == labels.cpu()).double().mean())


def retrain_on_subsets(template: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                       train_selections: Sequence[BackSelection], test: tuple[torch.Tensor, torch.Tensor],
                       test_selections: Sequence[BackSelection], fill: torch.Tensor | float, *,
                       fraction: float = 0.05, settings: dict, seed: int = 0, device: str = "cpu") -> dict:
    """Fresh models trained only on the ``fraction`` backward-selection subsets of the training
    images (the selections of those same un-augmented images) and on random subsets of the same
    size; each tested on the matching subsets of the test images. ``bs_accuracy`` far above
    ``chance`` means the subsets alone carry the class."""
    (xtr, ytr), (xte, yte) = train, test
    hw = xtr.shape[-2:]
    feats = train_selections[0].features if train_selections else "pixel"
    t0 = time.perf_counter()
    bs_model = train_model(template, show_only(xtr, kept_last_masks(train_selections, fraction, hw), fill), ytr,
                           settings=settings, seed=seed, device=device, name="bs-subsets")
    bs_acc = _accuracy(bs_model, show_only(xte, kept_last_masks(test_selections, fraction, hw), fill), yte, device)
    rnd_model = train_model(template, show_only(xtr, random_masks(len(ytr), hw, fraction, seed + 101, feats), fill),
                            ytr, settings=settings, seed=seed, device=device, name="random-subsets")
    rnd_acc = _accuracy(rnd_model, show_only(xte, random_masks(len(yte), hw, fraction, seed + 202, feats), fill),
                        yte, device)
    k = int(getattr(template, "num_classes", int(ytr.max()) + 1))
    return {"fraction": float(fraction), "n_train": int(len(ytr)), "n_test": int(len(yte)),
            "bs_accuracy": bs_acc, "random_accuracy": rnd_acc, "chance": 1.0 / k,
            "majority": float(torch.bincount(yte.cpu(), minlength=k).max()) / max(1, len(yte)),
            "epochs": settings["epochs"], "seconds": time.perf_counter() - t0}


# -- the border test -------------------------------------------------------------------------


def border_width(h: int, w: int, fraction: float = 0.05) -> tuple[int, float]:
    """(width d >= 1, fraction of the pixels it holds) of the image frame whose share of the
    H x W pixels is nearest to ``fraction`` (ties to the thinner frame): (1, 0.4375) at 8 x 8,
    (1, 0.121) at 32 x 32, (4, 0.053) at 299 x 299."""
    best = None
    for d in range(1, (min(h, w) + 1) // 2 + 1):
        inner = max(0, h - 2 * d) * max(0, w - 2 * d)
        frac = (h * w - inner) / (h * w)
        if best is None or abs(frac - fraction) < abs(best[1] - fraction) - 1e-12:
            best = (d, frac)
        if inner == 0:
            break
    return best  # type: ignore[return-value]


def border_mask(h: int, w: int, width: int) -> torch.Tensor:
    """Bool (H, W): True on the frame of ``width`` pixels."""
    m = torch.ones(h, w, dtype=torch.bool)
    m[width : h - width, width : w - width] = False
    return m


def border_test(template: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor], fill: torch.Tensor | float, *, fraction: float = 0.05,
                settings: dict, seed: int = 0, device: str = "cpu", full_model: nn.Module | None = None) -> dict:
    """A fresh model trained and tested on the border only (:func:`border_width`) vs a fresh
    model on the full images (``full_model``: one already trained that way)."""
    (xtr, ytr), (xte, yte) = train, test
    h, w = xtr.shape[-2:]
    d, frac = border_width(int(h), int(w), fraction)
    m = border_mask(int(h), int(w), d)
    t0 = time.perf_counter()
    bm = train_model(template, show_only(xtr, m.expand(len(ytr), -1, -1), fill), ytr, settings=settings, seed=seed,
                     device=device, name="border")
    border_acc = _accuracy(bm, show_only(xte, m.expand(len(yte), -1, -1), fill), yte, device)
    if full_model is None:
        full_model = train_model(template, xtr, ytr, settings=settings, seed=seed, device=device, name="full")
    k = int(getattr(template, "num_classes", int(ytr.max()) + 1))
    return {"width": d, "border_fraction": frac, "target_fraction": float(fraction), "pixels": int(m.sum()),
            "border_accuracy": border_acc, "full_accuracy": _accuracy(full_model, xte, yte, device),
            "chance": 1.0 / k, "n_train": int(len(ytr)), "n_test": int(len(yte)), "epochs": settings["epochs"],
            "seconds": time.perf_counter() - t0}


# -- remedies --------------------------------------------------------------------------------


def remedies(template: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             fill: torch.Tensor | float, *, settings: dict, threshold: float = 0.9, method: str = "auto",
             ensemble: int = 5, keep_prob: float = 0.8, fraction: float = 0.05, seed: int = 0, device: str = "cpu",
             plain: nn.Module | None = None, cache: Any = None, track: Callable[..., Iterable] = silent_tracker,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows (``model``: plain / ensemble / input dropout) of SIS sizes and the ``fraction``
    subset accuracy of three fresh models trained the same way on ``train``: a plain one
    (``plain``: one already trained), a deep ensemble of ``ensemble`` members and one trained
    with input dropout (``keep_prob``; evaluated in eval mode: no dropout)."""
    xtr, ytr = train
    xte, yte = test
    if plain is None:
        plain = train_model(template, xtr, ytr, settings=settings, seed=seed, device=device, name="full")
    built = [("plain", plain)]
    if ensemble and ensemble > 1:
        built.append((f"ensemble of {ensemble}", train_model(template, xtr, ytr, settings=settings, seed=seed,
                                                              device=device, ensemble=ensemble, name="full")))
    if keep_prob < 1:
        built.append((f"input dropout (keep {keep_prob:g})", train_model(
            template, xtr, ytr, settings=settings, seed=seed, device=device, input_dropout=keep_prob, name="full")))
    rows = []
    for name, net in built:
        t0 = time.perf_counter()
        net.eval()
        sel = backward_selections(net, xte.to(device), method=method, threshold=threshold, mask=fill, seed=seed,
                                  cache=cache, track=track, description=f"SIS {name}")
        s = sis_sizes(sel, threshold)
        bs = score_subsets(net, xte, yte, kept_last_masks(sel, fraction, xte.shape[-2:]), fill)
        rnd = score_subsets(net, xte, yte, random_masks(len(yte), xte.shape[-2:], fraction, seed,
                                                        sel[0].features if sel else "pixel"), fill)
        rows.append({"model": name, "accuracy": _accuracy(net, xte, yte, device), "confident": s["confident"],
                     "n": s["n"], "median_sis_fraction": s["median_fraction"],
                     "mean_sis_fraction": s["mean_fraction"], "bs_accuracy": bs["accuracy"],
                     "bs_confidence": bs["mean_confidence"], "random_accuracy": rnd["accuracy"],
                     "random_confidence": rnd["mean_confidence"], "fractions": s["fractions"]})
        if log is not None:
            log(f"remedies: {name} in {time.perf_counter() - t0:.1f}s")
    return rows


# -- all of it -------------------------------------------------------------------------------


@dataclass
class OverinterpretationResult:
    """What :func:`overinterpretation` measured (``to_json()``: plain JSON; the selections and
    SIS results with their images are kept for figures but left out)."""

    method: str
    threshold: float
    mask: str
    fill: list[float]
    features: str
    image_size: list[int]
    indices: list[int]
    labels: list[int]
    predicted: list[int]
    sis: dict
    subsets: list[dict]
    retrain: dict | None = None
    border: dict | None = None
    remedies: list[dict] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    selections: list[BackSelection] = field(default_factory=list, repr=False)

    @property
    def results(self) -> list[SISResult]:
        """The SIS of each test image at ``threshold``."""
        return [b.sis(self.threshold) for b in self.selections]

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "selections"}
        d["statuses"] = [r.status for r in self.results]
        d["sis_fraction"] = [r.fraction if r.ok else None for r in self.results]
        return d


def _sample(n_total: int, n: int | None, seed: int) -> torch.Tensor:
    if not n or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))[: int(n)].sort().values


def overinterpretation(
    model: nn.Module,
    test,
    train=None,
    *,
    n: int | None = 100,
    train_n: int | None = 500,
    method: str = "auto",
    threshold: float = 0.9,
    mask: Any = "mean",
    fractions: Sequence[float] = (0.05, 0.1, 0.2),
    retrain: bool = True,
    border: bool = True,
    with_remedies: bool = True,
    epochs: int | None = None,
    ensemble: int = 5,
    keep_prob: float = 0.8,
    seed: int = 0,
    device: str = "cpu",
    cache: Any = None,
    track: Callable[..., Iterable] = silent_tracker,
    log: Callable[[str], None] | None = None,
    executor: Any = None,
) -> OverinterpretationResult:
    """The overinterpretation audit of ``model`` (see the module docstring) on a seeded sample of
    ``n`` images of ``test`` (None/0: all), retraining on ``train_n`` images of ``train`` (None/0:
    all; without ``train`` the training experiments are skipped and ``mask="mean"`` is the test
    images' mean pixel, said in ``skipped``).

    ``mask``: ``"mean"`` (the training-set mean pixel, :func:`training_mean`), ``"zeros"``, a
    number or a tensor (C, 1, 1); ``method``: ``"auto"`` | ``"exact"`` | ``"bgsis"``;
    ``fractions``: the subset sizes of the table (the first one, 5% by default, is also used for
    retraining and the remedies); ``epochs``: of every fresh model (default: the stored recipe's).
    ``executor`` (``map(fn, calls)``, e.g. a Ray pool holding ``model``): the backward selections
    of ``model`` (test and training images) run there, chunk by chunk, with the same result; the
    fresh models' run here.
    """
    log = log or (lambda m: None)
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    # only the sampled images are read (a split on disk stays there; the mean pixel is streamed)
    xte, yte, idx = _take(test, n, seed)
    xte = xte.to(device)
    hw = list(xte.shape[-2:])
    if train is not None:
        xtr, ytr, _ = _take(train, train_n, seed + 1)
        xtr = xtr.to(device)
    else:
        xtr = ytr = None
    if isinstance(mask, str) and mask == "mean":
        if xtr is not None:
            fill, mask_name = training_mean(train), "training-set mean pixel"
        else:
            fill, mask_name = training_mean(test), "test-set mean pixel (no training split)"
    elif isinstance(mask, str) and mask in ("zeros", "zero"):
        fill, mask_name = torch.zeros(xte.shape[1], 1, 1), "zeros"
    elif isinstance(mask, (int, float, torch.Tensor)) and not isinstance(mask, bool):
        fill = torch.as_tensor(mask, dtype=torch.float32)
        fill = fill.expand(xte.shape[1], 1, 1).clone() if fill.ndim == 0 else fill
        mask_name = "given value"
    else:
        raise TrustVisionError(f"mask must be 'mean', 'zeros', a number or a tensor (C, 1, 1), got {mask!r}")
    fill = fill.to(device)
    chosen = default_method(hw) if method == "auto" else method
    if chosen not in ("exact", "bgsis"):
        raise TrustVisionError(f"unknown SIS method {method!r}; use one of {', '.join(METHODS)}")

    def sel(net, x, desc):  # the audited model's selections may run on the executor (it holds that model)
        return backward_selections(net, x, method=chosen, threshold=threshold, mask=fill, seed=seed, cache=cache,
                                   track=track, description=desc, executor=executor if net is model else None)

    t0 = time.perf_counter()
    model.eval()
    test_sel = sel(model, xte, "SIS test images")
    seconds["test_selections"] = time.perf_counter() - t0
    log(f"backward selection of {len(yte)} test images ({chosen}) in {seconds['test_selections']:.1f}s")
    sizes = sis_sizes(test_sel, threshold)
    table = subset_table(model, xte, yte, test_sel, fill, fractions, seed)
    frac0 = float(fractions[0]) if fractions else 0.05
    settings = training_settings(model, epochs)
    res = OverinterpretationResult(
        method=chosen, threshold=float(threshold), mask=mask_name, fill=fill.flatten().tolist(),
        features="pixel", image_size=hw, indices=idx.tolist(), labels=yte.tolist(),
        predicted=[b.predicted for b in test_sel], sis=sizes, subsets=table, skipped=skipped, seconds=seconds,
        selections=test_sel)
    wants = {"retrain": retrain, "border": border, "remedies": with_remedies}
    if not any(wants.values()):
        return res
    why = None
    if xtr is None:
        why = "the dataset has no training split"
    else:
        try:
            fresh_model(model)
        except TrustVisionError as exc:
            why = str(exc)
    if why is not None:
        for k, v in wants.items():
            if v:
                skipped[k] = why
        return res
    plain = None
    if retrain:
        t0 = time.perf_counter()
        train_sel = sel(model, xtr, "SIS training images")
        seconds["train_selections"] = time.perf_counter() - t0
        log(f"backward selection of {len(ytr)} training images in {seconds['train_selections']:.1f}s")
        res.retrain = retrain_on_subsets(model, (xtr, ytr), train_sel, (xte, yte), test_sel, fill, fraction=frac0,
                                         settings=settings, seed=seed, device=device)
        seconds["retrain"] = res.retrain["seconds"]
        log(f"retrained on {frac0:.0%} subsets in {res.retrain['seconds']:.1f}s")
    if border or with_remedies:
        plain = train_model(model, xtr, ytr, settings=settings, seed=seed, device=device, name="full")
    if border:
        res.border = border_test(model, (xtr, ytr), (xte, yte), fill, fraction=frac0, settings=settings, seed=seed,
                                 device=device, full_model=plain)
        seconds["border"] = res.border["seconds"]
        log(f"border test in {res.border['seconds']:.1f}s")
    if with_remedies:
        t0 = time.perf_counter()
        res.remedies = remedies(model, (xtr, ytr), (xte, yte), fill, settings=settings, threshold=threshold,
                                method=chosen, ensemble=ensemble, keep_prob=keep_prob, fraction=frac0, seed=seed,
                                device=device, plain=plain, cache=cache, track=track, log=log)
        seconds["remedies"] = time.perf_counter() - t0
    return res
