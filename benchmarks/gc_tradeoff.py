"""The IB-INN beta trade-off: accuracy, calibration, bits/dim and OOD detection vs beta.

``python benchmarks/gc_tradeoff.py --data digits|textures [--seeds 0,1,2]
[--betas 0.25,0.5,1,2,4,8,16] [--json FILE] [--jsonl FILE] [--threads 1]`` trains, for every seed,
the dataset's zoo IB-INN recipe (``scripts/build_zoo_generative.py`` ``RECIPES``) once per beta
(only ``beta`` changes: it is a model keyword of ``ibinn-small``) and the feed-forward twin
(the beta -> infinity end: same backbone, linear head, cross-entropy) with the twin's zoo recipe.
On the test split it measures:

- accuracy; ECE-15 (15 equal-width bins on top-1 confidence) before and after temperature scaling,
  the temperature fitted by NLL on the validation split (Guo et al. 2017); test NLL likewise;
- bits/dim of the test images (generative classifiers only; ``None`` for the twin);
- the OOD AUROC, AUPR-In and FPR at 95% TPR (in-distribution = positive, higher score = more ID)
  of every detector :func:`trustvision.evaluate.ood.evaluate_ood` runs on the model: ``log_px``,
  ``typicality`` and ``complexity`` (Serra et al. 2020) for the generative classifiers, and the
  post-hoc ``max-softmax``, ``max-logit``, ``energy``, ``mahalanobis``, ``knn``, ``vim`` where they
  apply (fitted on the training split), against uniform noise and faces (digits) / faces and uniform
  noise (textures).

One JSON line per trained model is printed as it finishes (and appended to ``--jsonl``, so a run
that stops keeps what it finished; rerunning with the same ``--jsonl`` skips the finished models).
Then a table of mean +- std over seeds (sample std, ddof 1): one row per beta, the OOD columns show
the detector with the best mean AUROC per set; a second table lists every detector's mean AUROC.
``--json`` writes all rows and the summary. Training is seeded and CPU-friendly (one thread by
default: about 16 s per digits model, 70 s per textures model).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from registry import emitter  # noqa: E402

__all__ = ["DEFAULT_BETAS", "OOD_SETS_FOR", "GENERATIVE_SCORES", "recipes_for", "with_beta",
           "measure_model", "train_and_measure", "run_sweep", "summarise", "format_tables", "curve"]

DEFAULT_BETAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
#: the OOD sets per in-distribution dataset, in table order
OOD_SETS_FOR = {"digits": ("uniform", "faces"), "textures": ("faces", "uniform")}
#: the detectors that read the model's density (generative classifiers only)
GENERATIVE_SCORES = ("log_px", "typicality", "complexity")
TWIN = "inf (FF twin)"
N_BINS = 15


def recipes_for(dataset: str, gc_recipe: str | None = None) -> tuple[dict, dict]:
    """The (GC, feed-forward twin) recipes of ``dataset`` from the zoo script: the GC the sweep
    varies (``SWEEP_BASE`` where the zoo entry moved on, e.g. textures; else the zoo entry), or
    ``gc_recipe`` (another GC entry's name, e.g. the zoo entry itself) and the twin's zoo entry."""
    from build_zoo_generative import RECIPES, SWEEP_BASE

    gc = RECIPES[gc_recipe] if gc_recipe else SWEEP_BASE.get(dataset, RECIPES[f"ibinn-small-{dataset}"])
    ff = RECIPES[f"ibinn-small-ff-{dataset}"]
    if gc["data"] != dataset or ff["data"] != dataset:
        raise ValueError(f"recipe {gc_recipe!r} is not a {dataset} recipe")
    return gc, ff


def with_beta(recipe: dict, beta: float) -> dict:
    """A copy of the GC ``recipe`` with only the model's ``beta`` changed."""
    r = copy.deepcopy(recipe)
    r.setdefault("model_kwargs", {})["beta"] = float(beta)
    return r


def _outputs(model, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The model's logits (log p(y|x) for a GC: softmax-equivalent) for images (N, C, H, W)."""
    with torch.no_grad():
        return torch.cat([model(x[i: i + batch]) for i in range(0, len(x), batch)]).double()


def measure_model(model, train_set, val_set, test_set, ood_sets: dict[str, torch.Tensor]) -> dict:
    """Test-split metrics of a trained classifier (see the module docstring); plain JSON types.

    ``ood`` maps set -> detector -> {auroc, aupr_in, fpr_at_95_tpr}; ``ood_best`` maps set ->
    {detector, auroc} over all detectors; ``ood_generative_best`` the same over
    :data:`GENERATIVE_SCORES` (``None`` for a model without a density).
    """
    from trustvision.evaluate.calibration import (expected_calibration_error, fit_temperature,
                                                  negative_log_likelihood)
    from trustvision.evaluate.ood import evaluate_ood
    from trustvision.models import is_generative

    model = model.cpu().eval()
    x_tr, y_tr = train_set.tensors()
    x_val, y_val = val_set.tensors()
    x_te, y_te = test_set.tensors()
    z_val, z_te = _outputs(model, x_val), _outputs(model, x_te)
    temperature = fit_temperature(z_val, y_val)
    out: dict = {
        "test_accuracy": float((z_te.argmax(1) == y_te).double().mean()),
        "val_accuracy": float((z_val.argmax(1) == y_val).double().mean()),
        "ece_15": expected_calibration_error(z_te.softmax(1), y_te, n_bins=N_BINS),
        "ece_15_ts": expected_calibration_error((z_te / temperature).softmax(1), y_te, n_bins=N_BINS),
        "temperature": temperature,
        "test_nll": negative_log_likelihood(z_te, y_te),
        "test_nll_ts": negative_log_likelihood(z_te, y_te, temperature),
        "test_bits_per_dim": None,
    }
    generative = is_generative(model)
    if generative:
        with torch.no_grad():
            bpd = torch.cat([model.bits_per_dim(x_te[i: i + 256]) for i in range(0, len(x_te), 256)])
        out["test_bits_per_dim"] = float(bpd.mean())
    res = evaluate_ood(model, x_tr, x_te, ood_sets, y_train=y_tr)
    ood: dict[str, dict] = {name: {} for name in ood_sets}
    for row in res.rows:
        ood[row["ood_set"]][row["detector"]] = {k: float(row[k]) for k in ("auroc", "aupr_in", "fpr_at_95_tpr")}
    out["ood"] = ood
    out["ood_best"] = {s: _best(d) for s, d in ood.items()}
    out["ood_generative_best"] = {s: (_best({k: v for k, v in d.items() if k in GENERATIVE_SCORES})
                                      if generative else None) for s, d in ood.items()}
    out["ood_skipped"] = dict(res.skipped)
    if res.typicality:
        out["typicality_rejected"] = res.typicality.get("rejected_fraction", {})
    return out


def _best(per_detector: dict[str, dict]) -> dict:
    name = max(per_detector, key=lambda k: per_detector[k]["auroc"])  # ties: the first listed
    return {"detector": name, "auroc": per_detector[name]["auroc"]}


def train_and_measure(recipe: dict, seed: int, *, beta: float | None, ood_names: Sequence[str],
                      device: str = "cpu") -> dict:
    """Train ``recipe`` with ``seed`` (the zoo script's :func:`train_recipe`, gradient clip 8)
    and measure it; ``beta`` is the row's label (``None`` for the twin)."""
    from build_zoo import train_recipe
    from build_zoo_generative import GRAD_CLIP
    from trustvision.evaluate.ood import build_ood_sets

    model, _, seconds, (train_set, val_set, test_set) = train_recipe(
        recipe, seed, device, False, grad_clip=GRAD_CLIP)
    sets = build_ood_sets(test_set, names=list(ood_names), seed=seed)
    row = {"data": recipe["data"], "model": recipe["model"],
           "beta": None if beta is None else float(beta), "label": _label(beta), "seed": int(seed),
           "recipe": {k: v for k, v in recipe.items() if k != "target"},
           "train_seconds": round(seconds, 1)}
    row.update(measure_model(model, train_set, val_set, test_set, sets))
    return row


def _label(beta: float | None) -> str:
    return TWIN if beta is None else f"{beta:g}"


def run_sweep(dataset: str, seeds: Sequence[int], betas: Sequence[float], *,
              emit: Callable[[dict], None], done: set | None = None, device: str = "cpu",
              gc_recipe: str | None = None, twin: bool = True,
              epochs: int | None = None) -> None:
    """Train and measure every (seed, beta) GC and (seed) twin, seed-major, calling ``emit(row)``
    as each finishes; ``done``: (label, seed) pairs to skip; ``epochs`` overrides both recipes'
    (tests and quick looks only)."""
    gc, ff = recipes_for(dataset, gc_recipe)
    if epochs is not None:
        gc, ff = dict(gc, epochs=int(epochs)), dict(ff, epochs=int(epochs))
    done = done or set()
    jobs = [(b, with_beta(gc, b)) for b in betas] + ([(None, ff)] if twin else [])
    for seed in seeds:
        for beta, recipe in jobs:
            if (_label(beta), int(seed)) in done:
                continue
            emit(train_and_measure(recipe, seed, beta=beta, ood_names=OOD_SETS_FOR[dataset],
                                   device=device))


# -- the tables ---------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per beta (betas ascending, the twin last): each metric becomes
    ``{"mean", "std", "n"}`` (``None`` when the rows have no value), ``ood`` set -> detector ->
    AUROC stats, ``ood_best`` set -> the detector with the best mean AUROC."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    order = sorted(groups, key=lambda k: math.inf if k == TWIN else float(k))
    out = []
    for label in order:
        g = groups[label]
        s: dict = {"label": label, "beta": g[0]["beta"], "seeds": sorted(r["seed"] for r in g)}
        for key in ("test_accuracy", "ece_15", "ece_15_ts", "temperature", "test_nll", "test_nll_ts",
                    "test_bits_per_dim"):
            vals = [r[key] for r in g if r.get(key) is not None]
            s[key] = None if not vals else dict(zip(("mean", "std"), _mean_std(vals)), n=len(vals))
        s["ood"], s["ood_best"] = {}, {}
        for ood_set in g[0]["ood"]:
            dets = [d for d in g[0]["ood"][ood_set] if all(d in r["ood"][ood_set] for r in g)]
            stats = {d: dict(zip(("mean", "std"), _mean_std([r["ood"][ood_set][d]["auroc"] for r in g])))
                     for d in dets}
            s["ood"][ood_set] = stats
            best = max(stats, key=lambda d: stats[d]["mean"])
            s["ood_best"][ood_set] = {"detector": best, **stats[best]}
        out.append(s)
    return out


def _pm(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def format_tables(summary: list[dict], dataset: str) -> str:
    """The markdown tables: the main one (best detector per OOD set) and every detector's AUROC."""
    sets = list(summary[0]["ood"]) if summary else []
    lines = ["| beta | seeds | test acc | ECE-15 | ECE-15 (TS) | T | bits/dim | "
             + " | ".join(f"best AUROC vs {s}" for s in sets) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(sets)]
    for s in summary:
        ood = " | ".join(f"{_pm(s['ood_best'][o])} ({s['ood_best'][o]['detector']})" for o in sets)
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {_pm(s['test_accuracy'])} | "
                     f"{_pm(s['ece_15'], 4)} | {_pm(s['ece_15_ts'], 4)} | {_pm(s['temperature'], 2)} | "
                     f"{_pm(s['test_bits_per_dim'], 2)} | {ood} |")
    dets = []
    for s in summary:
        for o in sets:
            dets += [d for d in s["ood"][o] if d not in dets]
    lines += ["", f"OOD AUROC per detector ({dataset} in-distribution = positive; mean over seeds)", "",
              "| beta | " + " | ".join(f"{o}: {d}" for o in sets for d in dets) + " |",
              "|---|" + "---:|" * (len(sets) * len(dets))]
    for s in summary:
        cells = [f"{s['ood'][o][d]['mean']:.3f}" if d in s["ood"][o] else "-" for o in sets for d in dets]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", choices=sorted(OOD_SETS_FOR))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in DEFAULT_BETAS))
    p.add_argument("--json", type=Path, default=None, help="write all rows and the summary here")
    p.add_argument("--jsonl", type=Path, default=None,
                   help="append each row here as it finishes; finished (beta, seed) rows are skipped")
    p.add_argument("--gc-recipe", default=None, help="GC recipe name (default ibinn-small-<data>)")
    p.add_argument("--no-twin", action="store_true", help="skip the feed-forward twin")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--curve", type=Path, default=None,
                   help="write the curve the generative check draws (e.g. "
                        "src/trustvision/audit/checks/tradeoff/<data>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    betas = [float(b) for b in args.betas.split(",") if b]

    rows: list[dict] = []
    previous = [r for r in _read_jsonl(args.jsonl) if r.get("data") == args.data] if args.jsonl else []
    rows += [r for r in previous if r["seed"] in seeds]
    print_row = emitter(rows)

    def emit(row: dict) -> None:
        print_row(row)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    run_sweep(args.data, seeds, betas, emit=emit, done={(r["label"], r["seed"]) for r in rows},
              device=args.device, gc_recipe=args.gc_recipe, twin=not args.no_twin)
    wanted = {_label(b) for b in betas} | (set() if args.no_twin else {TWIN})
    rows = [r for r in rows if r["label"] in wanted]
    summary = summarise(rows)
    print(f"\nIB-INN beta trade-off on {args.data} ({len(seeds)} seeds {args.seeds}; mean +- std; "
          f"ECE with {N_BINS} bins, TS = temperature scaling fitted on val; OOD AUROC with "
          f"in-distribution positive; {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - t0:.0f} s)\n")
    print(format_tables(summary, args.data))
    if args.json:
        args.json.write_text(json.dumps({"data": args.data, "seeds": seeds, "rows": rows,
                                         "summary": summary}, indent=1))
    if args.curve:
        args.curve.parent.mkdir(parents=True, exist_ok=True)
        base = recipes_for(args.data, args.gc_recipe)[0]
        args.curve.write_text(json.dumps(curve(summary, args.data, seeds, base), indent=1) + "\n")
    return 0


def curve(summary: list[dict], dataset: str, seeds: Sequence[int], recipe: dict | None = None) -> dict:
    """The compact trade-off curve the ``generative`` audit check draws the audited model on: per
    beta (the twin last, ``beta`` None) the mean and std over seeds of the test accuracy, ECE-15
    and bits/dim, and per OOD set the best generative score's AUROC (the twin: its best post-hoc
    detector's). ``recipe``: the GC recipe the sweep varied (its settings, beta left out, are
    recorded so the check can say what the curve is of)."""
    points = []
    for s in summary:
        twin = s["label"] == TWIN
        best = {}
        for ood_set, stats in s["ood"].items():
            pool = stats if twin else {d: v for d, v in stats.items() if d in GENERATIVE_SCORES}
            if pool:
                d = max(pool, key=lambda k: pool[k]["mean"])
                best[ood_set] = {"detector": d, "mean": pool[d]["mean"], "std": pool[d]["std"]}
        points.append({"beta": None if twin else s["beta"], "label": s["label"], "seeds": s["seeds"],
                       **{k: s[k] for k in ("test_accuracy", "ece_15", "test_bits_per_dim")}, "ood": best})
    kw = {k: v for k, v in ((recipe or {}).get("model_kwargs") or {}).items() if k != "beta"}
    settings = {"epochs": (recipe or {}).get("epochs"), "augment": (recipe or {}).get("augment"), **kw}
    return {"data": dataset, "seeds": list(seeds), "recipe": settings, "command": f"python benchmarks/gc_tradeoff.py --data {dataset} "
            f"--seeds {','.join(map(str, seeds))} --curve FILE", "points": points}


if __name__ == "__main__":
    raise SystemExit(main())
