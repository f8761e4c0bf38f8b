"""The ``criticism`` check: the model's own view of each class (MMD-critic prototypes and
criticisms in its feature space), the review of its mistakes next to those prototypes, and a bias
probe when the data carry a planted ground-truth attribute (Stock & Cisse, ECCV 2018; Kim et al.,
NeurIPS 2016).

Per class of the model's *predicted* labels (Stock & Cisse's choice: what the model calls a
"basketball"), and optionally of the true labels, MMD-critic picks the prototypes that summarise
the class's features best and the criticisms they explain worst. Misclassified test images,
most confident first, are shown with their top-3 probabilities, a heatmap and the nearest
prototypes of the predicted and of the true class, so a person can judge whether the mistake is
plausible. The 1-nearest-prototype classifier (prototypes of the training split, by true label)
measures how well the prototypes summarise the classes, against random and k-medoids prototypes of
the same size. When the audited split has a per-image ``marked`` attribute (the planted shortcut
of ``shortcut-digits``), the enrichment of unmarked images among the criticisms and of marked
images among the prototypes is reported against each class's base rate.
"""

from __future__ import annotations

import warnings

import torch
from matplotlib.figure import Figure
from scipy.stats import binom

from trustvision import explain
from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.errors import TrustVisionError
from trustvision.evaluate.criticism import bias_enrichment, median_gamma, mmd_critic, prototype_curve
from trustvision.data import TensorImageDataset, item_attribute
from trustvision.evaluate.detectors import has_features, model_outputs
from trustvision.evaluate.ood import split_labels
from trustvision.explain._base import ExplanationWarning

__all__ = ["CriticismCheck", "class_gallery", "mistake_figure", "class_criticism"]

#: seed offset of the baselines' draws
SEED_OFFSET = 1414


def class_criticism(features: torch.Tensor, labels: torch.Tensor, n_prototypes: int, n_criticisms: int,
                    gamma: float) -> dict[int, dict]:
    """Per class present in ``labels``: MMD-critic prototypes and criticisms (indices into
    ``features``), with at most as many as the class can give (a class of n images gets
    min(n_prototypes, n) prototypes and min(n_criticisms, n - prototypes) criticisms), one shared
    ``gamma``; plus each class's MMD^2 after its last prototype."""
    out: dict[int, dict] = {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        m = min(n_prototypes, len(idx))
        k = min(n_criticisms, len(idx) - m)
        r = mmd_critic(features[idx], n_prototypes=m, n_criticisms=k, gamma=gamma, per_class=False)
        out[int(c)] = {"prototypes": idx[r.prototypes].tolist(), "criticisms": idx[r.criticisms].tolist(),
                       "witness": [float(r.witness[i]) for i in r.criticisms.tolist()],
                       "mmd2": r.mmd2["all"][-1] if r.mmd2["all"] else None, "n": len(idx)}
    return out


def _show(ax, img: torch.Tensor) -> None:
    from trustvision.explain.plot import image_to_numpy

    ax.imshow(image_to_numpy(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")


def class_gallery(x: torch.Tensor, groups: dict[int, dict], confidence: torch.Tensor, names,
                  title: str) -> Figure:
    """Rows = classes; the prototypes (left) then the criticisms (right, red titles) of each class,
    the model's confidence in its prediction under each image."""
    rows = list(groups)
    m = max((len(g["prototypes"]) for g in groups.values()), default=0)
    k = max((len(g["criticisms"]) for g in groups.values()), default=0)
    cols = max(1, m + k)
    fig = Figure(figsize=(0.95 * cols + 1.2, 1.05 * max(1, len(rows)) + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(max(1, len(rows)), cols, squeeze=False)
    for r, c in enumerate(rows):
        g = groups[c]
        for j in range(cols):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            idx = g["prototypes"][j] if j < m and j < len(g["prototypes"]) else (
                g["criticisms"][j - m] if j >= m and j - m < len(g["criticisms"]) else None)
            if idx is None:
                continue
            _show(ax, x[idx])
            ax.set_title(f"{float(confidence[idx]):.2f}", fontsize=7, color="black" if j < m else "firebrick")
        axes[r, 0].set_ylabel(names(c), fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    return fig


def mistake_figure(rows: list[dict], x: torch.Tensor, heat: torch.Tensor | None, protos: torch.Tensor,
                   names, k_near: int) -> Figure:
    """One row per mistake: the image, its heatmap, the nearest prototypes of the predicted class,
    then those of the true class."""
    cols = 2 + 2 * k_near
    fig = Figure(figsize=(1.15 * cols + 0.3, 1.35 * max(1, len(rows)) + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(max(1, len(rows)), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        i = row["position"]
        _show(axes[r, 0], x[i])
        axes[r, 0].set_title(f"#{row['index']} true {names(row['true'])}\npred {names(row['predicted'])} "
                             f"{row['top3'][0][1]:.2f}", fontsize=7)
        if heat is not None:
            _show(axes[r, 1], x[i])
            axes[r, 1].imshow(heat[r, 0].numpy(), cmap="jet", alpha=0.5, interpolation="nearest")
            axes[r, 1].set_title("heatmap", fontsize=7)
        for j, p in enumerate(row["near_predicted"][:k_near]):
            _show(axes[r, 2 + j], protos[p])
            axes[r, 2 + j].set_title(f"proto {names(row['predicted'])}", fontsize=7)
        for j, p in enumerate(row["near_true"][:k_near]):
            _show(axes[r, 2 + k_near + j], protos[p])
            axes[r, 2 + k_near + j].set_title(f"proto {names(row['true'])}", fontsize=7, color="darkgreen")
    return fig


def _enriched(d: dict) -> str | None:
    probe = d.get("bias_probe")
    if not probe:
        return None
    r, pv = probe.get("criticism_enrichment"), probe.get("p_value")
    if r is not None and r >= 1.5 and pv is not None and pv < 1e-3:
        return (f"the criticisms of the classes are {r:.1f}x enriched for images without the planted marker "
                f"(rate {probe['criticism_unmarked_rate']:.0%} vs base rate {probe['base_unmarked_rate']:.0%}, "
                f"one-sided binomial p = {pv:.1g}): in the model's feature space the marker is part of what each "
                "class looks like")
    return None


@register_check("criticism")
class CriticismCheck(Check):
    title = "Model criticism and mistakes"
    description = (
        "How does the model see each class, and are its mistakes plausible? (Stock & Cisse, ECCV 2018.) In the "
        "model's feature space (model.features(x), the input of its last layer; option space=pixels: the raw "
        "pixels), MMD-critic (Kim et al., NeurIPS "
        "2016; RBF kernel, gamma by the median heuristic, one kernel block per class) picks per class the "
        "prototypes that summarise it best and the criticisms (red) the prototypes explain worst; classes are the "
        "model's predicted labels, as Stock & Cisse do (option by adds the true labels). Shared attributes of the "
        "prototypes reveal what the model takes the class to be; criticisms show what it does not. The "
        "misclassified test images, most confident first, are shown with their top-3 probabilities, a heatmap "
        "(option method) and the nearest prototypes of the predicted class and of the true class (green): a "
        "mistake whose image resembles the predicted class's prototypes is plausible. The 1-nearest-prototype "
        "classifier (prototypes of the training split by true label) measures how well the prototypes summarise "
        "the classes, against random and k-medoids prototypes of the same size (higher is better). When the data "
        "carry a planted marker (shortcut-digits), the criticisms' enrichment for unmarked images is reported."
    )
    order = 68
    version = 1
    options = {
        "split": Option(str, "test", "split whose images are criticised and reviewed", choices=("test", "val", "train")),
        "by": Option(list, ["predicted"], "class labels of the galleries: predicted (the model's), true, or both",
                     choices=("predicted", "true")),
        "prototypes": Option(int, 5, "prototypes per class", min=1, max=50),
        "criticisms": Option(int, 5, "criticisms per class", min=0, max=50),
        "mistakes": Option(int, 8, "misclassified images reviewed (most confident first)", min=0, max=64),
        "nearest": Option(int, 2, "nearest prototypes shown per mistake for each of the two classes", min=1, max=5),
        "method": Option(str, "saliency", "heatmap method of the mistake review ('none' for no heatmaps)",
                         choices=lambda: ("none", *explain.list_methods("heatmap"))),
        "space": Option(str, "features", "where prototypes and criticisms are chosen: the model's penultimate "
                                         "features, or the raw pixels (the paper's USPS setting)",
                        choices=("features", "pixels")),
        "curve": Option(list, ["1", "2", "5", "10"], "prototypes per class of the 1-nearest-prototype evaluation "
                                                     "(empty: skip it)"),
    }
    metrics = {
        "Confident mistakes": Metric(
            "lower", "share of the reviewed split's misclassified images predicted with probability >= 0.9"),
        "Criticism enrichment (unmarked)": Metric(
            "lower", "data with a planted marker: the rate of unmarked images among the criticisms (true classes) "
                     "divided by their base rate; 1 = criticisms ignore the marker"),
    }
    conditions = (
        Condition("criticisms are not enriched for unmarked images (>= 1.5x at binomial p < 0.001)",
                  lambda m, d: _enriched(d),
                  metric="Criticism enrichment (unmarked)"),
    )

    def applies_to(self, ctx: AuditContext) -> bool:
        return has_features(ctx.model) or ctx.option("space") == "pixels"

    def run(self, ctx: AuditContext) -> CheckResult:
        model = ctx.model
        space = str(ctx.option("space"))
        split = str(ctx.option("split"))
        if split not in ctx.datasets:
            raise TrustVisionError(f"option criticism.split={split} names a split this data set does not have; "
                                   f"use one of {', '.join(ctx.datasets)}")
        ds = ctx.dataset(split)
        if isinstance(ds, TensorImageDataset):  # in memory already
            x, y = ds.tensors()
            source = x
        else:  # streamed: features batch by batch, only the images shown are decoded
            x, y, source = _LazyImages(ds), split_labels(ds), ds
        if len(x) < 2:
            raise TrustVisionError(f"the {split} split has {len(x)} images; the criticism check needs at least 2")
        bs = int(ctx.option("batch_size", 256))
        model.eval()
        logits, feats = _vectors(model, source, bs, space)
        probs = torch.softmax(logits, 1).float()
        conf, pred = probs.max(1)
        feats = feats.float()
        names = self._namer(ctx)
        gamma = median_gamma(feats, pred)
        m, k = int(ctx.option("prototypes")), int(ctx.option("criticisms"))
        groupings = {}
        for by in dict.fromkeys(ctx.option("by")):
            labels = pred if by == "predicted" else y
            groupings[by] = class_criticism(feats, labels, m, k, gamma)
        main = groupings.get("predicted") or next(iter(groupings.values()))

        figures, captions, tables = {}, {}, {}
        for by, groups in groupings.items():
            figures[f"classes_{by}"] = class_gallery(
                x, groups, conf, names, f"Prototypes (black) and criticisms (red) per {by} class, {split} split")
            captions[f"classes_{by}"] = (
                f"Each row is a class of the model's {'predicted' if by == 'predicted' else 'true'} labels on the "
                f"{split} split: its {m} MMD-critic prototypes (what the class looks like to the model, left) and up "
                f"to {k} criticisms (images the prototypes explain worst, red titles); the number is the model's "
                "confidence in its prediction. Look for attributes all prototypes share that have nothing to do "
                "with the class.")
            tables[f"Prototypes and criticisms ({by} classes)"] = {
                "columns": ["class", "images", "prototypes", "criticisms", "MMD^2 after the prototypes"],
                "rows": [[names(c), g["n"], ", ".join(map(str, (int(ds_i(ds, i)) for i in g["prototypes"]))),
                          ", ".join(map(str, (int(ds_i(ds, i)) for i in g["criticisms"]))), g["mmd2"]]
                         for c, g in groups.items()]}

        metrics, notes = {}, {}
        wrong = torch.nonzero(pred != y).flatten()
        order = wrong[torch.argsort(conf[wrong], descending=True, stable=True)]
        if len(wrong):
            metrics["Confident mistakes"] = float((conf[wrong] >= 0.9).double().mean())
            notes["Confident mistakes"] = f"{int((conf[wrong] >= 0.9).sum())} of {len(wrong)}"
        review = order[: int(ctx.option("mistakes"))]
        proto_idx = {c: torch.tensor(g["prototypes"]) for c, g in main.items()}
        true_groups = groupings.get("true") or class_criticism(feats, y, m, 0, gamma)
        rows = []
        for i in review.tolist():
            top = torch.topk(probs[i], min(3, probs.shape[1]))
            rows.append({"position": i, "index": int(ds_i(ds, i)), "true": int(y[i]), "predicted": int(pred[i]),
                         "top3": [[int(c), float(p)] for p, c in zip(top.values, top.indices)],
                         "near_predicted": _nearest(feats, i, proto_idx.get(int(pred[i]))),
                         "near_true": _nearest(feats, i, proto_idx.get(int(y[i]))
                                               if int(y[i]) in proto_idx
                                               else torch.tensor(true_groups[int(y[i])]["prototypes"]))})
        method = str(ctx.option("method"))
        heat, skipped = None, None
        if rows and method != "none":
            cls = explain.get(method)
            skipped = cls.unmet_requirement(model)
            if skipped is None:
                xr = x[review].to(ctx.device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExplanationWarning)
                    heat = cls(model).attribute(xr, target=pred[review].to(ctx.device), seed=ctx.seed).detach().cpu()
                heat = heat.abs().sum(1, keepdim=True) if heat.shape[1] != 1 else heat.abs()
                heat = heat / heat.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        if rows:
            near = int(ctx.option("nearest"))
            figures["mistakes"] = mistake_figure(rows, x, heat, x, names, near)
            captions["mistakes"] = (
                f"The {len(rows)} most confident of the {len(wrong)} misclassified {split} images: the image (dataset "
                "index, true and predicted class, probability), "
                + (f"the {explain.get(method).title} heatmap for the predicted class, " if heat is not None else "")
                + f"then the {near} nearest prototypes (in the model's feature space) of the predicted class and of "
                "the true class (green). A mistake that looks like the predicted class's prototypes is plausible; one "
                "that looks like the true class's is a real error.")
            tables["Mistake review"] = {
                "columns": ["index", "true", "predicted", "top-3 probabilities", "nearest prototypes (predicted)",
                            "nearest prototypes (true)"],
                "rows": [[r["index"], names(r["true"]), names(r["predicted"]),
                          ", ".join(f"{names(c)} {p:.2f}" for c, p in r["top3"]),
                          ", ".join(str(int(ds_i(ds, p))) for p in r["near_predicted"]),
                          ", ".join(str(int(ds_i(ds, p))) for p in r["near_true"])] for r in rows]}

        curve, headline, acc = None, None, {}
        ms = sorted({int(v) for v in ctx.option("curve") if str(v).strip()})
        if ms and "train" in ctx.datasets:
            train = ctx.dataset("train")
            yt = split_labels(train)
            _, ft = _vectors(model, train, bs, space)
            counts = torch.bincount(yt)
            ms = [v for v in ms if v <= int(counts[counts > 0].min())]
            if ms:
                g = ctx.generator(SEED_OFFSET)
                seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=g).tolist()
                curve = prototype_curve(ft.float(), yt, feats, y, ms=ms, seeds=seeds)
                tables["1-nearest-prototype classifier"] = {
                    "columns": ["prototypes per class"] + [r for r in ("MMD-critic", "random", "k-medoids")],
                    "rows": [[v] + [next(r["accuracy"] for r in curve if r["method"] == meth and r["m"] == v)
                                    for meth in ("mmd-critic", "random", "k-medoids")] for v in ms]}
                headline = min(ms, key=lambda v: abs(v - m))
                acc = {r["method"]: r["accuracy"] for r in curve if r["m"] == headline}

        probe = self._bias_probe(ds, feats, y, pred, m, k, gamma, groupings)
        if probe:
            if probe.get("criticism_enrichment") is not None:
                metrics["Criticism enrichment (unmarked)"] = probe["criticism_enrichment"]
                notes["Criticism enrichment (unmarked)"] = (
                    f"unmarked {probe['criticism_unmarked_rate']:.0%} of criticisms vs {probe['base_unmarked_rate']:.0%}"
                    f" of images; prototypes {probe['prototype_marked_rate']:.0%} marked, first prototypes "
                    f"{probe['first_prototype_marked_rate']:.0%}")
            tables["Bias probe: the planted marker"] = {
                "columns": ["true class", "images", "unmarked (base rate)", "unmarked among criticisms", "enrichment",
                            "marked among prototypes"],
                "rows": [[names(c), r["n"], r["base_rate"], r["rate"], r["ratio"], probe["prototypes"][c]["rate"]]
                         for c, r in probe["criticisms"].items()]}

        data = {"split": split, "space": space, "n": len(x), "gamma": gamma, "by": list(groupings), "prototypes": m, "criticisms": k,
                "classes": {by: {str(c): {**g, "prototypes": [int(ds_i(ds, i)) for i in g["prototypes"]],
                                          "criticisms": [int(ds_i(ds, i)) for i in g["criticisms"]]}
                                 for c, g in groups.items()} for by, groups in groupings.items()},
                "n_mistakes": len(wrong), "mistakes": [{kk: (vv if kk not in ("near_predicted", "near_true")
                                                             else [int(ds_i(ds, p)) for p in vv])
                                                        for kk, vv in r.items() if kk != "position"} for r in rows],
                "method": method if heat is not None else None, "skipped_method": skipped,
                "prototype_curve": curve, "prototype_accuracy": acc or None, "prototypes_per_class_evaluated": headline,
                "bias_probe": probe}
        summary = (f"{len(groupings[next(iter(groupings))])} classes of the {split} split ({len(x)} images) criticised "
                   f"in the model's feature space: {m} prototypes and up to {k} criticisms each. "
                   f"{len(wrong)} mistakes"
                   + (f", {metrics['Confident mistakes']:.0%} of them with confidence >= 0.9" if len(wrong) else "")
                   + (f"; the {len(rows)} most confident are reviewed next to the prototypes." if rows else ".")
                   + (f" 1-nearest-prototype accuracy with {headline} MMD-critic prototypes per class "
                      f"{acc['mmd-critic']:.3f} (random {acc['random']:.3f}, k-medoids {acc['k-medoids']:.3f})."
                      if curve else "")
                   + (f" Planted marker: criticisms {probe['criticism_enrichment']:.2f}x enriched for unmarked images, "
                      f"prototypes {probe['prototype_marked_rate']:.0%} marked (base rate "
                      f"{1 - probe['base_unmarked_rate']:.0%})." if probe and probe.get("criticism_enrichment") is not None
                      else "")
                   + (f" Heatmap method skipped: {skipped}" if skipped else ""))
        return CheckResult(data=data, figures=figures, captions=captions, summary=summary, metrics=metrics,
                           notes=notes, tables=tables)

    @staticmethod
    def _namer(ctx: AuditContext):
        classes = ctx.classes

        def name(c: int) -> str:
            return str(classes[c]) if 0 <= c < len(classes) else str(c)

        return name

    @staticmethod
    def _bias_probe(ds, feats, y, pred, m, k, gamma, groupings) -> dict | None:
        """Enrichment of unmarked images among the criticisms of each true class and of marked
        ones among its prototypes, when the split has a ``marked`` attribute with both values."""
        marked = item_attribute(ds, "marked")
        if marked is None:
            return None
        marked = torch.as_tensor(marked).bool().flatten()
        if len(marked) != len(y) or bool(marked.all()) or not bool(marked.any()):
            return None
        groups = groupings.get("true") or class_criticism(feats, y, m, k, gamma)
        crit = [i for g in groups.values() for i in g["criticisms"]]
        prot = [i for g in groups.values() for i in g["prototypes"]]
        unmarked = ~marked
        per_c = bias_enrichment(crit, unmarked, y)
        per_p = bias_enrichment(prot, marked, y)
        crit_t = torch.tensor(crit, dtype=torch.long)
        base = float(unmarked.double().mean())
        rate = float(unmarked[crit_t].double().mean()) if len(crit) else None
        hits = int(unmarked[crit_t].sum()) if len(crit) else 0
        # chance of at least this many unmarked criticisms if they were drawn at the base rate
        p_value = float(binom.sf(hits - 1, len(crit), base)) if len(crit) else None
        return {"p_value": p_value, "n_criticisms": len(crit), "unmarked_criticisms": hits,"criticisms": per_c, "prototypes": per_p, "base_unmarked_rate": base,
                "criticism_unmarked_rate": rate,
                "criticism_enrichment": (rate / base) if rate is not None and base > 0 else None,
                "prototype_marked_rate": float(marked[torch.tensor(prot, dtype=torch.long)].double().mean()),
                "first_prototype_marked_rate": float(marked[torch.tensor(
                    [g["prototypes"][0] for g in groups.values() if g["prototypes"]], dtype=torch.long)].double().mean()),
                "predicted": bias_enrichment([i for g in groupings.get("predicted", {}).values()
                                              for i in g["criticisms"]], unmarked, pred)
                if "predicted" in groupings else None}


def _nearest(feats: torch.Tensor, i: int, candidates: torch.Tensor | None, k: int = 5) -> list[int]:
    """Positions of the ``k`` candidates nearest to image ``i`` in feature space."""
    if candidates is None or len(candidates) == 0:
        return []
    d = (feats[candidates] - feats[i]).norm(dim=1)
    return candidates[torch.argsort(d, stable=True)[:k]].tolist()


def ds_i(ds, position: int) -> int:
    """The index into the full split of a position in the (possibly subsampled) split."""
    from trustvision.data import dataset_indices

    idx = dataset_indices(ds)
    return idx[position] if len(idx) > position else int(position)


def _vectors(model, source, batch_size: int, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the vectors MMD-critic works on: the penultimate features, or the flattened
    pixels (both streamed batch by batch)."""
    if space == "features":
        return model_outputs(model, source, batch_size)
    from trustvision.data.loading import image_batches

    logits, _ = model_outputs(model, source, batch_size, features=False)
    pixels = torch.cat([xb.flatten(1).double() for xb in image_batches(source, batch_size)])
    return logits, pixels


class _LazyImages:
    """The images of a streamed split, decoded when indexed: ``[i]`` one image (C, H, W),
    ``[indices]`` a stack of them."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx):
        if isinstance(idx, torch.Tensor) and idx.dim() > 0:
            return torch.stack([self.ds[int(i)][0] for i in idx.tolist()])
        return self.ds[int(idx)][0]
