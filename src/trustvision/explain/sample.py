"""Explain a seeded sample of a dataset with one registered method (the CLI and the audit use it).

:func:`draw_sample` draws ``n`` images without replacement (seeded) and records the model's
predictions; :func:`explain_images` explains them with one method; :func:`explain_sample` does
both. Heatmap methods are scored by a faithfulness function passed in by the caller
(``faithfulness=trustvision.evaluate.faithfulness.deletion_insertion``: deletion and insertion
AUCs, Petsiuk et al. BMVC 2018), since the explain layer sits below ``trustvision.evaluate``;
other kinds (SAG) keep their per-image results.

Every heatmap gets reliability flags: the method's own :class:`~trustvision.explain.ExplanationInfo`
when it reports one (I-GOS, iGOS++), else a constant heatmap, a low confidence and a class the model
does not predict, with the reasons in words. Constant heatmaps rank nothing (their
deletion/insertion AUCs only measure the pixel order), so the faithfulness means leave them out and
say how many were left out (``faithfulness["n_excluded"]``); the per-image AUCs are all kept.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from trustvision.data import TensorImageDataset
    >>> ds = TensorImageDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3, ["a", "b", "c"], "toy", "test")
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    >>> res = explain_sample(net, ds, "saliency", 4, seed=1)
    >>> tuple(res.heatmaps.shape), len(res.rows()), res.indices.tolist() == sorted(res.indices.tolist())
    ((4, 1, 8, 8), 4, True)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from trustvision._utils.images import eval_mode
from trustvision._utils.parallel import Unit, run_units
from trustvision.data import random_subset
from trustvision.errors import TrustVisionError
from trustvision.explain._base import (
    ExplanationInfo,
    Explainer,
    check_keywords,
    constant_heatmaps,
    get,
    heatmap_reasons,
)

__all__ = ["Sample", "SampleExplanation", "draw_sample", "explain_images", "explain_chunk", "explain_sample",
           "faithfulness_summary", "TARGETS"]

#: what is explained: the model's predicted class or the true label
TARGETS = ("predicted", "label")
#: images whose explained class has a lower probability are flagged as low-confidence
LOW_CONFIDENCE = 0.5


@dataclass
class Sample:
    """``n`` images of a dataset and the model's view of them.

    ``images`` (n, C, H, W) in [0, 1] on the model's device; ``labels`` and ``indices`` (n,) on the
    CPU (indices into the dataset, ascending); ``predicted``, ``targets`` (the explained class per
    image), ``target_probability`` and ``confidence`` (the top-1 probability), (n,) on the device;
    ``classes``: the dataset's class names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    predicted: torch.Tensor
    targets: torch.Tensor
    target_probability: torch.Tensor
    confidence: torch.Tensor
    classes: list[str]

    def take(self, k: int) -> "Sample":
        """The first ``k`` images of the sample (and their predictions)."""
        return Sample(self.images[:k], self.labels[:k], self.indices[:k], self.predicted[:k],
                      self.targets[:k], self.target_probability[:k], self.confidence[:k], self.classes)

    def class_name(self, c: int) -> str:
        return self.classes[c] if 0 <= c < len(self.classes) else str(c)

    def rows(self) -> list[dict]:
        """Per image: index, label, predicted, target, target_probability, low_confidence,
        wrong_prediction (JSON-ready)."""
        p = self.target_probability.cpu().tolist()
        pred, t = self.predicted.cpu().tolist(), self.targets.cpu().tolist()
        return [{"index": int(i), "label": int(y), "predicted": int(pr), "target": int(tt),
                 "target_probability": float(pt), "low_confidence": bool(pt < LOW_CONFIDENCE),
                 "wrong_prediction": bool(pr != y)}
                for i, y, pr, tt, pt in zip(self.indices.tolist(), self.labels.tolist(), pred, t, p)]


@dataclass
class SampleExplanation:
    """One method's explanations of a :class:`Sample`.

    ``heatmaps`` (n, 1, H, W) for heatmap methods, else ``results`` (one per image);
    ``deletion_auc`` / ``insertion_auc`` (lists of n) and ``faithfulness`` (see
    :func:`faithfulness_summary`: mean and std over the heatmaps that are not constant, and how many
    were excluded) when a faithfulness function was given; for heatmaps ``unreliable`` (n flags),
    ``reasons`` (n lists of reasons in words) and ``constant`` (n flags), from ``info`` when the
    method reports an :class:`~trustvision.explain.ExplanationInfo`; ``seconds``: time spent in
    ``attribute``.
    """

    method: str
    title: str
    kind: str
    sample: Sample
    heatmaps: torch.Tensor | None = None
    results: list | None = None
    deletion_auc: list[float] | None = None
    insertion_auc: list[float] | None = None
    faithfulness: dict | None = None
    unreliable: list[bool] | None = None
    reasons: list[list[str]] | None = None
    constant: list[bool] | None = None
    info: ExplanationInfo | None = None
    seconds: float = 0.0

    def n_unreliable(self) -> int:
        return sum(self.unreliable or [])

    @property
    def images(self) -> torch.Tensor:
        return self.sample.images

    @property
    def labels(self) -> torch.Tensor:
        return self.sample.labels

    @property
    def indices(self) -> torch.Tensor:
        return self.sample.indices

    @property
    def predicted(self) -> torch.Tensor:
        return self.sample.predicted

    @property
    def target_probability(self) -> torch.Tensor:
        return self.sample.target_probability

    def rows(self) -> list[dict]:
        """:meth:`Sample.rows` plus, per image, the deletion/insertion AUCs, the reliability flag
        with its reasons, whether the heatmap is constant, and each result's ``summary()`` (where
        there are such)."""
        rows = self.sample.rows()
        for i, row in enumerate(rows):
            if self.deletion_auc is not None and self.insertion_auc is not None:
                row["deletion_auc"] = self.deletion_auc[i]
                row["insertion_auc"] = self.insertion_auc[i]
            if self.unreliable is not None:
                row["unreliable"] = self.unreliable[i]
            if self.reasons is not None:
                row["reasons"] = list(self.reasons[i])
            if self.constant is not None:
                row["constant_heatmap"] = self.constant[i]
            if self.results is not None and hasattr(self.results[i], "summary"):
                row.update(self.results[i].summary())
        return rows


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def draw_sample(
    model: nn.Module,
    dataset,
    n: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    target: str = "predicted",
    device: str | torch.device | None = None,
) -> Sample:
    """``min(n, len(dataset))`` images of ``dataset`` drawn without replacement by ``generator``
    (default: a CPU generator seeded with ``seed``), in index order, with the model's predictions.

    ``target``: explain the ``"predicted"`` class or the true ``"label"``; ``device``: where the
    images go (default: the model's).
    """
    if int(n) < 1:
        raise TrustVisionError(f"n must be at least 1, got {n}")
    if target not in TARGETS:
        raise TrustVisionError(f"target must be 'predicted' or 'label', got {target!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    x, y, idx = random_subset(dataset, int(n), g)
    dev = torch.device(device) if device is not None else _device_of(model)
    x = x.to(dev)
    with eval_mode(model), torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    pred = probs.argmax(1)
    t = pred if target == "predicted" else y.to(dev)
    return Sample(images=x, labels=y.cpu(), indices=idx.cpu(), predicted=pred, targets=t,
                  target_probability=probs.gather(1, t.view(-1, 1)).squeeze(1),
                  confidence=probs.max(1).values, classes=list(getattr(dataset, "classes", None) or []))


def _method(method: str | type[Explainer]) -> type[Explainer]:
    if isinstance(method, str):
        return get(method)
    if isinstance(method, type) and issubclass(method, Explainer):
        return method
    raise TrustVisionError(f"method must be a registered name or an Explainer class, got {method!r}")


def _attribute(explainer: Explainer, images: torch.Tensor, targets: torch.Tensor, kw: Mapping[str, Any]):
    """``(output, last_info)`` of one chunk: a heatmap method's heatmaps alone (not a tuple)."""
    out = explainer.attribute(images, target=targets, **kw)
    if isinstance(out, tuple) and type(explainer).kind == "heatmap":
        out = out[0]
    return out, getattr(explainer, "last_info", None)


def explain_chunk(model: nn.Module, method: str, images: torch.Tensor, targets: torch.Tensor, **kw):
    """``(output, last_info)`` of registered ``method`` on one chunk of images: a unit of
    :func:`trustvision._utils.parallel.run_units`, what an executor's worker runs for
    :func:`explain_images` (module-level, so Ray sends it by reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _attribute(get(method)(model), images, targets, kw)


def explain_images(
    model: nn.Module,
    sample: Sample,
    method: str | type[Explainer],
    *,
    seed: int = 0,
    internal_batch_size: int | None = None,
    method_kw: Mapping[str, Any] | None = None,
    faithfulness: Callable[..., Any] | None = None,
    track: Callable[..., Any] | None = None,
    chunk: int | None = None,
    executor: Callable[..., Any] | None = None,
    cache: Any = None,
) -> SampleExplanation:
    """Explain ``sample`` with ``method`` (a registered name or an :class:`Explainer` class).

    ``method_kw``: the method's own keywords (validated by its contract: unknown ones, or a model
    the method's ``requires`` rule out, give one-line errors); ``seed`` and
    ``internal_batch_size`` go to every method. ``faithfulness``: for heatmap methods, a function
    ``(model, images, heatmaps, target=...)`` returning per-image ``deletion_auc`` and
    ``insertion_auc`` and a ``summary()`` (e.g. ``deletion_insertion``). Warnings of the method
    are silenced: its reliability flags are in the result instead.

    ``track``: a progress tracker (:mod:`trustvision._utils.progress`; the audit passes
    ``ctx.track``); the images are then explained in chunks of ``chunk`` (default: a quarter of
    them, at least one image: four updates, and batches that keep most of the batching's speed), each reported as done, so the progress has an ETA. The results do
    not depend on the chunking (up to float rounding): every registered method explains each
    image independently of the others in its batch (I-GOS noise is drawn per image, RISE masks
    come from the seed alone).

    ``executor``: anything with ``map(fn, calls)`` (the audit's Ray pool,
    :class:`trustvision.audit.distributed.RayPool`; the contract of
    :func:`trustvision._utils.parallel.run_units`): the chunks are explained there, each by
    :func:`explain_chunk` on the executor's copy of the model, instead of here, with the same
    results.

    ``cache``: anything with ``get(key)`` and ``cache[key] = json`` (the audit's scratch store):
    each chunk's output is stored as soon as it is computed (heatmaps with their diagnostics;
    structure results such as SAGs), keyed by the model's weights, the method, its keywords and
    the chunk's images and targets, and chunks found in it are not recomputed (a resumed audit
    loses at most the chunk in progress). Methods whose results cannot be read back are not cached.
    """
    cls = _method(method)
    kw = {"seed": seed, "internal_batch_size": internal_batch_size, **dict(method_kw or {})}
    check_keywords(cls, kw)
    reason = cls.unmet_requirement(model)
    if reason is not None:
        raise TrustVisionError(reason)
    explainer = cls(model)
    t0 = time.perf_counter()
    n = sample.images.shape[0]
    if track is None and executor is None and cache is None:
        bounds = [(0, n)]
    else:
        size = max(1, chunk or -(-n // 4))
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    codec = _ChunkCodec.of(cls)
    keys: list[str | None] = [None] * len(bounds)
    if cache is not None and codec is not None:
        from trustvision._utils.digest import digest, weights_digest

        prefix = digest(weights_digest(model), cls.name, kw)
        keys = [digest(prefix, sample.targets[a:b], sample.images[a:b]) for a, b in bounds]
    units = [Unit((cls.name, sample.images[a:b], sample.targets[a:b]), kw, key)
             for (a, b), key in zip(bounds, keys)]

    def here(net, name, images, targets, **method_kw):  # one explainer for every chunk (its chunk sizes stay)
        return _attribute(explainer, images, targets, method_kw)

    outs, infos = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (without a codec the units have no keys and no encoder: nothing is read or stored)
        results = run_units(model, here if executor is None else explain_chunk, units, executor=executor,
                            cache=cache, encode=None if codec is None else lambda out: codec.encode(*out),
                            decode=None if codec is None else lambda hit, u: codec.decode(hit, u.args[1]))
        pairs = zip(bounds, results)
        parts = pairs if track is None else track(pairs, total=n, description=cls.name,
                                                  weight=lambda p: p[0][1] - p[0][0])
        for _, (o, info) in parts:
            outs.append(o.to(sample.images.device) if isinstance(o, torch.Tensor) else o)
            infos.append(info)
    seconds = time.perf_counter() - t0
    res = SampleExplanation(method=cls.name, title=cls.title, kind=cls.kind, sample=sample, seconds=seconds)
    info = (ExplanationInfo.concat(infos) if infos and all(isinstance(i, ExplanationInfo) for i in infos)
            else None)
    if isinstance(info, ExplanationInfo):
        explainer.last_info = info
        res.info, res.unreliable, res.reasons = info, info.unreliable, info.reasons
        res.constant = list(info.constant) or None
    if cls.kind == "heatmap":
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        res.heatmaps = out
        if res.reasons is None:  # a method without its own diagnostics: the generic checks
            res.constant = constant_heatmaps(out)
            p = sample.target_probability.cpu().tolist()
            pred, t = sample.predicted.cpu().tolist(), sample.targets.cpu().tolist()
            res.reasons = heatmap_reasons(
                constant=res.constant, low_confidence=[v < LOW_CONFIDENCE for v in p],
                not_predicted=[a != b for a, b in zip(pred, t)], target_probability=p, predicted=pred,
                threshold=LOW_CONFIDENCE)
            res.unreliable = [bool(r) for r in res.reasons]
        if faithfulness is not None:
            fi = faithfulness(model, sample.images, out, target=sample.targets)
            res.deletion_auc, res.insertion_auc = list(fi.deletion_auc), list(fi.insertion_auc)
            res.faithfulness = faithfulness_summary(res.deletion_auc, res.insertion_auc, res.constant)
            keeps = getattr(fi, "baseline_keeps_class", None)
            if keeps:  # (images on whose metric baseline the model still sees the class: their AUCs say little)
                res.faithfulness["baseline_keeps_class"] = int(sum(bool(k) for k in keeps))
    else:
        res.results = [r for o in outs for r in o]
    return res


class _ChunkCodec:
    """One chunk's output as JSON and back, for :func:`explain_images`' ``cache``: heatmaps (a
    tensor and the :class:`ExplanationInfo`, if any) or a list of results with ``to_json`` /
    ``from_json`` (e.g. SAGs, their baseline image kept). ``of(cls)`` is None for methods whose
    results cannot be read back."""

    def __init__(self, kind: str, result_type: Any = None):
        self.kind, self.result_type = kind, result_type

    @classmethod
    def of(cls, method: type[Explainer]) -> "_ChunkCodec | None":
        if method.kind == "heatmap":
            return cls("heatmap")
        rtype = getattr(method, "result_type", None)
        return cls("results", rtype) if rtype is not None and hasattr(rtype, "from_json") else None

    def encode(self, out: Any, info: Any) -> dict:
        from dataclasses import asdict

        from trustvision._utils.digest import tensor_to_json

        if self.kind == "heatmap":
            return {"heatmaps": tensor_to_json(out),
                    "info": asdict(info) if isinstance(info, ExplanationInfo) else None}
        return {"results": [{**r.to_json(), "baseline_image": None if getattr(r, "baseline_image", None) is None
                             else tensor_to_json(r.baseline_image)} for r in out]}

    def decode(self, d: dict, images: torch.Tensor) -> tuple[Any, Any] | None:
        from trustvision._utils.digest import tensor_from_json

        try:
            if self.kind == "heatmap":
                info = None if d.get("info") is None else ExplanationInfo(**d["info"])
                return tensor_from_json(d["heatmaps"]).to(images.device), info
            out = [self.result_type.from_json(r, image=img.cpu(), baseline_image=None if r.get("baseline_image") is None
                                              else tensor_from_json(r["baseline_image"]))
                   for r, img in zip(d["results"], images)]
            return (out, None) if len(out) == len(images) else None
        except (KeyError, TypeError, ValueError):  # an entry of another version: recompute it
            return None


def faithfulness_summary(deletion_auc: list[float], insertion_auc: list[float],
                         constant: list[bool] | None = None) -> dict:
    """Mean and std (population) of the deletion and insertion AUCs over the heatmaps that are not
    constant (a constant heatmap ranks nothing: its AUCs only measure the pixel order).

    Keys: ``deletion_mean``, ``deletion_std``, ``insertion_mean``, ``insertion_std`` (NaN when every
    heatmap is constant: there is no meaningful mean), ``n`` (heatmaps averaged), ``n_excluded`` (constant heatmaps left out),
    ``deletion_mean_all`` / ``insertion_mean_all`` (over every heatmap, for reference).

    Example:
        >>> s = faithfulness_summary([0.2, 0.4, 0.9], [0.8, 0.6, 0.5], [False, False, True])
        >>> round(s["deletion_mean"], 6), s["n"], s["n_excluded"], round(s["deletion_mean_all"], 6)
        (0.3, 2, 1, 0.5)
    """
    keep = [not c for c in (constant or [False] * len(deletion_auc))]

    def stats(values: list[float]) -> tuple[float | None, float | None]:
        v = [a for a, k in zip(values, keep) if k]
        if not v:
            return float("nan"), float("nan")
        t = torch.tensor(v)  # float32, as DeletionInsertionResult.summary()
        return float(t.mean()), float(t.std(unbiased=False))

    dm, ds = stats(deletion_auc)
    im, is_ = stats(insertion_auc)
    mean_all = (lambda v: float(torch.tensor(v).mean()) if v else float("nan"))
    return {"deletion_mean": dm, "deletion_std": ds, "insertion_mean": im, "insertion_std": is_,
            "n": sum(keep), "n_excluded": len(keep) - sum(keep),
            "deletion_mean_all": mean_all(deletion_auc), "insertion_mean_all": mean_all(insertion_auc)}


def explain_sample(
    model: nn.Module,
    dataset,
    method: str | type[Explainer],
    n: int = 8,
    *,
    seed: int = 0,
    sample_seed: int | None = None,
    target: str = "predicted",
    split: str = "test",
    data_root: str | None = None,
    device: str | torch.device | None = None,
    internal_batch_size: int | None = None,
    method_kw: Mapping[str, Any] | None = None,
    faithfulness: Callable[..., Any] | None = None,
    track: Callable[..., Any] | None = None,
) -> SampleExplanation:
    """Explain ``n`` seeded images of ``dataset`` with ``method``: :func:`draw_sample` then
    :func:`explain_images`.

    ``dataset``: a dataset, or a registered name loaded as ``split`` (from ``data_root``) and
    checked against the model; ``seed``: the method's seed and, unless ``sample_seed`` is given,
    the seed of the draw; ``track``: a progress tracker (see :func:`explain_images`).
    """
    cls = _method(method)
    check_keywords(cls, dict(method_kw or {}))
    if isinstance(dataset, str):
        from trustvision import data, models

        dataset = data.load(dataset, split=split, root=data_root)
        models.check_compatible(model, dataset)
    sample = draw_sample(model, dataset, n, seed=seed if sample_seed is None else sample_seed,
                         target=target, device=device)
    return explain_images(model, sample, cls, seed=seed, internal_batch_size=internal_batch_size,
                          method_kw=method_kw, faithfulness=faithfulness, track=track)
