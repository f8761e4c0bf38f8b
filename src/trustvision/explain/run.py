"""``trustvision explain``: explain a sample of a dataset and write overlays, heatmaps and scores.

Example:
    trustvision explain --model zoo:small-cnn-digits --data digits --method igos++ --n 16 --out out/
    trustvision explain --model zoo:small-cnn-digits --data digits --method sag --n 4 --out out/
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from trustvision._utils.device import resolve_device
from trustvision.data._base import random_subset
from trustvision.errors import TrustVisionError

__all__ = ["run_explain"]


def _device(device: str) -> str:
    return str(resolve_device(device))


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
) -> dict:
    """Explain ``n`` seeded images of ``data``/``split`` with ``method``; returns the scores dict.

    Writes ``out/overlays/*.png`` (image | heatmap), ``out/heatmaps.npy`` (N, 1, H, W) and
    ``out/scores.json`` (per image: index, label, prediction, deletion/insertion AUC, reliability
    flags; plus mean +- std). ``method="sag"`` writes ``out/sag/*.{png,svg,json}`` instead.
    """
    from trustvision import data as tv_data
    from trustvision import explain, models
    from trustvision.evaluate.faithfulness import deletion_insertion
    from trustvision.explain.plot import overlay_figure

    if n < 1:
        raise TrustVisionError(f"--n must be at least 1, got {n}")
    if target not in ("predicted", "label"):
        raise TrustVisionError(f"--target must be 'predicted' or 'label', got {target!r}")
    is_sag = method == "sag"
    if not is_sag:
        cls = explain.get(method)  # unknown names: one-line error with a did-you-mean
    dev = _device(device)
    net = models.load(model).to(dev).eval()
    ds = tv_data.load(data, split=split, root=data_root)
    models.check_compatible(net, ds)
    x, y, idx = random_subset(ds, n, torch.Generator().manual_seed(seed))
    x = x.to(dev)
    with torch.no_grad():
        probs = torch.softmax(net(x), dim=1)
    pred = probs.argmax(1)
    t = pred if target == "predicted" else y.to(dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(getattr(ds, "classes", []))

    def cname(c: int) -> str:
        return classes[c] if c < len(classes) else str(c)

    rows = []
    for i in range(x.shape[0]):
        rows.append({
            "index": int(idx[i]), "label": int(y[i]), "predicted": int(pred[i]),
            "target": int(t[i]), "target_probability": float(probs[i, t[i]]),
            "low_confidence": bool(probs[i, t[i]] < 0.5), "wrong_prediction": bool(pred[i] != y[i]),
        })
    result: dict = {"model": model, "data": data, "split": split, "method": method, "n": len(rows),
                    "seed": seed, "target": target, "images": rows}
    t0 = time.perf_counter()
    if is_sag:
        h, w = x.shape[-2:]
        g = grid or min(7, max(1, min(h, w) // 2))
        sag = explain.SAG(net, grid=g)
        (out / "sag").mkdir(exist_ok=True)
        for i, row in enumerate(rows):
            res = sag.explain(x[i], target=int(t[i]))
            stem = out / "sag" / f"{i:03d}_idx{row['index']}"
            res.render(stem)
            stem.with_suffix(".json").write_text(json.dumps(res.to_json(), indent=1))
            row["roots"] = [list(r) for r in res.roots]
            row["diverse_roots"] = [list(res.roots[k]) for k in res.diverse]
            row["forward_passes"] = res.forward_passes
        result["grid"] = g
    else:
        kw: dict = {}
        if method in ("igos", "igos++"):
            kw = {"seed": seed, "internal_batch_size": internal_batch_size}
            if iterations is not None:
                kw["iterations"] = iterations
        explainer = cls(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heat = explainer.attribute(x, target=t, **kw)
        fi = deletion_insertion(net, x, heat, target=t, baseline="blur")
        info = getattr(explainer, "last_info", None)
        (out / "overlays").mkdir(exist_ok=True)
        import numpy as np

        np.save(out / "heatmaps.npy", heat.cpu().numpy())
        for i, row in enumerate(rows):
            row["deletion_auc"] = fi.deletion_auc[i]
            row["insertion_auc"] = fi.insertion_auc[i]
            if info is not None:
                row["unreliable"] = info.unreliable[i]
            title = f"{method}: {cname(row['target'])} ({row['target_probability']:.2f})"
            fig = overlay_figure(x[i].cpu(), heat[i].cpu(), title)
            fig.savefig(out / "overlays" / f"{i:03d}_idx{row['index']}.png")
        result["summary"] = fi.summary()
    result["seconds"] = time.perf_counter() - t0
    (out / "scores.json").write_text(json.dumps(result, indent=1))
    return result
