"""Build the generative-classifier zoo entries (IB-INN + feed-forward twins) and measure them.

Usage:
    python scripts/build_zoo_generative.py                      # all four entries into the zoo
    python scripts/build_zoo_generative.py --only ibinn-small-digits --out /tmp/zoo
    python scripts/build_zoo_generative.py --measure --seeds 0,1,2 --data digits   # no saving

Each entry trains with a fixed, seeded recipe through :func:`trustvision.train.fit` and is saved
with :func:`trustvision.models.save` under ``<out>/<name>``; its metrics hold test/val accuracy,
ECE-15 (test and val), and for the generative entries the test bits/dim and typicality-test OOD
AUROCs (in-distribution positive) against uniform noise and ``faces`` (``textures`` for
faces-free sets). ``--measure`` trains GC and FF twin for each seed and prints the comparison table used in
BENCHMARKS.md (targets: GC accuracy >= 0.97, within 1.5 points of the FF twin, ECE <= FF's,
OOD AUROC >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from trustvision.evaluate.calibration import expected_calibration_error  # noqa: E402
from trustvision.evaluate.ood import build_ood_sets, evaluate_ood  # noqa: E402
from trustvision.models import is_generative  # noqa: E402
from build_zoo import build_all, save_entry, train_recipe  # noqa: E402 (scripts/ is on sys.path)

RECIPES: dict[str, dict] = {
    # Gaussian input noise sigma 0.1 (the model default is 0.05): chosen on the validation split
    # (ECE-15 / NLL over seeds 0-2, see BENCHMARKS.md); it regularises the density and the
    # posteriors of this tiny 8x8, 17-grey-level set, beta stays at the reference 1.
    "ibinn-small-digits": dict(model="ibinn-small", data="digits", epochs=40, lr=2e-3,
                               batch_size=64, augment=None, target=0.97,
                               model_kwargs=dict(noise=0.1)),
    "ibinn-small-ff-digits": dict(model="ibinn-small-ff", data="digits", epochs=40, lr=2e-3,
                                  batch_size=64, augment=None, target=0.97),
    # beta 16 (the accurate, calibrated end of the trade-off: BENCHMARKS.md), input noise 0.01 and
    # learned mixture weights: the best of issue 17's four recipe attempts (seed 0), accuracy above
    # the twin's and a lower ECE over seeds 0-2; no recipe tried lifts a generative score against
    # faces above the twin's max-softmax (the sweep that bounds it is in BENCHMARKS.md).
    "ibinn-small-textures": dict(model="ibinn-small", data="textures", epochs=25, lr=2e-3,
                                 batch_size=64, augment="shift:4,flip", target=0.85,
                                 model_kwargs=dict(widths=[32, 48, 48], beta=16.0, noise=0.01,
                                                   learn_weights=True)),
    "ibinn-small-ff-textures": dict(model="ibinn-small-ff", data="textures", epochs=25, lr=2e-3,
                                    batch_size=64, augment="shift:4,flip", target=0.85,
                                    model_kwargs=dict(widths=[32, 48, 48])),
}
GRAD_CLIP = 8.0  # reference IB-INN value
#: the recipe the textures beta sweep (benchmarks/gc_tradeoff.py) varies: the first textures zoo
#: entry (beta 1, the model's default input noise 0.05, uniform class weights), kept so the
#: measured curve stays reproducible
SWEEP_BASE: dict[str, dict] = {
    "textures": dict(model="ibinn-small", data="textures", epochs=25, lr=2e-3, batch_size=64,
                     augment="shift:4,flip", target=0.85, model_kwargs=dict(widths=[32, 48, 48])),
}


def _probs(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i: i + batch]).softmax(1) for i in range(0, len(x), batch)])


def train_entry(r: dict, seed: int, device: str, progress: bool, label: str = ""):
    """Train one recipe; returns (model, metrics dict, seconds, fit config, train set)."""
    model, res, seconds, (train_set, val_set, test_set) = train_recipe(
        r, seed, device, progress, label, grad_clip=GRAD_CLIP)
    model = model.cpu().eval()
    metrics = res.metrics()
    x_test, y_test = test_set.tensors()
    metrics["ece_15"] = expected_calibration_error(_probs(model, x_test), y_test, n_bins=15)
    x_val, y_val = val_set.tensors()  # the split the recipe was chosen on
    metrics["val_ece_15"] = expected_calibration_error(_probs(model, x_val), y_val, n_bins=15)
    if is_generative(model):
        with torch.no_grad():
            metrics["test_bits_per_dim"] = float(model.bits_per_dim(x_test).mean())
        other = "faces" if r["data"] != "faces" else "textures"
        sets = build_ood_sets(test_set, names=["uniform", other], seed=seed)
        ood = evaluate_ood(model, train_set.tensors()[0], x_test, sets)
        metrics["ood_auroc_typicality_uniform"] = ood.get("typicality", "uniform")["auroc"]
        metrics[f"ood_auroc_typicality_{other}"] = ood.get("typicality", other)["auroc"]
    return model, metrics, seconds, res.config, train_set


def build(name: str, out: Path, device: str, seed: int, progress: bool) -> dict:
    r = RECIPES[name]
    model, metrics, seconds, config, train_set = train_entry(r, seed, device, progress, f"{name} ")
    return save_entry(name, r, model, train_set, metrics, config, seconds, out,
                      threads=torch.get_num_threads())


def measure(dataset: str, seeds: list[int], device: str) -> list[dict]:
    rows = []
    for seed in seeds:
        for kind in ("ibinn-small", "ibinn-small-ff"):
            name = f"{kind}-{dataset}"
            _, m, sec, _, _ = train_entry(RECIPES[name], seed, device, False)
            rows.append({"model": kind, "seed": seed, "seconds": round(sec, 1), **m})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "trustvision" / "zoo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="multi-seed GC vs FF comparison")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default="digits", choices=["digits", "textures"])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args.data, [int(s) for s in args.seeds.split(",")], args.device)
        return 0
    return build_all(args.only or list(RECIPES),
                     lambda name: build(name, args.out, args.device, args.seed, not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
