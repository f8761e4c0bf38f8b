"""The ``generative`` check: what only a generative classifier (IB-INN) can show.

Bits/dim, class-conditional samples, latent counterfactuals, the OOD table, and a side-by-side
comparison with its feed-forward twin when ``--compare`` is given.
"""

from __future__ import annotations

import math

import torch

from trustvision.audit.checks.ood import CONVENTION, ood_table, run_ood
from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Metric, Option, register_check
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


@register_check("generative")
class GenerativeCheck(Check):
    title = "Generative classifier"
    description = (
        "Only for generative classifiers (IB-INN): bits per dimension of the test images (8-bit "
        "scale, lower = higher likelihood), class-conditional samples f^-1(mu_y + T eps) at "
        "temperature T = 0.8, latent counterfactuals (z moved from its class mean towards the "
        "second most likely class mean, then inverted; the last column is the pixel difference), "
        "the OOD table (typicality test vs max-softmax), and with --compare (the feed-forward "
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

    def applies_to(self, ctx: AuditContext) -> bool:
        return is_generative(ctx.model)

    def run(self, ctx: AuditContext) -> CheckResult:
        model, dev = ctx.model, ctx.device
        classes = ctx.classes
        test = ctx.dataset("test")
        batch = int(ctx.option("batch_size", 256))
        x_all = test.tensors()[0]
        with torch.no_grad():
            bpd = torch.cat([model.bits_per_dim(x_all[i: i + batch].to(dev)).cpu()
                             for i in range(0, len(x_all), batch)])
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
        tables = {"OOD detection (ID = positive)": ood_table(res)}
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
                                 res.get("max_softmax (compare)", s)["auroc"]])
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
        return CheckResult(data=data, figures=figures, summary=summary, metrics=metrics,
                           tables=tables)
