"""Rebuild the pretrained zoo shipped in ``src/trustvision/zoo``: seeded and CPU-friendly.

Usage:
    python scripts/build_zoo.py                       # all zoo models into src/trustvision/zoo
    python scripts/build_zoo.py --only small-cnn-faces --out /tmp/zoo --device cuda

Each entry trains a registered architecture on a registered dataset with a fixed recipe (seed,
epochs, learning rate, augmentation) and saves it with :func:`trustvision.models.save` as
``<out>/<name>/{model.safetensors,config.json}``, with the test/val accuracies in its metrics.
``shortcut-digits`` additionally records the accuracy on test digits that all carry the planted
marker (``test_accuracy_marked``; ``test_accuracy`` is on the clean test digits).
The whole build takes about a minute and a half on one CPU thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from trustvision import data, models  # noqa: E402
from trustvision.train import build_model, evaluate_accuracy, fit, parse_augment  # noqa: E402

#: name -> recipe. ``target`` is the test accuracy the entry must reach (the build fails below it).
RECIPES: dict[str, dict] = {
    "small-cnn-digits": dict(model="small-cnn", data="digits", epochs=15, lr=3e-3, batch_size=64,
                             augment="shift:1", target=0.97),
    "small-cnn-faces": dict(model="small-cnn", data="faces", epochs=30, lr=3e-3, batch_size=16,
                            augment="shift:2,flip", target=0.90),
    "small-cnn-textures": dict(model="small-cnn", data="textures", epochs=10, lr=3e-3, batch_size=64,
                               augment="shift:4,flip", target=0.85),
    "small-cnn-shortcut-digits": dict(model="small-cnn", data="shortcut-digits", epochs=15, lr=3e-3,
                                      batch_size=64, augment=None, target=None),
}


def train_recipe(r: dict, seed: int, device: str, progress: bool, label: str = "", **fit_kw):
    """Train recipe ``r`` (model, data, epochs, lr, batch_size, augment, optional model_kwargs)
    with :func:`fit`; returns (model, fit result, seconds, (train, val, test) datasets)."""
    train_set = data.load(r["data"], split="train")
    val_set = data.load(r["data"], split="val")
    test_set = data.load(r["data"], split="test")
    model = build_model(r["model"], train_set, seed=seed, **r.get("model_kwargs", {}))
    t0 = time.perf_counter()
    res = fit(model, train_set, val_set, test_set=test_set, epochs=r["epochs"], lr=r["lr"],
              batch_size=r["batch_size"], seed=seed, device=device, augment=parse_augment(r["augment"]),
              progress=progress, progress_label=label, **fit_kw)
    return model, res, time.perf_counter() - t0, (train_set, val_set, test_set)


def save_entry(name: str, r: dict, model, train_set, metrics: dict, config: dict, seconds: float,
               out: Path, **training_extra) -> dict:
    """Save a trained entry under ``out/name`` (metrics and training config in its config.json);
    returns its summary (``ok``: the test accuracy reached the recipe's ``target``)."""
    training = {**config, "recipe": name, "train_seconds": round(seconds, 1), **training_extra}
    path = models.save(model, out / name, classes=train_set.classes, dataset=r["data"],
                       metrics=metrics, training=training)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    ok = r["target"] is None or metrics["test_accuracy"] >= r["target"]
    return {"name": name, "metrics": metrics, "target": r["target"], "ok": ok,
            "seconds": round(seconds, 1), "size_mb": round(size / 1e6, 3)}


def build_all(names: list[str], build_one) -> int:
    """``build_one(name)`` for each name, printing a line each and the JSON summaries; the exit
    code is 1 when an entry is below its target."""
    summaries = []
    for name in names:
        s = build_one(name)
        summaries.append(s)
        acc = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
        flag = "" if s["ok"] else f"  BELOW TARGET {s['target']}"
        print(f"{name}: {acc}  ({s['seconds']}s, {s['size_mb']} MB){flag}", flush=True)
    print(json.dumps(summaries, indent=2))
    return 0 if all(s["ok"] for s in summaries) else 1


def build(name: str, out: Path, device: str, seed: int, progress: bool) -> dict:
    """Train zoo entry ``name`` and save it under ``out/name``; returns its summary."""
    r = RECIPES[name]
    model, res, seconds, (train_set, _, _) = train_recipe(
        r, seed, device, progress, f"{name} ", opt=r.get("opt", "adam"),
        weight_decay=r.get("weight_decay", 0.0))
    metrics = res.metrics()
    if r["data"] == "shortcut-digits":
        marked = data.load("shortcut-digits", split="test", marked=True)
        metrics["test_accuracy_marked"] = evaluate_accuracy(model, marked, device=device)
    return save_entry(name, r, model.cpu(), train_set, metrics, res.config, seconds, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(RECIPES),
                        help="build only this entry (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "trustvision" / "zoo",
                        help="zoo folder (default: the shipped src/trustvision/zoo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: reproducible, and fastest on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    return build_all(args.only or list(RECIPES),
                     lambda name: build(name, args.out, args.device, args.seed, not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
