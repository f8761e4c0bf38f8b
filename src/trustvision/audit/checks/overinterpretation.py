"""The ``overinterpretation`` check: sufficient input subsets, the 5%-pixel-subset experiments,
retraining on them, the border test and the remedies (Carter et al., NeurIPS 2021).

Opt-in (``trustvision audit --checks overinterpretation``): backward selection of the training
images for the retraining takes about a minute per model on the embedded datasets on 2 CPU
cores, too long for the default audit. Each image's backward selection is stored in the check's
scratch store as soon as its chunk finishes, so an interrupted check resumes without recomputing
finished images.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.errors import TrustVisionError
from trustvision.evaluate.overinterpretation import METHODS, OverinterpretationResult, overinterpretation, show_only

__all__ = ["OverinterpretationCheck", "sis_histogram", "sis_gallery"]


def _pct(f: float) -> str:
    return f"{100 * f:.3g}%"


def _far_above_chance(acc: float, chance: float) -> bool:
    """More than halfway from chance to perfect accuracy."""
    return acc > chance + 0.5 * (1.0 - chance)


def _subsets_classify(d: dict) -> str | None:
    row, chance = d["subsets"][0], d["chance"]
    if _far_above_chance(row["bs_accuracy"], chance):
        return (f"on the {_pct(row['fraction'])} of pixels kept last by backward selection ({row['pixels']} pixels, "
                f"the rest set to the {d['mask']}) the model is still {row['bs_accuracy']:.0%} accurate "
                f"(random subsets of the same size: {row['random_accuracy']:.0%}, chance {chance:.0%}) at mean "
                f"confidence {row['bs_confidence']:.2f}: it classifies from pixels no person would call evidence "
                "(overinterpretation)")
    return None


def _retrained_classify(d: dict) -> str | None:
    r = d.get("retrain")
    if r and _far_above_chance(r["bs_accuracy"], r["chance"]):
        return (f"a fresh model trained only on the {_pct(r['fraction'])} backward-selection subsets of "
                f"{r['n_train']} training images reaches {r['bs_accuracy']:.0%} test accuracy on such subsets "
                f"(random subsets: {r['random_accuracy']:.0%}, chance {r['chance']:.0%}): the subsets carry a "
                "statistically valid signal that is meaningless to people")
    return None


def _blank_keeps_class(d: dict) -> str | None:
    s = d["sis"]
    k = s["counts"]["no-subset-needed"]
    if s["confident"] and k > 0.1 * s["confident"]:
        return (f"for {k} of {s['confident']} confidently classified images the fully masked input (every pixel "
                f"the {d['mask']}) alone keeps the class at probability >= {s['threshold']:g}: those predictions "
                "do not rest on the image, and they have no SIS")
    return None


def sis_histogram(res: OverinterpretationResult, name: str = "audited model") -> Figure:
    """Histogram of the SIS sizes (fraction of the pixels) of the confidently classified test
    images; the remedy models' sizes as outlines when they were measured."""
    fig = Figure(figsize=(6.0, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    sizes = res.sis["fractions"]
    top = max([0.05] + sizes + [f for r in (res.remedies or []) for f in r["fractions"]])
    bins = [top * i / 20 for i in range(21)]
    ax.hist(sizes, bins=bins, color="tab:blue", alpha=0.75, label=f"{name} (n = {len(sizes)})")
    for row, color in zip(res.remedies or [], ("tab:gray", "tab:orange", "tab:green")):
        ax.hist(row["fractions"], bins=bins, histtype="step", linewidth=1.5, color=color,
                label=f"{row['model']} (n = {len(row['fractions'])})")
    if res.sis["median_fraction"] is not None:
        ax.axvline(res.sis["median_fraction"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"median {res.sis['median_fraction']:.1%}")
    ax.set_xlabel("SIS size (fraction of the pixels)")
    ax.set_ylabel("test images")
    ax.set_title(f"Sufficient input subsets at threshold {res.threshold:g} ({res.method})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def sis_gallery(res: OverinterpretationResult, classes, k: int = 8) -> Figure:
    """The first ``k`` test images with a SIS: the image (top) and the image as the model sees it
    through its SIS alone (bottom, other pixels set to the mask value), with the confidence."""
    from trustvision.explain.plot import image_to_numpy

    picks = [i for i, r in enumerate(res.results) if r.ok][:k]
    cols = max(1, len(picks))
    fig = Figure(figsize=(1.5 * cols + 0.4, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)

    def name(c: int) -> str:
        return str(classes[c]) if 0 <= c < len(classes) else str(c)

    for j in range(cols):
        for ax in axes[:, j]:
            ax.axis("off")
        if j >= len(picks):
            continue
        i = picks[j]
        r = res.results[i]
        cmap = "gray" if r.image.shape[0] == 1 else None
        axes[0, j].imshow(image_to_numpy(r.image), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[0, j].set_title(f"#{res.indices[i]} true {name(res.labels[i])}\npred {name(r.predicted)} "
                             f"p = {r.probability:.2f}", fontsize=7)
        shown = show_only(r.image[None], r.pixel_mask[None], r.mask_image[:, :1, :1])[0]
        axes[1, j].imshow(image_to_numpy(shown), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[1, j].set_title(f"SIS {r.size} px ({r.fraction:.0%})\np = {r.confidence:.2f}", fontsize=7)
    return fig


def _subset_curve(res: OverinterpretationResult, chance: float) -> Figure:
    fig = Figure(figsize=(5.0, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    xs = [100 * r["fraction"] for r in res.subsets]
    ax.plot(xs, [r["bs_accuracy"] for r in res.subsets], "o-", label="kept last by backward selection")
    ax.plot(xs, [r["random_accuracy"] for r in res.subsets], "s--", label="random pixels")
    ax.axhline(chance, color="gray", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel("pixels kept (%)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return fig


def _fractions(values) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(str(v).rstrip("%")) / (100 if str(v).endswith("%") else 1)
        except ValueError:
            f = float("nan")
        if not 0 < f <= 1:
            raise TrustVisionError(f"option overinterpretation.fractions takes fractions in (0, 1] such as "
                                   f"0.05,0.1,0.2, got {v!r}")
        out.append(f)
    if not out:
        raise TrustVisionError("option overinterpretation.fractions is empty; give e.g. 0.05,0.1,0.2")
    return out


@register_check("overinterpretation")
class OverinterpretationCheck(Check):
    title = "Overinterpretation"
    description = (
        "Does the model classify from pixels no person would call evidence? (Carter et al., NeurIPS 2021.) "
        "For a seeded sample of test images (option n) backward selection removes, one pixel at a time, the "
        "pixel whose removal keeps the predicted class's probability highest (exact SIS, up to 256 pixels; "
        "Batched Gradient SIS on larger images: the k pixels with the largest gradient per step); removed "
        "pixels take the training-set mean pixel. The sufficient input subset (SIS) is the smallest set of "
        "pixels kept last that alone keeps the probability at or above the threshold (0.9). Shown: the SIS "
        "sizes, the images seen through their SIS, and the accuracy and confidence on only the 5%, 10% and "
        "20% of pixels kept last vs as many random pixels. Then fresh models of the same architecture are "
        "trained only on the 5% subsets of the training images (and on random 5% subsets), and on the image "
        "border only (the frame nearest to 5% of the pixels) vs the full images; and the same figures for a "
        "deep ensemble and a model trained with input dropout (pixels dropped with probability 0.2 while "
        "training only), the paper's remedies. High accuracy on tiny subsets, or of a model retrained on "
        "them, is the overinterpretation finding. Small SISes and subset accuracies near chance are better."
    )
    order = 70
    version = 1
    default = False  # opt-in: about 2 minutes per model on the embedded datasets on 2 CPU cores
    options = {
        "n": Option(int, 100, "test images analysed (a seeded sample; 0 = the whole test split)", min=0),
        "method": Option(str, "auto", "SIS method: exact backward selection, Batched Gradient SIS, or auto (exact "
                                      "up to 256 pixels, bgsis above)", choices=METHODS),
        "threshold": Option(float, 0.9, "probability a subset must keep to be sufficient (the paper: 0.99 on "
                                        "CIFAR, 0.9 on ImageNet)", min=0.01, max=0.9999),
        "mask": Option(str, "mean", "value of removed pixels: the training-set mean pixel or zeros",
                       choices=("mean", "zeros")),
        "fractions": Option(list, ["0.05", "0.1", "0.2"], "pixel-subset sizes of the accuracy table (the first is "
                                                          "used for retraining and the remedies)"),
        "retrain": Option(bool, True, "train fresh models on the backward-selection and random subsets"),
        "border": Option(bool, True, "train a fresh model on the image border only"),
        "remedies": Option(bool, True, "train a plain model, a deep ensemble and an input-dropout model and "
                                       "compare their SISes"),
        "train_n": Option(int, 500, "training images for every fresh model (a seeded sample; 0 = all)", min=0),
        "epochs": Option(int, 10, "epochs of every fresh model (the audited model's recipe otherwise: lr, "
                                  "batch size, optimiser; never augmentation)", min=1),
        "ensemble": Option(int, 3, "members of the remedy ensemble (the paper: 5)", min=2, max=20),
        "keep_prob": Option(float, 0.8, "input dropout keep probability of the remedy model", min=0.05, max=0.99),
        "gallery": Option(int, 8, "images shown through their SIS", min=0, max=32),
    }
    metrics = {
        "Median SIS size": Metric(None, "median SIS size (fraction of the pixels) of the confidently classified "
                                        "test images (small = few pixels suffice for a confident prediction)."),
        "Subset accuracy (BS)": Metric(None, "test accuracy on only the pixels kept last by backward selection "
                                             "(the smallest subset size of the table; the random-subset accuracy "
                                             "is under the value)."),
        "Retrained on subsets": Metric(None, "test accuracy of a fresh model trained only on the backward-selection "
                                             "subsets (far above chance = overinterpretation)."),
        "Border-only accuracy": Metric(None, "test accuracy of a fresh model trained and tested on the image "
                                             "border only (frame width under the value)."),
    }
    conditions = (
        Condition("tiny pixel subsets do not classify", lambda m, d: _subsets_classify(d),
                  metric="Subset accuracy (BS)"),
        Condition("a model trained on the subsets stays near chance", lambda m, d: _retrained_classify(d),
                  metric="Retrained on subsets"),
        Condition("the masked image is uninformative", lambda m, d: _blank_keeps_class(d),
                  metric="Median SIS size"),
    )

    def run(self, ctx: AuditContext) -> CheckResult:
        fractions = _fractions(ctx.option("fractions"))
        test = ctx.dataset("test")
        train = ctx.dataset("train") if "train" in list(ctx.datasets) else None
        wants = [bool(ctx.option(k)) for k in ("retrain", "border", "remedies")]
        res = overinterpretation(
            ctx.model, test, train, n=int(ctx.option("n")) or None, train_n=int(ctx.option("train_n")) or None,
            method=ctx.option("method"), threshold=float(ctx.option("threshold")), mask=ctx.option("mask"),
            fractions=fractions, retrain=wants[0], border=wants[1], with_remedies=wants[2],
            epochs=int(ctx.option("epochs")), ensemble=int(ctx.option("ensemble")),
            keep_prob=float(ctx.option("keep_prob")), seed=ctx.seed, device=ctx.device,
            cache=ctx.scratch(self.name), track=ctx.track, log=ctx.log, executor=ctx.executor)
        classes = ctx.classes
        k = len(classes) or int(getattr(ctx.model, "num_classes", 0)) or 1
        chance = 1.0 / k
        acc = sum(p == y for p, y in zip(res.predicted, res.labels)) / max(1, len(res.labels))
        data = {**res.to_json(), "chance": chance, "accuracy": acc, "classes": [str(c) for c in classes]}
        s, row0 = res.sis, res.subsets[0]
        pct0 = _pct(row0["fraction"])
        metrics = {"Subset accuracy (BS)": row0["bs_accuracy"]}
        notes = {"Subset accuracy (BS)": f"{pct0} of pixels; random {row0['random_accuracy']:.3f}"}
        if s["median_fraction"] is not None:
            metrics["Median SIS size"] = s["median_fraction"]
            notes["Median SIS size"] = f"{s['counts']['ok']} of {s['n']} images have a SIS"
        if res.retrain:
            metrics["Retrained on subsets"] = res.retrain["bs_accuracy"]
            notes["Retrained on subsets"] = f"{pct0} subsets; random {res.retrain['random_accuracy']:.3f}"
        if res.border:
            metrics["Border-only accuracy"] = res.border["border_accuracy"]
            notes["Border-only accuracy"] = (f"frame {res.border['width']} px = {res.border['border_fraction']:.1%} "
                                             f"of pixels; full {res.border['full_accuracy']:.3f}")

        figures, captions = {}, {}
        if s["counts"]["ok"] or any(r["fractions"] for r in (res.remedies or [])):  # no empty histogram
            figures["sis_sizes"] = sis_histogram(res, ctx.model_name)
            captions["sis_sizes"] = (
                f"How many pixels suffice: SIS sizes of the {s['counts']['ok']} test images (of {s['n']}) the "
                f"model classifies with probability >= {res.threshold:g} and that have a SIS, as a fraction of the "
                f"pixels ({res.method} backward selection, removed pixels set to the {res.mask})"
                + ("; outlines: the remedy models" if res.remedies else "") + ".")
        g = int(ctx.option("gallery"))
        if g and s["counts"]["ok"]:
            figures["gallery"] = sis_gallery(res, classes, g)
            captions["gallery"] = (
                "Test images (top: dataset index, true and predicted class, probability) and the same images seen "
                "through their sufficient input subset alone (bottom: every other pixel set to the "
                f"{res.mask}; the SIS size and the probability the model still gives the predicted class).")
        figures["subset_accuracy"] = _subset_curve(res, chance)
        captions["subset_accuracy"] = (
            f"Test accuracy of the model on {s['n']} images showing only a few pixels (the rest set to the "
            f"{res.mask}): the pixels kept last by backward selection vs as many random pixels (seeded); the "
            "dotted line is chance.")

        tables = {
            "SIS sizes": {
                "columns": ["test images", "f >= threshold", "with a SIS", "no SIS needed (masked image keeps the "
                            "class)", "below threshold", "median SIS (fraction)", "quartiles", "mean confidence "
                            "on the SIS"],
                "rows": [[s["n"], s["confident"], s["counts"]["ok"], s["counts"]["no-subset-needed"],
                          s["counts"]["below-threshold"], s["median_fraction"],
                          None if s["q25_fraction"] is None else f"{s['q25_fraction']:.3f} - {s['q75_fraction']:.3f}",
                          s["mean_confidence"]]]},
            "Accuracy on pixel subsets": {
                "columns": ["pixels kept", "pixels", "accuracy: backward selection", "mean confidence: backward "
                            "selection", "accuracy: random", "mean confidence: random"],
                "rows": [[_pct(r["fraction"]), r["pixels"], r["bs_accuracy"], r["bs_confidence"],
                          r["random_accuracy"], r["random_confidence"]] for r in res.subsets]},
        }
        if res.retrain:
            r = res.retrain
            tables[f"Fresh models trained on {_pct(r['fraction'])} subsets"] = {
                "columns": ["trained and tested on", "training images", "epochs", "test accuracy"],
                "rows": [["backward-selection subsets", r["n_train"], r["epochs"], r["bs_accuracy"]],
                         ["random subsets", r["n_train"], r["epochs"], r["random_accuracy"]],
                         ["chance", None, None, r["chance"]]]}
        if res.border:
            b = res.border
            tables["Border test"] = {
                "columns": ["trained and tested on", "pixels", "fraction of the image", "test accuracy"],
                "rows": [[f"border only (frame {b['width']} px)", b["pixels"], b["border_fraction"], b["border_accuracy"]],
                         ["full images", res.image_size[0] * res.image_size[1], 1.0, b["full_accuracy"]],
                         ["chance", None, None, b["chance"]]]}
        if res.remedies:
            tables["Remedies"] = {
                "columns": ["model", "test accuracy", "f >= threshold", "median SIS (fraction)", "mean SIS (fraction)",
                            f"accuracy on {pct0} BS subsets", f"confidence on {pct0} BS subsets",
                            f"accuracy on {pct0} random subsets"],
                "rows": [["audited model", acc, s["confident"], s["median_fraction"], s["mean_fraction"],
                          row0["bs_accuracy"], row0["bs_confidence"], row0["random_accuracy"]]]
                + [[m["model"], m["accuracy"], m["confident"], m["median_sis_fraction"], m["mean_sis_fraction"],
                    m["bs_accuracy"], m["bs_confidence"], m["random_accuracy"]] for m in res.remedies]}
        skipped = "; ".join(f"{k} skipped ({v})" for k, v in res.skipped.items())
        summary = (
            f"{s['counts']['ok']} of {s['n']} test images have a SIS at threshold {res.threshold:g} ({res.method}); "
            + (f"median size {s['median_fraction']:.1%} of the pixels. " if s["median_fraction"] is not None else "")
            + f"On the {pct0} of pixels kept last by backward selection the model is {row0['bs_accuracy']:.0%} "
              f"accurate (random {pct0}: {row0['random_accuracy']:.0%}, chance {chance:.0%})."
            + (f" A fresh model trained on such subsets reaches {res.retrain['bs_accuracy']:.0%} "
               f"(random subsets {res.retrain['random_accuracy']:.0%})." if res.retrain else "")
            + (f" Border only ({res.border['border_fraction']:.1%} of pixels): {res.border['border_accuracy']:.0%} "
               f"vs {res.border['full_accuracy']:.0%} on full images." if res.border else "")
            + (f" {skipped}." if skipped else ""))
        if math.isnan(row0["bs_accuracy"]):  # pragma: no cover - an empty sample
            raise TrustVisionError("the test sample is empty; raise overinterpretation.n")
        return CheckResult(data=data, figures=figures, captions=captions, summary=summary, metrics=metrics,
                           notes=notes, tables=tables)
