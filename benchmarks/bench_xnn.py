"""XNN benchmarks: seconds to fit and the explanation metrics for 3, 5 and 8 x-features on the
digits and textures zoo models, and the shortcut-digits ground truth (Qi, Khorram, Li 2021).

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s) for the
  runner's table: fitting an XNN on the digits training split (images of the split per second,
  activations included), and the x-feature heatmaps of 32 textures images.
* ``python benchmarks/bench_xnn.py [--device cuda] [--threads 1] [--only table|shortcut|marker]
  [--seed 0] [--seeds 0 1 2 3 4] [--json FILE]`` prints tables:

  - ``table``: per dataset (digits, textures) and L in 3, 5, 8: seconds to fit (default
    constants, training split), then on the test split the agreement of argmax y_hat with the
    model, the logit MSE, the relative reconstruction error, the mean |cos| of the x-features,
    their sparsity, y_hat's accuracy against the labels and the lowest accuracy with one
    x-feature zeroed (the model's own accuracy beside it);
  - ``shortcut``: on ``zoo:small-cnn-shortcut-digits`` (L = 5, fitted on the marked training
    split) the x-feature credited with each class (largest mean contribution on the class's marked
    training images), the share of its positive heatmap mass on the marker pixel of marked test
    images and the AUROC of its value, marked vs unmarked test images of its classes; pooled over
    all classes and per x-feature;
  - ``marker``: the literal target, ONE x-feature for all markers, on a half-marked training split
    (``marker_fraction=0.5``): per configuration (the defaults at L = 5; ``n_concepts=11,
    bias=True, eta=0``, the one documented in :mod:`trustvision.explain.xnn`) and seed
    (``--seeds``, default 0-4), the x-feature chosen on the validation split (largest min(AUROC,
    2 x marker mass)), then on the test split (``marker_fraction=0.5``) its AUROC over all marked
    vs all unmarked images, its marker mass and the agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, emitter, register, sync  # noqa: E402

SIZES = (3, 5, 8)


def _load(name: str, device):
    from trustvision import data, models

    net = models.load(f"zoo:small-cnn-{name}").to(device).eval()
    train, test = data.load(name, split="train"), data.load(name, split="test")
    return net, train, test


# -- runner workloads ------------------------------------------------------------------------


@register("xnn-fit:small-cnn-digits")
def _w_fit(device):
    from trustvision.explain.xnn import XNN

    try:
        net, train, _ = _load("digits", device)
    except Exception:
        return None
    x = train.tensors()[0].to(device)
    return Workload(run=lambda: XNN(net).fit(x), images=x.shape[0], warmup=1, min_seconds=0.5, max_runs=5)


@register("xnn-heatmaps:small-cnn-textures:b32")
def _w_heatmaps(device):
    from trustvision.explain.xnn import XNN

    try:
        net, train, test = _load("textures", device)
    except Exception:
        return None
    xnn = XNN(net).fit(train.tensors()[0].to(device), epochs=5)
    x = test.tensors()[0][:32].to(device)
    return Workload(run=lambda: xnn.heatmaps(x), images=32, warmup=1, min_seconds=0.5, max_runs=20)


# -- tables ----------------------------------------------------------------------------------


def table(device, seed: int, emit) -> None:
    from trustvision.explain.xnn import XNN

    for name in ("digits", "textures"):
        net, train, test = _load(name, device)
        xtr = train.tensors()[0].to(device)
        for L in SIZES:
            t0 = time.perf_counter()
            xnn = XNN(net, n_concepts=L).fit(xtr, seed=seed)
            sync(device)
            seconds = time.perf_counter() - t0
            m = xnn.metrics(test)
            emit({"benchmark": f"xnn:{name}", "n_concepts": L, "n_train": int(xtr.shape[0]), "n_test": m.n,
                  "fit_seconds": seconds, **{k: v for k, v in m.to_json().items() if k not in ("n", "n_concepts")},
                  "min_ablation": min(m.ablation)})


def print_table(rows: list[dict]) -> None:
    print("\nXNN on the zoo models (fit on the training split, metrics on the test split)")
    print(f"{'data':9} {'L':>2} {'fit s':>6} {'agree':>6} {'logit MSE':>9} {'recon':>6} {'|cos|':>6} "
          f"{'sparse':>6} {'acc':>6} {'min abl':>7} {'model':>6} {'dead':>4}")
    for r in rows:
        if r["benchmark"].startswith("xnn:"):
            print(f"{r['benchmark'][4:]:9} {r['n_concepts']:>2} {r['fit_seconds']:>6.1f} {r['agreement']:>6.3f} "
                  f"{r['logit_mse']:>9.3f} {r['reconstruction_error']:>6.3f} {r['mean_abs_cos']:>6.3f} "
                  f"{r['sparsity']:>6.3f} {r['accuracy']:>6.3f} {r['min_ablation']:>7.3f} "
                  f"{r['model_accuracy']:>6.3f} {r['dead']:>4}")


def _auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    diff = pos.flatten()[:, None] - neg.flatten()[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def shortcut(device, seed: int, emit) -> None:
    from trustvision import data, models
    from trustvision.explain.xnn import XNN

    net = models.load("zoo:small-cnn-shortcut-digits").to(device).eval()
    train = data.load("shortcut-digits", split="train")
    t0 = time.perf_counter()
    xnn = XNN(net, n_concepts=5).fit(train, seed=seed)
    seconds = time.perf_counter() - t0
    xt, yt = train.tensors()
    e_train = xnn.features_of(xt.to(device)).cpu()
    contrib = xnn.V.detach().cpu()[yt] * e_train
    credited = torch.stack([contrib[yt == c].mean(0).argmax() for c in range(10)])
    marked, clean = data.load("shortcut-digits", split="test", marked=True), data.load("shortcut-digits", split="test")
    (xm, ym), (xu, yu) = marked.tensors(), clean.tensors()
    heat = xnn.heatmaps(xm.to(device)).cpu().clamp_min(0)
    mass = (heat * marked.masks).sum((2, 3)) / heat.sum((2, 3)).clamp_min(1e-12)
    em, eu = xnn.features_of(xm.to(device)).cpu(), xnn.features_of(xu.to(device)).cpu()
    n = torch.arange(len(ym))
    features = []
    for l in range(xnn.n_concepts):
        classes = (credited == l).nonzero().flatten()
        sm, su = torch.isin(ym, classes), torch.isin(yu, classes)
        features.append({"x_feature": l + 1, "classes": classes.tolist(),
                         "marker_mass": float(mass[sm, l].mean()) if classes.numel() else None,
                         "auroc": _auroc(em[sm, l], eu[su, l]) if classes.numel() else None,
                         "auroc_all_images": _auroc(em[:, l], eu[:, l])})
    m = xnn.metrics(marked)
    emit({"benchmark": "xnn-shortcut:small-cnn-shortcut-digits", "n_concepts": 5, "fit_seconds": seconds,
          "marker_mass": float(mass[n, credited[ym]].mean()),
          "auroc": _auroc(em[n, credited[ym]], eu[n, credited[yu]]),
          "agreement_marked": m.agreement, "agreement_clean": xnn.metrics(clean).agreement,
          "features": features})


def print_shortcut(rows: list[dict]) -> None:
    for r in rows:
        if not r["benchmark"].startswith("xnn-shortcut"):
            continue
        print("\nshortcut-digits ground truth (L = 5): the x-feature credited with each class")
        print(f"pooled over the classes: marker-pixel share of the positive heatmap mass {r['marker_mass']:.3f}, "
              f"AUROC marked vs unmarked {r['auroc']:.3f} (agreement {r['agreement_marked']:.3f} on marked, "
              f"{r['agreement_clean']:.3f} on unmarked test images; fit {r['fit_seconds']:.1f} s)")
        print(f"{'x-feature':9} {'classes':12} {'mass':>6} {'AUROC':>6} {'AUROC (all images)':>18}")
        for f in r["features"]:
            fmt = (lambda v: f"{v:>6.3f}" if v is not None else f"{'-':>6}")
            print(f"{'x' + str(f['x_feature']):9} {str(f['classes']):12} {fmt(f['marker_mass'])} {fmt(f['auroc'])} "
                  f"{f['auroc_all_images']:>18.3f}")


MARKER_CONFIGS = {"defaults L=5": {"n_concepts": 5},
                  "L=11 bias eta=0": {"n_concepts": 11, "bias": True, "eta": 0.0}}


def _marker_scores(xnn, ds, device):
    x, m = ds.tensors()[0].to(device), ds.marked
    e = xnn.features_of(x).cpu()
    heat = xnn.heatmaps(x[m.to(device)]).cpu().clamp_min(0)
    mass = ((heat * ds.masks[m]).sum((2, 3)) / heat.sum((2, 3)).clamp_min(1e-12)).mean(0)
    return torch.tensor([_auroc(e[m, l], e[~m, l]) for l in range(e.shape[1])]), mass


def marker(device, seeds: list[int], emit) -> None:
    from trustvision import data, models
    from trustvision.explain.xnn import XNN

    net = models.load("zoo:small-cnn-shortcut-digits").to(device).eval()
    train = data.load("shortcut-digits", split="train", marker_fraction=0.5)
    val, test = (data.load("shortcut-digits", split=s, marker_fraction=0.5, return_mask=True) for s in ("val", "test"))
    for name, kw in MARKER_CONFIGS.items():
        for seed in seeds:
            xnn = XNN(net, **kw).fit(train, seed=seed)
            a_val, m_val = _marker_scores(xnn, val, device)
            chosen = int(torch.minimum(a_val, 2 * m_val).argmax())
            a, m = _marker_scores(xnn, test, device)
            met = xnn.metrics(test)
            emit({"benchmark": "xnn-marker:small-cnn-shortcut-digits", "config": name, "seed": seed,
                  "x_feature": chosen + 1, "auroc": float(a[chosen]), "marker_mass": float(m[chosen]),
                  "met": bool(a[chosen] >= 0.9 and m[chosen] >= 0.5), "agreement": met.agreement,
                  "mean_abs_cos": met.mean_abs_cos})


def print_marker(rows: list[dict]) -> None:
    rows = [r for r in rows if r["benchmark"].startswith("xnn-marker")]
    if not rows:
        return
    print("\nshortcut-digits, one x-feature for all markers (chosen on val; test split, marker_fraction=0.5)")
    print(f"{'config':16} {'seed':>4} {'x':>3} {'AUROC':>6} {'mass':>6} {'met':>4} {'agree':>6} {'|cos|':>6}")
    for r in rows:
        print(f"{r['config']:16} {r['seed']:>4} {r['x_feature']:>3} {r['auroc']:>6.3f} {r['marker_mass']:>6.3f} "
              f"{'yes' if r['met'] else 'no':>4} {r['agreement']:>6.3f} {r['mean_abs_cos']:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["table", "shortcut", "marker"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of --only marker")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out: list[dict] = []
    emit = emitter(out)
    if args.only in (None, "table"):
        table(device, args.seed, emit)
        print_table(out)
    if args.only in (None, "shortcut"):
        shortcut(device, args.seed, emit)
        print_shortcut(out)
    if args.only in (None, "marker"):
        marker(device, args.seeds, emit)
        print_marker(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
