"""The ``corruptions`` check: accuracy and calibration under the 15 common corruptions x 5
severities of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich, ICLR 2019).

Opt-in (``trustvision audit --checks corruptions``): 75 corrupted copies of the test sample are
classified, which is slow for big models and images.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.errors import TrustVisionError
from trustvision.evaluate.corruptions import (
    PARAMETERS,
    CorruptionResult,
    corrupt,
    corruption_accuracy,
    list_corruptions,
)

__all__ = ["CorruptionsCheck", "accuracy_heatmap", "example_grid"]


def _drops_halfway(d: dict) -> str | None:
    clean, chance, mean = d["clean_accuracy"], d["chance"], d["mean_accuracy"]
    if clean > chance and mean < clean - 0.5 * (clean - chance):
        return (f"mean accuracy under corruption is {mean:.0%}, more than half of the way from the clean "
                f"accuracy {clean:.0%} down to chance ({chance:.0%}): everyday image degradations break the model")
    return None


def _ece_grows(d: dict) -> str | None:
    if d["ece"] and d["ece"][-1] > d["clean_ece"] + 0.1:
        return (f"the calibration error at severity {d['severities'][-1]} is {d['ece'][-1]:.3f} against "
                f"{d['clean_ece']:.3f} on clean images: the model's confidence cannot be trusted on degraded images")
    return None


def accuracy_heatmap(res: CorruptionResult) -> Figure:
    """Heat map of the accuracy per corruption (rows) x severity (columns), values written in."""
    rows = len(res.corruptions)
    fig = Figure(figsize=(1.0 * len(res.severities) + 3.4, 0.3 * rows + 1.4), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    vals = torch.tensor([res.accuracy[c] for c in res.corruptions]).numpy()
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto")  # perceptually uniform
    for i in range(rows):
        for j in range(len(res.severities)):
            ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if vals[i, j] > 0.55 else "white")
    ax.set_xticks(range(len(res.severities)), [str(s) for s in res.severities])
    ax.set_yticks(range(rows), res.corruptions, fontsize=7)
    ax.set_xlabel("severity")
    ax.set_title(f"Accuracy under corruption (clean {res.clean_accuracy:.2f}, mean {res.mean_accuracy:.2f})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="accuracy")
    return fig


def example_grid(image: torch.Tensor, corruptions, severities, seed: int = 0, index: int = 0,
                 parameters: str = "monotone") -> Figure:
    """One image (C, H, W) through every corruption (rows) and severity (columns), clean first."""
    from trustvision.explain.plot import image_to_numpy

    cols = len(severities) + 1
    fig = Figure(figsize=(1.1 * cols + 1.4, 1.1 * len(corruptions) + 0.3), dpi=100, layout="constrained")
    axes = fig.subplots(len(corruptions), cols, squeeze=False)
    cmap = "gray" if image.shape[0] == 1 else None
    for i, name in enumerate(corruptions):
        for j in range(cols):
            img = image if j == 0 else corrupt(image[None], name, severities[j - 1], seed, indices=[index],
                                                   parameters=parameters)[0]
            ax = axes[i, j]
            ax.imshow(image_to_numpy(img), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if j == 0 else f"severity {severities[j - 1]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=6)
    return fig


def _severities(values) -> list[int]:
    out = []
    for v in values:
        try:
            s = int(str(v))
        except ValueError:
            s = 0
        if not 1 <= s <= 5:
            raise TrustVisionError(f"option corruptions.severities takes integers 1..5 such as 1,3,5, got {v!r}")
        out.append(s)
    if not out:
        raise TrustVisionError("option corruptions.severities is empty; give e.g. 1,2,3,4,5")
    return sorted(set(out))


@register_check("corruptions")
class CorruptionsCheck(Check):
    title = "Common corruptions"
    description = (
        "Does the model survive everyday image degradations? (Hendrycks & Dietterich, ICLR 2019.) A seeded "
        "sample of test images (option n) is corrupted by the 15 standard types (gaussian, shot and impulse "
        "noise; defocus, glass, motion and zoom blur; snow, frost, fog and brightness; contrast, elastic "
        "transform, pixelate and JPEG compression) at severities 1 to 5, with the CIFAR-10-C parameters for "
        "images up to 64 px and the ImageNet-C parameters from 128 px on (interpolated in between; blur radii "
        "scaled to the image size; frost from a procedural texture, not the original photographs). By default six "
        "types (glass blur, snow, frost, fog, elastic, pixelate) use rows adjusted so that every severity step "
        "is stronger than the one before, which the published rows are not; option parameters=published "
        "gives the tables as published. Shown: "
        "the accuracy per type x severity, its mean over all of them (the CIFAR-10-C headline; mCE needs "
        "AlexNet reference errors and is only defined on ImageNet), the calibration error (ECE, 15 "
        "equal-width bins) per severity, and one image through every corruption. Higher accuracy and lower "
        "ECE are better."
    )
    order = 80
    version = 2  # 2: the monotone parameter set by default
    default = False  # opt-in: 75 corrupted copies of the test sample
    options = {
        "n": Option(int, 200, "test images corrupted (a seeded sample; 0 = the whole test split)", min=0),
        "severities": Option(list, ["1", "2", "3", "4", "5"], "severities evaluated (1..5)",
                             choices=("1", "2", "3", "4", "5")),
        "types": Option(list, list_corruptions, "corruption types evaluated (default all 15)",
                        choices=list_corruptions),
        "seed": Option(int, 0, "seed of the corruptions' random fields (image i is seeded from (seed, type, i))"),
        "parameters": Option(str, "monotone", "parameter set: monotone (every severity step stronger; six types "
                                              "differ from the papers) or published (the CIFAR-10-C / ImageNet-C "
                                              "tables as published)", choices=PARAMETERS),
        "example": Option(int, 0, "position in the sample of the image shown through every corruption", min=0),
    }
    metrics = {
        "Corruption accuracy": Metric("higher", "mean accuracy over every corruption type x severity evaluated "
                                                "(clean accuracy under the value)."),
        "Corruption ECE": Metric("lower", "expected calibration error ({n_bins} equal-width bins) on the corrupted "
                                          "images, mean over the severities."),
    }
    conditions = (
        Condition("corruptions cost less than half of the accuracy above chance", lambda m, d: _drops_halfway(d),
                  metric="Corruption accuracy"),
        Condition("calibration holds under corruption", lambda m, d: _ece_grows(d), metric="Corruption ECE"),
    )

    def run(self, ctx: AuditContext) -> CheckResult:
        severities = _severities(ctx.option("severities"))
        types = [t for t in list_corruptions() if t in set(ctx.option("types"))]
        if not types:
            raise TrustVisionError("option corruptions.types is empty; give e.g. gaussian-noise,fog")
        test = ctx.dataset("test")
        n = int(ctx.option("n"))
        if n and n < len(test):  # only the sampled images are read (a streamed split stays on disk)
            g = torch.Generator().manual_seed(int(ctx.seed) + 600)
            idx = torch.randperm(len(test), generator=g)[:n].sort().values
            test = test.subset(idx)
        x, y = test.tensors()
        seed = int(ctx.option("seed"))
        n_bins = int(ctx.option("n_bins", 15))
        res = corruption_accuracy(ctx.model, (x, y), severities=severities, corruptions=types,
                                  batch_size=int(ctx.option("batch_size", 256)), seed=seed, device=ctx.device,
                                  n_bins=n_bins, track=ctx.track, parameters=str(ctx.option("parameters")),
                                  executor=ctx.executor, cache=ctx.scratch(self.name))
        classes = ctx.classes
        k = len(classes) or int(getattr(ctx.model, "num_classes", 0)) or 1
        chance = 1.0 / k
        data = {**res.to_json(), "chance": chance, "image_size": list(x.shape[-2:])}
        by_sev = res.by_severity()
        ex = min(int(ctx.option("example")), x.shape[0] - 1)
        figures = {"accuracy_heatmap": accuracy_heatmap(res),
                   "examples": example_grid(x[ex], types, severities, seed, index=ex, parameters=res.parameters)}
        captions = {
            "accuracy_heatmap": (f"Accuracy of the model on {res.n} test images under each corruption (rows) at each "
                                 f"severity (columns; yellow = accurate, dark blue = wrong); clean accuracy "
                                 f"{res.clean_accuracy:.2f}, chance {chance:.2f}."),
            "examples": (f"What the model is shown: test image {ex} of the sample, clean (left) and through every "
                         "corruption at each severity, with the same random field for all severities of a type."),
        }
        tables = {
            "Accuracy under corruption": {
                "columns": ["corruption"] + [f"severity {s}" for s in severities] + ["mean"],
                "rows": [[c] + list(res.accuracy[c]) + [sum(res.accuracy[c]) / len(severities)] for c in types]
                + [["mean over types"] + by_sev + [res.mean_accuracy]]},
            f"Calibration under corruption ({n_bins} equal-width bins)": {
                "columns": ["severity", "accuracy", "mean confidence", "ECE"],
                "rows": [["clean", res.clean_accuracy, None, res.clean_ece]]
                + [[str(s), by_sev[j], res.confidence[j], res.ece[j]] for j, s in enumerate(severities)]},
        }
        worst = min(types, key=lambda c: sum(res.accuracy[c]))
        summary = (f"Mean accuracy over {len(types)} corruption types x {len(severities)} severities is "
                   f"{res.mean_accuracy:.0%} on {res.n} test images (clean {res.clean_accuracy:.0%}, chance "
                   f"{chance:.0%}); the hardest type is {worst} ({sum(res.accuracy[worst]) / len(severities):.0%}). "
                   f"ECE is {res.clean_ece:.3f} on clean images and {res.ece[-1]:.3f} at severity {severities[-1]}.")
        if math.isnan(res.mean_accuracy):  # pragma: no cover
            raise TrustVisionError("the test sample is empty; raise corruptions.n")
        return CheckResult(data=data, figures=figures, captions=captions, summary=summary,
                           metrics={"Corruption accuracy": res.mean_accuracy, "Corruption ECE": res.mean_ece},
                           notes={"Corruption accuracy": f"clean {res.clean_accuracy:.3f}"}, tables=tables)
