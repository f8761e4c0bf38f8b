"""``trustvision explain``: explain a sample of a dataset and write overlays, heatmaps and scores.

Any registered method works (``trustvision.explain.list_methods(kind=None)``): heatmap methods
write ``OUT/overlays/*.png`` (image | heatmap), ``OUT/heatmaps.npy`` (N, 1, H, W) and
``OUT/scores.json`` (per image: index, label, prediction, deletion/insertion AUC, ``unreliable``
and its ``reasons`` in words; plus mean +- std over the heatmaps that are not constant, with the
number left out, and a ``warning`` line counting the unreliable heatmaps by reason, which the
command prints); other kinds (``sag``) write each image's result as PNG, SVG and JSON
under ``OUT/<method>/`` and their per-image summary in ``scores.json``.

Example:
    trustvision explain --model zoo:small-cnn-digits --data digits --method igos++ --n 16 --out out/
    trustvision explain --model zoo:small-cnn-digits --data digits --method sag --n 4 --out out/
    trustvision explain --model zoo:small-cnn-digits --data digits --method rise --method-kw n_masks=500
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from trustvision._utils.keyvalue import parse_key_values
from trustvision.errors import TrustVisionError

__all__ = ["run_explain", "parse_method_kw", "method_help"]


def parse_method_kw(items: list[str] | None) -> dict[str, Any]:
    """``["n_masks=500", "baselines=blur", "mask_size=4,4"]`` -> ``{"n_masks": 500,
    "baselines": "blur", "mask_size": [4, 4]}`` (JSON values, else strings; commas make lists)."""
    return parse_key_values(items, "--method-kw", "n_masks=500")


def _nan_to_null(value: Any) -> Any:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN; a NaN mean says
    that no heatmap could be scored)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value


def method_help() -> str:
    """The ``--method`` help text, from the registry: every method and what it needs."""
    from trustvision import explain

    names = sorted(explain.list_methods(kind=None), key=lambda m: (explain.get(m).order, m))
    parts = []
    for name in names:
        cls = explain.get(name)
        notes = ([] if cls.kind == "heatmap" else [cls.kind]) + [f"{r} models" for r in cls.requires]
        parts.append(name + (f" ({', '.join(notes)})" if notes else ""))
    return "Explanation method: " + ", ".join(parts) + "."


def image_data_kwargs(data: str, model, image_size: int | None, crop: float | None) -> dict:
    """Loader options of ``--image-size`` / ``--crop``: for ``imagefolder:PATH`` the size and
    channels default to the model's (its config); other datasets take neither (a one-line error)."""
    kw: dict = {}
    if image_size is not None:
        kw["image_size"] = int(image_size)
    if crop is not None:
        kw["crop"] = float(crop)
    if isinstance(data, str) and data.startswith("imagefolder:"):
        cfg = getattr(model, "tv_config", None) or {}
        if "image_size" not in kw and cfg.get("image_size"):
            size = cfg["image_size"]
            kw["image_size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        if cfg.get("in_chans") in (1, 3):
            kw["channels"] = int(cfg["in_chans"])
    elif kw:
        raise TrustVisionError(f"--image-size and --crop apply to imagefolder:PATH data, not {data!r}")
    return kw


def _concept_model(net, data, kw: dict, shown_kw: dict, *, seed: int, data_root, track, data_kw=None):
    """The XNN a concept method explains with: the saved one ``kw["xnn"]`` names, or one fitted
    now on the training split of ``data`` (a dataset name) with ``kw["n_concepts"]`` x-features."""
    from trustvision.explain.xnn import XNN

    kw, shown_kw = dict(kw), dict(shown_kw)
    if "xnn" in kw:
        xnn = kw["xnn"] if isinstance(kw["xnn"], XNN) else XNN.load(kw["xnn"], net)
    else:
        if "fit_on" in kw:
            source = kw.pop("fit_on")
        elif isinstance(data, str):
            from trustvision import data as data_mod

            source = data_mod.load(data, split="train", root=data_root, **(data_kw or {}))
        else:
            raise TrustVisionError("xnn needs a training set to fit on: give --data a dataset name, or "
                                   "--method-kw xnn=FOLDER of a saved XNN")
        n = int(kw.get("n_concepts", 5))
        xnn = XNN(net, n_concepts=n).to(next(net.parameters()).device).fit(source, seed=seed, track=track)
        shown_kw["xnn"] = f"fitted with {n} x-features on the training split (seed {seed}), saved in xnn-model"
    kw["xnn"] = xnn
    kw.pop("n_concepts", None)
    shown_kw.pop("n_concepts", None)
    shown_kw["n_concepts"] = xnn.n_concepts
    return xnn, kw, shown_kw


def run_explain(
    model: str,
    data: str,
    method: str = "igos++",
    n: int = 16,
    out: str | Path = "explanations",
    *,
    split: str = "test",
    target: str = "predicted",
    device: str = "cpu",
    seed: int = 0,
    iterations: int | None = None,
    internal_batch_size: int | None = None,
    grid: int | None = None,
    data_root: str | None = None,
    method_kw: Mapping[str, Any] | None = None,
    echo: Callable[[str], Any] | None = print,
    progress: bool | str = False,
    concepts: int | None = None,
    image_size: int | None = None,
    crop: float | None = None,
) -> dict:
    """Explain ``n`` seeded images of ``data``/``split`` with ``method``; returns the scores dict.

    ``method_kw`` holds the method's own keywords (checked against its declared ones);
    ``iterations`` and ``grid`` are shorthands for ``method_kw["iterations"]`` / ``["grid"]``.
    When some heatmaps are unreliable, ``scores["warning"]`` counts them by reason and ``echo``
    (default ``print``; None = silent) prints it. ``progress``: True = a progress bar with an ETA
    on stderr, ``"lines"`` = one plain stderr line per finished chunk of images (images done,
    elapsed, ETA), False = silent. ``concepts``: x-features of a concept method (``xnn``); unless
    ``method_kw["xnn"]`` names a saved XNN, one is fitted on the dataset's training split and saved
    under ``out/xnn-model`` with its metrics on the explained split in scores.json and the
    top-activating images of every x-feature in ``out/xnn/top_activating.png``.
    """
    import numpy as np

    from trustvision import explain, models
    from trustvision._utils.device import resolve_device
    from trustvision._utils.io import ensure_writable_dir
    from trustvision._utils.progress import bar_tracker, line_tracker, progress_bar
    from trustvision.evaluate.faithfulness import deletion_insertion
    from trustvision.explain._base import summarise_reasons
    from trustvision.explain.plot import overlay_figure
    from trustvision.explain.sample import TARGETS

    if n < 1:
        raise TrustVisionError(f"--n must be at least 1, got {n}")
    if target not in TARGETS:
        raise TrustVisionError(f"--target must be 'predicted' or 'label', got {target!r}")
    cls = explain.get(method)  # unknown names: one-line error with a did-you-mean
    kw = dict(method_kw or {})
    for key, v in (("iterations", iterations), ("grid", grid), ("n_concepts", concepts)):
        if v is not None:
            kw[key] = v
    explain.check_keywords(cls, kw)
    ensure_writable_dir(out, "--out")  # before the work, not after it
    net = models.load(model).to(resolve_device(device)).eval()
    t0 = time.perf_counter()
    dataset, shown_kw, data_kw = data, dict(kw), {}
    if isinstance(data, str):  # bad data is a one-line error before any progress is shown
        from trustvision import data as data_mod

        data_kw = image_data_kwargs(data, net, image_size, crop)
        dataset = data_mod.load(data, split=split, root=data_root, **data_kw)
        models.check_compatible(net, dataset)
    if cls.kind == "subset" and kw.get("mask", "mean") == "mean" and isinstance(data, str):
        # mask="mean" is the training-set mean pixel (the paper's choice), not the model's fixed
        # normalisation mean: computed from the dataset's training split when it has one
        from trustvision.evaluate.overinterpretation import training_mean

        try:
            kw["mask"] = training_mean(data_mod.load(data, split="train", root=data_root, **data_kw))
            shown_kw["mask"] = f"mean: the training-set mean pixel {[round(v, 4) for v in kw['mask'].flatten().tolist()]}"
        except TrustVisionError:
            pass
    reason = cls.unmet_requirement(net)
    if reason is not None:
        raise TrustVisionError(reason)
    xnn = None
    with progress_bar(progress) as bar:
        if cls.kind == "concepts":
            xnn, kw, shown_kw = _concept_model(net, data, kw, shown_kw, seed=seed, data_root=data_root, data_kw=data_kw,
                                               track=bar_tracker(bar) if progress is True else
                                               line_tracker(unit="epochs", lines=5) if progress == "lines" else None)
        track = (bar_tracker(bar) if progress is True else line_tracker(unit="images") if progress == "lines"
                 else None)
        res = explain.explain_sample(
            net, dataset, cls, n, seed=seed, target=target, split=split, data_root=data_root,
            internal_batch_size=internal_batch_size, method_kw=kw, faithfulness=deletion_insertion,
            track=track,
        )
    out = Path(out)
    rows = res.rows()
    stems = [f"{i:03d}_idx{row['index']}" for i, row in enumerate(rows)]
    result: dict = {"model": model, "data": data, "split": split, "method": cls.name, "kind": cls.kind,
                    "n": len(rows), "seed": seed, "target": target, "method_kw": shown_kw, "images": rows}
    if res.unreliable is not None:
        bad = [i for i, u in enumerate(res.unreliable) if u]
        result["unreliable"] = len(bad)
        if bad:
            result["warning"] = (f"{len(bad)} of {len(rows)} {cls.title} heatmaps are unreliable: "
                                 f"{summarise_reasons([res.reasons[i] for i in bad])} (the reasons of "
                                 "each image are in scores.json)")
    if res.heatmaps is not None:
        heat = res.heatmaps.cpu()
        np.save(out / "heatmaps.npy", heat.numpy())
        (out / "overlays").mkdir(exist_ok=True)
        images = res.images.cpu()
        for i, row in enumerate(rows):
            title = f"{cls.title}: {res.sample.class_name(row['target'])} ({row['target_probability']:.2f})"
            overlay_figure(images[i], heat[i], title).savefig(out / "overlays" / f"{stems[i]}.png")
        if res.faithfulness is not None:
            result["summary"] = res.faithfulness
    else:
        folder = out / cls.name
        folder.mkdir(exist_ok=True)
        for stem, r in zip(stems, res.results or []):
            r.render(folder / stem)
            (folder / f"{stem}.json").write_text(json.dumps(r.to_json(), indent=1))
        if xnn is not None:
            from trustvision.audit.checks.concepts import concept_gallery

            xs, ys = dataset.tensors() if hasattr(dataset, "tensors") else (res.images, None)
            result["xnn_metrics"] = xnn.metrics((xs, ys) if ys is not None else xs).to_json()
            fig, top = concept_gallery(xnn, xs, 6, list(getattr(dataset, "classes", []) or []) or None)
            fig.savefig(folder / "top_activating.png", dpi=120)
            result["xnn_top_activating"] = top
            if "xnn" not in (method_kw or {}):
                result["xnn_model"] = str(xnn.save(out / "xnn-model"))
        result["formats"] = sorted({f.suffix[1:].upper() for f in folder.iterdir() if f.suffix}, key="PNG SVG JSON".find)
    result["seconds"] = time.perf_counter() - t0
    (out / "scores.json").write_text(json.dumps(_nan_to_null(result), indent=1, default=str))
    if echo is not None and "warning" in result:
        echo(f"warning: {result['warning']}")
    return result
