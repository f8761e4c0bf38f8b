"""The ``generative`` check: what only a generative classifier (IB-INN) can show.

Bits/dim, class-conditional samples, latent counterfactuals, the OOD table, and a side-by-side
comparison with its feed-forward twin when ``--compare`` is given.
"""

from __future__ import annotations

import math

import torch

from trustvision.audit.checks.ood import CONVENTION, run_ood
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


WORKS, FAILS = 0.9, 0.6


def _verdicts(res) -> dict:
    """Per OOD set: each detector's AUROC and, in words, which detectors work (>= 0.9) and which
    fail (< 0.6, near or below chance); the full table (AUPR, FPR) is in the ood check."""
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
        "which of its scores detect each OOD set and which fail (the full table is in the OOD check), and with --compare (the feed-forward "
        "twin) accuracy, ECE-15 and OOD AUROC side by side. " + CONVENTION
    )
    order = 45
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
        from trustvision.evaluate.detectors import image_batches

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
        t = float(ctx.option("temperature"))
        captions = {
            "samples": f"Class-conditional samples f^-1(mu_y + {t:g} eps), one row per class.",
            "counterfactuals": "Latent counterfactuals: each row moves one test image's latent from its class mean "
                               "towards the second most likely class (p = that class's probability), then the "
                               "pixel difference (red: added, blue: removed).",
        }
        return CheckResult(data=data, figures=figures, summary=summary, metrics=metrics,
                           tables=tables, captions=captions)
