"""The ``ood`` check: out-of-distribution detection on OOD sets built from the embedded data.

Every model is scored by the post-hoc detectors of :mod:`trustvision.evaluate.detectors`
(max-softmax, max-logit, energy, and on penultimate features Mahalanobis, KNN and ViM, fitted on
the training split); generative classifiers also by log p(x), the two-tailed typicality test on L_X
and the complexity-corrected score; the ``--compare`` model by max-softmax.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.evaluate.ood import OOD_SETS, OODResult, build_ood_sets, evaluate_ood, list_detectors, split_labels

__all__ = ["OODCheck", "run_ood", "ood_table", "ood_figure", "generative_verdicts", "verdict", "WORKS", "FAILS",
           "SUMMARY_SETS"]

#: OOD sets whose AUROC goes to the report's summary table (one column each)
SUMMARY_SETS = ("uniform", "faces", "textures")

OOD_LEGEND = ("AUROC for telling the test images (positive) from out-of-distribution images of the same "
              "shape (0.5 = chance, 1 = perfect), by the model's best detector on that set, named under "
              "the value (max-softmax, max-logit, energy, mahalanobis, knn, vim; for generative "
              "classifiers also log_px, typicality = two-tailed typicality test on -log p(x)/D, "
              "complexity). Every detector and OOD set is in each model's out-of-distribution section.")

CONVENTION = ("Higher score = more in-distribution; the in-distribution test images are the "
              "positive class for AUROC, AUPR-In and FPR at 95% TPR (OpenOOD uses the opposite).")


def run_ood(ctx: AuditContext, sets=OOD_SETS, n: int = 500) -> OODResult:
    """OOD evaluation of ``ctx.model`` (and ``ctx.compare``) on ``sets`` built from the test split,
    each at most ``n`` images."""
    test, train = ctx.dataset("test"), ctx.dataset("train")
    ood_sets = build_ood_sets(test, names=sets, n=min(len(test), int(n)), seed=ctx.seed)
    # the training split fits the detectors (class means, covariance, neighbours, principal space)
    # and sets the typicality threshold; both splits are streamed batch by batch (slices of the
    # tensors of a split held in memory)
    x_test, x_train, y_train = test, train, split_labels(train)
    batch = int(ctx.option("batch_size", 256))
    model, cmp = ctx.model, ctx.compare
    return evaluate_ood(model, x_train, x_test, ood_sets, y_train=y_train, detectors=ctx.option("detectors"),
                        compare=cmp, batch_size=batch)


#: the generative classifier's own scores
GENERATIVE_SCORES = ("log_px", "typicality", "complexity")


#: the one rule for a detector's AUROC against an OOD set (the ood and generative checks): it
#: works at >= WORKS, fails below FAILS (near or below chance), is weak in between
WORKS, FAILS = 0.9, 0.6


def verdict(auroc: float) -> str:
    """"works", "weak", or "fails: ..." with the reason (near chance, or below it: the detector
    scores the OOD set as more in-distribution than the test set)."""
    if auroc >= WORKS:
        return "works"
    if auroc < 0.5:
        return "fails: scores the OOD set as more in-distribution"
    if auroc < FAILS:
        return "fails: near chance"
    return "weak"


def generative_verdicts(res: OODResult) -> dict | None:
    """For a generative classifier: per OOD set, each generative score's AUROC with a plain
    :func:`verdict` (works >= 0.9; fails < 0.6, near chance or below it, where the likelihood
    prefers the OOD images; weak in between) next to the best post-hoc detector; and one
    sentence naming what fails. None for other models."""
    rows, fails, works = [], [], []
    for s in dict.fromkeys(r["ood_set"] for r in res.rows):
        gen = {r["detector"]: r["auroc"] for r in res.rows if r["ood_set"] == s and r["detector"] in GENERATIVE_SCORES}
        if not gen:
            continue
        post = [r for r in res.rows if r["ood_set"] == s and r["detector"] not in GENERATIVE_SCORES
                and not r["detector"].endswith("(compare)")]
        best_post = max(post, key=lambda r: r["auroc"]) if post else None
        for d, a in gen.items():
            v = verdict(a)
            rows.append([s, d, a, v, best_post["detector"] if best_post else None,
                         best_post["auroc"] if best_post else None])
            (fails if v.startswith("fails") else works if v == "works" else []).append(f"{d} vs {s}")
    if not rows:
        return None
    sentence = ("Generative scores that work (AUROC >= 0.9): " + (", ".join(works) or "none") + "."
                + (" Failing (AUROC < 0.6: near chance, or below it where the model's likelihood prefers the OOD "
                   "images): " + ", ".join(fails) + "."
                   if fails else ""))
    return {"table": {"columns": ["OOD set", "generative score", "AUROC", "verdict", "best post-hoc detector",
                                  "its AUROC"], "rows": rows}, "sentence": sentence}


def _below_chance(metrics: dict, ood_set: str) -> str | None:
    auroc = metrics.get(f"OOD AUROC vs {ood_set}")
    if auroc is not None and auroc < 0.5:
        return (f"AUROC {auroc:.3f} vs {ood_set} is below chance: the model's detector scores {ood_set} images as "
                "more in-distribution than its own test images")
    return None


def ood_table(res: OODResult) -> dict:
    """Per OOD set, every detector's AUROC, AUPR-In, AUPR-Out and FPR@95%TPR; the best (highest
    AUROC) of each set is marked."""
    rows = []
    for s in dict.fromkeys(r["ood_set"] for r in res.rows):
        best = res.best(s)["detector"]
        for r in (r for r in res.rows if r["ood_set"] == s):
            rows.append([s, r["detector"], r["auroc"], r["aupr_in"], r["aupr_out"], r["fpr_at_95_tpr"],
                         "best" if r["detector"] == best else ""])
    return {"columns": ["OOD set", "detector", "AUROC", "AUPR-In", "AUPR-Out", "FPR@95%TPR", "best AUROC"],
            "rows": rows}


def ood_figure(res: OODResult) -> Figure:
    dets = list(dict.fromkeys(r["detector"] for r in res.rows))
    sets = list(dict.fromkeys(r["ood_set"] for r in res.rows))
    fig = Figure(figsize=(0.25 * len(dets) * len(sets) + 4.0, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(dets), 1)
    for i, d in enumerate(dets):
        vals = [res.get(d, s)["auroc"] for s in sets]
        ax.bar([j + i * width for j in range(len(sets))], vals, width, label=d)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("AUROC (ID positive)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="detector", title_fontsize=7,
              frameon=False)  # beside the axes, never over the bars
    return fig


@register_check("ood")
class OODCheck(Check):
    title = "Out-of-distribution detection"
    description = (
        "Can the model tell images unlike its training data? OOD sets built from the embedded data "
        "and shaped like the test images: faces and textures (converted to the test image size and "
        "channels), uniform noise, Gaussian noise (ID mean/std), and the test images rotated by 90 "
        "degrees and inverted. Detectors for every classifier: maximum softmax probability, maximum "
        "logit, energy (T = 1), and on the penultimate features Mahalanobis distance (class means, "
        "shared covariance), KNN (k = 50, normalised features; Sun et al. 2022) and ViM (Wang et al. "
        "2022), fitted on the training split; max-softmax of the --compare model; for generative "
        "classifiers also log p(x), the two-tailed typicality "
        "test on L_X = -log p(x)/D with its threshold from the training images (Mackowiak et al. "
        "2021), and the complexity-corrected score -log2 p(x) - PNG bits (Serra et al. 2020). "
        + CONVENTION + " Higher AUROC/AUPR and lower FPR are better."
    )
    order = 40
    version = 4  # 4: no energy / max-logit on log-probabilities; the generative verdicts
    uses_compare = True
    options = {
        "n": Option(int, 500, "most images per OOD set (all ID test images are used)", min=1),
        "sets": Option(list, list(OOD_SETS), "OOD sets to build", choices=tuple(OOD_SETS)),
        "detectors": Option(list, list_detectors, "post-hoc detectors (those that apply to the model run)",
                            choices=list_detectors),
    }
    metrics = {"OOD AUROC vs {set}": Metric("higher", OOD_LEGEND, group="OOD AUROC")}
    conditions = tuple(Condition(f"detects {s} better than chance", (lambda m, d, s=s: _below_chance(m, s)),
                                 metric=f"OOD AUROC vs {s}") for s in SUMMARY_SETS)

    def run(self, ctx: AuditContext) -> CheckResult:
        res = run_ood(ctx, sets=ctx.option("sets"), n=ctx.option("n"))
        best = max(res.rows, key=lambda r: r["auroc"])
        worst = min(res.rows, key=lambda r: r["auroc"])
        summary = (f"Best detector/set: {best['detector']} on {best['ood_set']} (AUROC "
                   f"{best['auroc']:.3f}); hardest: {worst['detector']} on {worst['ood_set']} "
                   f"(AUROC {worst['auroc']:.3f}). {CONVENTION}")
        # one summary number per OOD set: the AUROC of the model's best detector on it (named
        # under the value), so every model has the same columns
        metrics, notes = {}, {}
        for s in SUMMARY_SETS:
            try:
                b = res.best(s)
            except KeyError:
                continue
            metrics[f"OOD AUROC vs {s}"] = b["auroc"]
            notes[f"OOD AUROC vs {s}"] = b["detector"].replace("_", "-")
        if res.skipped:
            summary += " Not run: " + "; ".join(f"{k} ({v})" for k, v in res.skipped.items()) + "."
        tables = {"OOD detection (ID = positive)": ood_table(res)}
        verdicts = generative_verdicts(res)
        if verdicts:
            tables["Generative scores: which work and which fail"] = verdicts["table"]
            summary += " " + verdicts["sentence"]
        return CheckResult(data=res.to_dict(), figures={"auroc": ood_figure(res)}, summary=summary,
                           captions={"auroc": "AUROC of every detector (bars) against every OOD set: the test "
                                              "images are the positive class; 0.5 (dotted) is chance, 1 perfect. "
                                              "The table marks the best detector of each set."},
                           metrics=metrics, notes=notes, tables=tables)
