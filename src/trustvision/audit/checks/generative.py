"""The ``generative`` check: what only a generative classifier (IB-INN) can show.

Bits/dim, class-conditional samples, latent counterfactuals, the OOD table, and a side-by-side
comparison with its feed-forward twin when ``--compare`` is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from trustvision.audit.checks.ood import CONVENTION, FAILS, GENERATIVE_SCORES, WORKS, run_ood
from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.data import random_subset
from trustvision.evaluate.calibration import expected_calibration_error
from trustvision.explain.generative import (
    LatentCounterfactual,
    counterfactual_figure,
    sample_grid,
    sample_grid_figure,
)
from trustvision.models import is_generative

__all__ = ["GenerativeCheck"]


def _verdicts(res) -> dict:
    """Per OOD set: each detector's AUROC and, in words, which detectors work (>= 0.9) and which
    fail (< 0.6, near or below chance; the ood check's rule, :func:`~trustvision.audit.checks.ood.verdict`);
    the full table (AUPR, FPR) is in the ood check."""
    dets = [d for d in ("log_px", "typicality", "complexity", "max-softmax")
            if any(r["detector"] == d for r in res.rows)]
    rows = []
    for s in dict.fromkeys(r["ood_set"] for r in res.rows):
        aurocs = {d: res.get(d, s)["auroc"] for d in dets}
        works = [f"{d} ({a:.2f})" for d, a in aurocs.items() if a is not None and a >= WORKS]
        fails = [f"{d} ({a:.2f})" for d, a in aurocs.items() if a is not None and a < FAILS]
        verdict = "; ".join(part for part in (("works: " + ", ".join(works)) if works else "no detector >= 0.9",
                                              ("fails: " + ", ".join(fails)) if fails else "") if part)
        rows.append([s, *[aurocs[d] for d in dets], verdict])
    return {"columns": ["OOD set", *dets, "verdict"], "rows": rows}


#: the measured trade-off curves (``python benchmarks/gc_tradeoff.py --data D --curve FILE``)
TRADEOFF_DIR = Path(__file__).resolve().parent / "tradeoff"


def tradeoff_curve(dataset: str | None) -> dict | None:
    """The shipped beta trade-off curve of ``dataset`` (None when none was measured)."""
    path = TRADEOFF_DIR / f"{dataset}.json"
    if not dataset or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _recipe_text(recipe: dict | None) -> str:
    if not recipe:
        return "the zoo recipe"
    return ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None)


def tradeoff_point(model, gc: dict, res) -> dict:
    """The audited model's own point: its beta (None when it has none), test accuracy, ECE-15 and
    per OOD set its best generative score's AUROC (this audit's OOD sets)."""
    best = {}
    for s in dict.fromkeys(r["ood_set"] for r in res.rows):
        pool = {r["detector"]: r["auroc"] for r in res.rows
                if r["ood_set"] == s and r["detector"] in GENERATIVE_SCORES and r["auroc"] is not None}
        if pool:
            d = max(pool, key=pool.get)
            best[s] = {"detector": d, "auroc": pool[d]}
    beta = getattr(model, "beta", None)
    return {"beta": None if beta is None else float(beta), "test_accuracy": gc["accuracy"], "ece_15": gc["ece_15"],
            "ood": best}


def tradeoff_figure(curve: dict, point: dict, name: str) -> Figure:
    """Accuracy, ECE-15 and the best generative OOD AUROC per set against beta (log axis; mean
    +- std over the curve's seeds), the feed-forward twin (beta -> infinity) as a dashed line,
    and the audited model as a red star at its beta."""
    pts = [p for p in curve["points"] if p["beta"] is not None]
    twin = next((p for p in curve["points"] if p["beta"] is None), None)
    sets = [s for s in (pts[0]["ood"] if pts else {}) if s in point["ood"]] or list(pts[0]["ood"] if pts else [])
    panels = [("test accuracy", lambda p: p["test_accuracy"], point["test_accuracy"]),
              ("ECE-15 (lower is better)", lambda p: p["ece_15"], point["ece_15"])]
    panels += [(f"best generative AUROC vs {s}", (lambda p, s=s: p["ood"].get(s)),
                (point["ood"].get(s) or {}).get("auroc")) for s in sets]
    cols = min(2, len(panels))  # two panels a row: the figure sits in one model's column of the report
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=100, layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:
        ax.axis("off")
    betas = [p["beta"] for p in pts]
    for ax, (title, get, own) in zip(axes, panels):
        stats = [get(p) for p in pts]
        mean = [s["mean"] if s else float("nan") for s in stats]
        std = [(s.get("std") or 0.0) if s else 0.0 for s in stats]
        ax.errorbar(betas, mean, yerr=std, fmt="o-", color="tab:blue", capsize=2, markersize=3,
                    label=f"GC, {len(curve['seeds'])} seeds")
        t = get(twin) if twin else None
        if t:
            ax.axhline(t["mean"], color="tab:gray", linestyle="--", linewidth=1,
                       label=f"twin ({t.get('detector', 'max-softmax')})" if "detector" in t else "twin")
        if own is not None and point["beta"] is not None:
            ax.plot([point["beta"]], [own], marker="*", color="tab:red", markersize=12, linestyle="none", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("beta")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    return fig


def _likelihood_prefers_ood(d: dict) -> str | None:
    bad = [(r["ood_set"], r["auroc"]) for r in d["ood"]["rows"]
           if r["detector"] == "log_px" and r["auroc"] is not None and r["auroc"] < 0.5]
    if bad:
        sets = ", ".join(f"{s} (AUROC {a:.3f})" for s, a in bad)
        return (f"the likelihood log p(x) is higher on {sets} than on the test images: the generative model "
                "prefers these OOD images (use the typicality or complexity-corrected score there)")
    return None


@register_check("generative")
class GenerativeCheck(Check):
    title = "Generative classifier"
    description = (
        "Only for generative classifiers (IB-INN): bits per dimension of the test images (8-bit "
        "scale, lower = higher likelihood), class-conditional samples f^-1(mu_y + T eps) at "
        "temperature T = 0.8, latent counterfactuals (z moved from its class mean towards the "
        "second most likely class mean, then inverted; the last column is the pixel difference), "
        "which of its scores detect each OOD set and which fail (the full table is in the OOD check), where the "
        "model sits on the beta trade-off measured for its data set (accuracy, ECE-15 and the best generative "
        "OOD AUROC against beta over seeds; benchmarks/gc_tradeoff.py), and with --compare (the feed-forward "
        "twin) accuracy, ECE-15 and OOD AUROC side by side. " + CONVENTION
    )
    order = 45
    version = 2  # 2: the model's point on the beta trade-off curve
    uses_compare = True
    options = {
        "counterfactual_n": Option(int, 4, "test images shown with latent counterfactuals", min=1),
        "samples_per_class": Option(int, 8, "class-conditional samples per class", min=1),
        "temperature": Option(float, 0.8, "sampling temperature", min=0.0),
        "ood_n": Option(int, 500, "most images per OOD set", min=1),
    }
    metrics = {
        "Bits/dim": Metric("lower", "negative log-likelihood of the test images in bits per dimension (8-bit "
                                    "scale); generative classifiers only."),
        "Accuracy gap to twin": Metric(None, "with --compare, the difference to the feed-forward twin is under "
                                             "the value (positive = this model is more accurate).",
                                       fold_into="Accuracy", note_format="{:+.4f} vs twin"),
    }
    conditions = (Condition("the likelihood ranks the test images above every OOD set",
                            lambda m, d: _likelihood_prefers_ood(d), metric="Bits/dim"),)

    def applies_to(self, ctx: AuditContext) -> bool:
        return is_generative(ctx.model)

    def run(self, ctx: AuditContext) -> CheckResult:
        model, dev = ctx.model, ctx.device
        classes = ctx.classes
        test = ctx.dataset("test")
        batch = int(ctx.option("batch_size", 256))
        from trustvision.data.loading import image_batches

        with torch.no_grad():  # streamed: a split on disk is read batch by batch
            bpd = torch.cat([model.bits_per_dim(xb.to(dev)).cpu()
                             for xb in image_batches(test, batch, device=dev)])
        samples = sample_grid(model, n=ctx.option("samples_per_class"), temperature=ctx.option("temperature"),
                              seed=ctx.seed)
        x, _, _ = random_subset(test, ctx.option("counterfactual_n"), ctx.generator(77))
        x = x.to(dev)
        with torch.no_grad():
            second = model(x).topk(2, dim=1).indices[:, 1]
        cf = LatentCounterfactual(model).attribute(x, target=second, steps=6)
        res = run_ood(ctx, n=ctx.option("ood_n"))

        probs, y = ctx.predict("test")
        gc = {"accuracy": float((probs.argmax(1) == y).float().mean()),
              "ece_15": expected_calibration_error(probs, y, 15),
              "bits_per_dim": float(bpd.mean())}
        data = {"bits_per_dim_mean": float(bpd.mean()), "bits_per_dim_std": float(bpd.std()),
                "counterfactuals": cf.to_dict(), "ood": res.to_dict(), "model": gc}
        metrics = {"Bits/dim": float(bpd.mean())}
        tables = {"Which score detects each OOD set (AUROC, ID = positive)": _verdicts(res)}
        summary = (f"Test bits/dim {bpd.mean():.3f}. Counterfactuals reach a mean target "
                   f"probability of {float(cf.probs[:, -1].mean()):.2f}.")
        if ctx.compare is not None:
            p2, y2 = ctx.predict("test", compare=True)
            ff = {"accuracy": float((p2.argmax(1) == y2).float().mean()),
                  "ece_15": expected_calibration_error(p2, y2, 15)}
            data["compare"] = {"name": ctx.compare_name, **ff}
            rows = [["accuracy", gc["accuracy"], ff["accuracy"]],
                    ["ECE-15 (lower is better)", gc["ece_15"], ff["ece_15"]]]
            for s in ("uniform", "faces", "textures"):
                try:
                    rows.append([f"OOD AUROC vs {s} (typicality / max-softmax)",
                                 res.get("typicality", s)["auroc"],
                                 res.get("max-softmax (compare)", s)["auroc"]])
                except KeyError:
                    pass
            tables["Generative classifier vs feed-forward twin"] = {
                "columns": ["", ctx.model_name, ctx.compare_name or "compare"], "rows": rows}
            summary += (f" Against {ctx.compare_name}: accuracy {gc['accuracy']:.4f} vs "
                        f"{ff['accuracy']:.4f}, ECE-15 {gc['ece_15']:.4f} vs {ff['ece_15']:.4f}.")
            metrics["Accuracy gap to twin"] = gc["accuracy"] - ff["accuracy"]
        if not math.isfinite(float(bpd.mean())):
            summary += " Warning: non-finite likelihoods."
        figures = {
            "samples": sample_grid_figure(samples, classes),
            "counterfactuals": counterfactual_figure(cf, x.cpu(), classes),
        }
        dataset = (getattr(model, "tv_config", None) or {}).get("dataset")
        curve, point = tradeoff_curve(dataset), tradeoff_point(model, gc, res)
        data["tradeoff"] = {"dataset": dataset, "point": point, "curve": curve}
        if curve is not None and point["beta"] is not None:
            figures["tradeoff"] = tradeoff_figure(curve, point, ctx.model_name)
            near = min((p for p in curve["points"] if p["beta"] is not None),
                       key=lambda p: abs(math.log2(p["beta"]) - math.log2(point["beta"])))
            rows = [["test accuracy", point["test_accuracy"], near["test_accuracy"]["mean"]],
                    ["ECE-15", point["ece_15"], near["ece_15"]["mean"]]]
            rows += [[f"best generative AUROC vs {s} ({v['detector']})", v["auroc"],
                      near["ood"][s]["mean"]] for s, v in point["ood"].items() if s in near["ood"]]
            tables[f"This model on the beta trade-off (beta = {point['beta']:g})"] = {
                "columns": ["", ctx.model_name, f"curve at beta = {near['beta']:g} (mean of {len(curve['seeds'])} "
                                                "seeds)"], "rows": rows}
            summary += (f" On the measured beta trade-off of {dataset} it sits at beta = {point['beta']:g} "
                        f"(accuracy {point['test_accuracy']:.3f} vs the curve's {near['test_accuracy']['mean']:.3f}).")
        t = float(ctx.option("temperature"))
        captions = {
            "samples": f"Class-conditional samples f^-1(mu_y + {t:g} eps), one row per class.",
            "tradeoff": (f"The IB-INN beta trade-off measured on {dataset} (blue: mean +- std over the seeds "
                         f"{', '.join(map(str, (curve or {}).get('seeds', [])))} of one recipe, "
                         f"{_recipe_text((curve or {}).get('recipe'))}, with only beta changed; dashed: the "
                         "feed-forward twin, beta -> infinity; `python benchmarks/gc_tradeoff.py`) and this model "
                         "(red star) at its beta, measured in this audit (its OOD sets: ood_n images each; a model "
                         "trained with other settings than the curve's sits off it)."),
            "counterfactuals": "Latent counterfactuals: each row moves one test image's latent from its class mean "
                               "towards the second most likely class (p = that class's probability), then the "
                               "pixel difference (red: added, blue: removed).",
        }
        if "tradeoff" not in figures:
            captions.pop("tradeoff")
        return CheckResult(data=data, figures=figures, summary=summary, metrics=metrics,
                           tables=tables, captions=captions)
