"""The ``explanations`` check: heatmaps of every registered method side by side, their
deletion/insertion faithfulness (mean +- std per method) and structured attention graphs for a few
images."""

from __future__ import annotations

import math

from trustvision import explain
from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.errors import TrustVisionError
from trustvision.explain._base import summarise_reasons
from trustvision.explain.sag import auto_grid

__all__ = ["ExplanationsCheck", "default_methods"]

#: seed offset of the explained images (``ctx.generator(offset=404)``)
SAMPLE_OFFSET = 404


def _unreliable(d: dict) -> str | None:
    """Explained images whose heatmaps are unreliable: low confidence, a wrong prediction, or a
    method's heatmap flagged (e.g. constant)."""
    n = len(d["predicted"])
    wrong = sum(p != y for p, y in zip(d["predicted"], d["labels"]))
    low = sum(bool(v) for v in d["low_confidence"])
    flagged = {m: sum(bool(u) for u in v.get("unreliable") or []) for m, v in d["methods"].items()}
    flagged = {m: k for m, k in flagged.items() if k}
    if not (wrong or low or flagged):
        return None
    parts = ([f"{wrong} of {n} explained images are misclassified"] if wrong else []) + \
            ([f"{low} have confidence < 0.5"] if low else []) + \
            [f"{m}: {k} unreliable heatmaps" for m, k in flagged.items()]
    return "; ".join(parts) + ": read those heatmaps with care (reasons in the check's data)"


def default_methods() -> list[str]:
    """Every registered heatmap method with ``in_audit``, by ``order`` then name (today: igos,
    igos++, saliency, integrated-gradients, gradcam, occlusion, rise)."""
    classes = [explain.get(n) for n in explain.list_methods("heatmap")]
    return [c.name for c in sorted((c for c in classes if c.in_audit), key=lambda c: (c.order, c.name))]


@register_check("explanations")
class ExplanationsCheck(Check):
    title = "Explanations"
    description = (
        "Where does the model look? For a seeded sample of test images (option n, default 8) each "
        "registered heatmap method's heatmap for the predicted class: I-GOS and iGOS++ (mask "
        "optimisation with integrated gradients; Qi et al. 2020, Khorram et al. 2021), saliency, "
        "integrated gradients, Grad-CAM, occlusion and RISE (random masks weighted by the class "
        "probability; Petsiuk et al. 2018). Faithfulness by deletion/insertion (Petsiuk et al. "
        "2018): cells are removed from (deletion) or revealed on (insertion) a blurred baseline in "
        "the heatmap's order and the class probability is integrated over the fraction changed "
        "(trapezoid rule); lower deletion AUC and higher insertion AUC are better. Structured "
        "attention graphs (Shitole et al. 2021) show the minimal patch sets that alone keep 90% "
        "of the confidence for a few images (option sag_n, default 2). Heatmaps are unreliable "
        "where the model's confidence is low, the explained class is not the predicted one, the "
        "blurred baseline still shows the class, or the heatmap is constant (the mask "
        "optimisation did not move): such heatmaps are flagged with the reason, and constant "
        "heatmaps (which rank nothing) are left out of the deletion/insertion means."
    )
    order = 60
    version = 3
    conditions = (Condition("heatmaps reliable", lambda m, d: _unreliable(d)),)
    options = {
        "n": Option(int, 8, "test images explained (a seeded sample)", min=1),
        "methods": Option(list, default_methods, "heatmap methods, in this order (default: every registered "
                                                 "heatmap method marked in_audit)",
                          choices=lambda: tuple(explain.list_methods("heatmap"))),
        "iterations": Option(int, 15, "iterations of the I-GOS family (given to the methods that declare an "
                                      "`iterations` keyword)", min=0),
        "sag_n": Option(int, 2, "images explained by a structured attention graph", min=0),
        "sag_grid": Option(int, 0, "SAG patches per side (0 = automatic: 7, or min(H, W) // 2 for small "
                                   "images)", min=0),
    }
    metrics = {
        "Insertion AUC ({method})": Metric(
            "higher", "class probability integrated while the {method} heatmap's most important cells are "
                      "revealed on a blurred image (mean over the explained test images; high = the heatmap "
                      "finds the evidence)."),
        "Deletion AUC ({method})": Metric(
            "lower", "the same while those cells are blurred away (low = removing what the heatmap points "
                     "at destroys the prediction)."),
    }

    def run(self, ctx: AuditContext) -> CheckResult:
        from trustvision.evaluate.faithfulness import deletion_insertion
        from trustvision.explain.plot import heatmap_grid

        n = int(ctx.option("n"))
        methods = list(ctx.option("methods"))
        iterations = int(ctx.option("iterations"))
        sag_n = int(ctx.option("sag_n"))
        sag_grid = int(ctx.option("sag_grid"))
        model = ctx.model
        sample = explain.draw_sample(model, ctx.dataset("test"), n, generator=ctx.generator(offset=SAMPLE_OFFSET),
                                     device=ctx.device)
        x, pred, conf = sample.images, sample.predicted, sample.confidence

        heatmaps = {}
        per_method: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        titles_of: dict[str, str] = {}
        for name in methods:
            try:
                cls = explain.get(name)
            except TrustVisionError as exc:
                skipped[name] = str(exc)
                continue
            reason = cls.unmet_requirement(model)
            if reason is not None:
                skipped[name] = reason
                continue
            kw = {"iterations": iterations} if "iterations" in cls.keywords() else {}
            res = explain.explain_images(model, sample, cls, seed=ctx.seed, method_kw=kw,
                                         faithfulness=deletion_insertion, track=ctx.track, executor=ctx.executor,
                                         cache=ctx.scratch(self.name))
            ctx.log(f"{cls.title}: {x.shape[0]} images in {res.seconds:.1f}s"
                    + (f", {res.n_unreliable()} unreliable" if res.n_unreliable() else ""))
            heatmaps[cls.title] = res.heatmaps.cpu()
            titles_of[name] = cls.title
            per_method[name] = {
                "seconds_per_image": res.seconds / x.shape[0],
                "deletion_auc": res.deletion_auc,
                "insertion_auc": res.insertion_auc,
                **res.faithfulness,
                "unreliable": res.unreliable,
                "reasons": res.reasons,
                "constant": res.constant,
                "n_unreliable": res.n_unreliable(),
            }

        labels = sample.labels.tolist()
        image_titles = [f"#{int(i)} true {sample.class_name(int(t))}\npred {sample.class_name(int(p))} ({float(c):.2f})"
                        for i, t, p, c in zip(sample.indices.tolist(), labels, pred.cpu(), conf.cpu())]
        show = x.shape[0]  # every explained image (the description's n)
        figures = {}
        if heatmaps:
            figures["heatmaps"] = heatmap_grid(
                x[:show].cpu(), {k: v[:show] for k, v in heatmaps.items()}, image_titles[:show]
            )

        captions = {"heatmaps": f"Heatmaps of {len(heatmaps)} methods for the predicted class of {x.shape[0]} test "
                                f"images (rows; title: dataset index, true and predicted class, confidence); "
                                "bright = important, each heatmap scaled to its maximum."}
        sags = []
        grid = (sag_grid, sag_grid) if sag_grid else auto_grid(*x.shape[-2:])
        if sag_n > 0:
            sag = explain.explain_images(model, sample.take(sag_n), explain.SAG, seed=ctx.seed,
                                         method_kw={"grid": grid}, track=ctx.track, executor=ctx.executor,
                                         cache=ctx.scratch(self.name))
            ctx.log(f"SAG: {len(sag.results)} images in {sag.seconds:.1f}s")
            for i, res in enumerate(sag.results):
                sags.append(res.to_json())
                idx, lab = int(sample.indices[i]), int(labels[i])
                figures[f"sag_{i}"] = res.figure(class_names=sample.classes, label=lab, index=idx)
                captions[f"sag_{i}"] = (f"SAG of test image {idx}: true {sample.class_name(lab)}, predicted "
                                        f"{sample.class_name(res.predicted)}, p = {res.probability:.2f}")

        rows = [
            [titles_of[name], m["deletion_mean"], m["deletion_std"], m["insertion_mean"], m["insertion_std"],
             m["seconds_per_image"], m["n_unreliable"], m["n_excluded"]]
            for name, m in per_method.items()
        ]
        low = [bool(c < 0.5) for c in conf.cpu().tolist()]
        scored = [k for k, m in per_method.items() if not math.isnan(m["insertion_mean"])]
        best = max(scored, key=lambda k: per_method[k]["insertion_mean"] - per_method[k]["deletion_mean"],
                   default=None)
        flagged = [f"{titles_of[k]} {m['n_unreliable']} of {x.shape[0]} ({summarise_reasons(m['reasons'])})"
                   for k, m in per_method.items() if m["n_unreliable"]]
        excluded = [f"{titles_of[k]} {m['n_excluded']}" for k, m in per_method.items() if m["n_excluded"]]
        # (the metric's baseline is the same images for every method: one count)
        kept = max((m.get("baseline_keeps_class", 0) for m in per_method.values()), default=0)
        summary = (
            f"{len(per_method)} methods on {x.shape[0]} test images"
            + (f"; most faithful (insertion - deletion AUC): {best}" if best else "")
            + (f"; {sum(low)} images with confidence < 0.5 (heatmaps unreliable)" if any(low) else "")
            + (f"; unreliable heatmaps: {'; '.join(flagged)}" if flagged else "")
            + (f"; constant heatmaps left out of the deletion/insertion means: {', '.join(excluded)}"
               if excluded else "")
            + (f"; on {kept} of {x.shape[0]} images the model still sees the class on the deletion/insertion "
               "baseline (the paper's blur): their AUCs say little" if kept else "")
            + (f"; skipped: {', '.join(skipped)}" if skipped else "")
            + (f"; {len(sags)} structured attention graphs at grid {grid[0]}" if sags else "")
            + "."
        )
        metrics, notes = {}, {}
        for name in ("igos++", "igos"):
            if name in per_method:
                m = per_method[name]
                if not math.isnan(m["insertion_mean"]):  # every heatmap constant: no meaningful mean
                    metrics[f"Insertion AUC ({titles_of[name]})"] = m["insertion_mean"]
                    metrics[f"Deletion AUC ({titles_of[name]})"] = m["deletion_mean"]
                if m["n_excluded"]:
                    note = f"mean of {m['n']} of {x.shape[0]}; {m['n_excluded']} constant heatmaps left out"
                    notes[f"Insertion AUC ({titles_of[name]})"] = notes[f"Deletion AUC ({titles_of[name]})"] = note
                break
        return CheckResult(
            data={
                "n_images": int(x.shape[0]),
                "predicted": pred.cpu().tolist(),
                "labels": sample.labels.tolist(),
                "confidence": conf.cpu().tolist(),
                "low_confidence": low,
                "methods": per_method,
                "skipped": skipped,
                "sag": sags,
                "sag_grid": grid[0] if grid[0] == grid[1] else list(grid),
            },
            figures=figures,
            captions=captions,
            summary=summary,
            metrics=metrics,
            notes=notes,
            tables={
                "faithfulness": {
                    "columns": ["method", "deletion AUC mean (lower better)", "deletion std",
                                "insertion AUC mean (higher better)", "insertion std",
                                "seconds / image", "unreliable heatmaps",
                                "constant heatmaps (left out of the means)"],
                    "rows": rows,
                }
            },
        )
