"""The ``explanations`` check: heatmaps of every method side by side, their deletion/insertion
faithfulness (mean +- std per method) and structured attention graphs for a few images."""

from __future__ import annotations

import time
import warnings

import torch

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, register_check
from trustvision.data._base import random_subset
from trustvision.errors import TrustVisionError

__all__ = ["ExplanationsCheck", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("igos", "igos++", "saliency", "integrated-gradients", "gradcam", "occlusion")


@register_check("explanations")
class ExplanationsCheck(Check):
    title = "Explanations"
    description = (
        "Where does the model look? For a seeded sample of test images (option explain_n, default "
        "8) each method's heatmap for the predicted class: I-GOS and iGOS++ (mask optimisation "
        "with integrated gradients; Qi et al. 2020, Khorram et al. 2021), saliency, integrated "
        "gradients, Grad-CAM and occlusion. Faithfulness by deletion/insertion (Petsiuk et al. "
        "2018): cells are removed from (deletion) or revealed on (insertion) a blurred baseline in "
        "the heatmap's order and the class probability is integrated over the fraction changed "
        "(trapezoid rule); lower deletion AUC and higher insertion AUC are better. Structured "
        "attention graphs (Shitole et al. 2021) show the minimal patch sets that alone keep 90% "
        "of the confidence for a few images (option sag_n, default 2). Heatmaps are unreliable "
        "where the model's confidence is low: such images are flagged."
    )
    order = 60
    version = 1

    def run(self, ctx: AuditContext) -> CheckResult:
        from trustvision import explain
        from trustvision.evaluate.faithfulness import deletion_insertion
        from trustvision.explain.plot import heatmap_grid

        n = int(ctx.option("explain_n", 8))
        methods = ctx.option("explain_methods", DEFAULT_METHODS)
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        methods = list(methods)
        iterations = int(ctx.option("explain_iterations", 15))
        sag_n = int(ctx.option("sag_n", 2))
        model = ctx.model
        x, y, _ = random_subset(ctx.dataset("test"), n, ctx.generator(offset=404))
        x = x.to(ctx.device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        pred = probs.argmax(1)
        conf = probs.max(1).values

        heatmaps: dict[str, torch.Tensor] = {}
        per_method: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        labels_for: dict[str, str] = {"igos": "I-GOS", "igos++": "iGOS++"}
        for name in methods:
            try:
                explainer = explain.get(name)(model)
            except TrustVisionError as exc:
                skipped[name] = str(exc)
                continue
            kw = {"iterations": iterations, "seed": ctx.seed} if name in ("igos", "igos++") else {}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                h = explainer.attribute(x, target=pred, **kw)
            seconds = time.perf_counter() - t0
            fi = deletion_insertion(model, x, h, target=pred, baseline="blur")
            s = fi.summary()
            heatmaps[labels_for.get(name, name)] = h.cpu()
            per_method[name] = {
                "seconds_per_image": seconds / x.shape[0],
                "deletion_auc": fi.deletion_auc,
                "insertion_auc": fi.insertion_auc,
                **s,
            }
            info = getattr(explainer, "last_info", None)
            if info is not None:
                per_method[name]["unreliable"] = info.unreliable

        titles = [
            f"{ctx.classes[int(p)] if int(p) < len(ctx.classes) else int(p)} ({float(c):.2f})"
            for p, c in zip(pred.cpu(), conf.cpu())
        ]
        show = min(6, x.shape[0])
        figures = {}
        if heatmaps:
            figures["heatmaps"] = heatmap_grid(
                x[:show].cpu(), {k: v[:show] for k, v in heatmaps.items()}, titles[:show]
            )

        sags = []
        h_img, w_img = x.shape[-2:]
        grid = int(ctx.option("sag_grid", min(7, max(1, min(h_img, w_img) // 2))))
        for i in range(min(sag_n, x.shape[0])):
            res = explain.SAG(model, grid=grid).explain(x[i], target=int(pred[i]))
            sags.append(res.to_json())
            figures[f"sag_{i}"] = res.figure()

        rows = [
            [name, m["deletion_mean"], m["deletion_std"], m["insertion_mean"], m["insertion_std"],
             m["seconds_per_image"]]
            for name, m in per_method.items()
        ]
        low = [bool(c < 0.5) for c in conf.cpu().tolist()]
        best = max(per_method, key=lambda k: per_method[k]["insertion_mean"] - per_method[k]["deletion_mean"],
                   default=None)
        summary = (
            f"{len(per_method)} methods on {x.shape[0]} test images"
            + (f"; most faithful (insertion - deletion AUC): {best}" if best else "")
            + (f"; {sum(low)} images with confidence < 0.5 (heatmaps unreliable)" if any(low) else "")
            + (f"; skipped: {', '.join(skipped)}" if skipped else "")
            + (f"; {len(sags)} structured attention graphs at grid {grid}" if sags else "")
            + "."
        )
        metrics = {}
        for name in ("igos++", "igos"):
            if name in per_method:
                metrics[f"Insertion AUC ({labels_for[name]})"] = per_method[name]["insertion_mean"]
                metrics[f"Deletion AUC ({labels_for[name]})"] = per_method[name]["deletion_mean"]
                break
        return CheckResult(
            data={
                "n_images": int(x.shape[0]),
                "predicted": pred.cpu().tolist(),
                "labels": y.tolist(),
                "confidence": conf.cpu().tolist(),
                "low_confidence": low,
                "methods": per_method,
                "skipped": skipped,
                "sag": sags,
                "sag_grid": grid,
            },
            figures=figures,
            summary=summary,
            metrics=metrics,
            tables={
                "faithfulness": {
                    "columns": ["method", "deletion AUC mean (lower better)", "deletion std",
                                "insertion AUC mean (higher better)", "insertion std",
                                "seconds / image"],
                    "rows": rows,
                }
            },
        )
