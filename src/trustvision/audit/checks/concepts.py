"""The ``concepts`` check: an XNN explanation network (Qi, Khorram & Li, AI 2021) fitted on the
model's penultimate features: a few non-negative x-features from which the model's logits are
rebuilt linearly, each shown as a heatmap, with the XNN's faithfulness, reconstruction,
orthogonality and sparsity, the accuracy when each x-feature is removed, and the top-activating
test images of every x-feature so a person can name the concepts.

Opt-in (``trustvision audit --checks concepts``): fitting the XNN takes a few seconds per model on
the embedded data (150 epochs over the training split's features).
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.data import item_attribute
from trustvision.evaluate.detectors import has_features
from trustvision.evaluate.ood import auroc
from trustvision._utils.images import eval_mode
from trustvision._utils.parallel import Unit, run_units
from trustvision.explain.xnn import XNN, heatmaps_unit, top_k

__all__ = ["ConceptsCheck", "concept_gallery", "marker_alignment"]

#: seed offset of the XNN's fit and of the sample of explained images
SEED_OFFSET = 1515


def _images(data, idx) -> torch.Tensor:
    """The images (n, C, H, W) at positions ``idx`` of ``data`` (a tensor of images or an
    :class:`~trustvision.data.ImageDataset`, of which only these items are read, each once)."""
    idx = torch.as_tensor(idx).long().flatten()
    if isinstance(data, torch.Tensor):
        return data[idx]
    if not idx.numel():
        return torch.zeros(0, int(data.num_channels), *data.image_size)
    uniq, inverse = torch.unique(idx, return_inverse=True)
    items = torch.stack([torch.as_tensor(data[int(i)][0]).float() for i in uniq.tolist()])
    return items[inverse]


def _state(xnn: XNN) -> dict:
    return {k: v.detach().cpu() for k, v in xnn.state_dict().items()}


def concept_gallery(xnn: XNN, x, k: int = 6, class_names=None, positions: list[int] | None = None, *,
                    e: torch.Tensor | None = None, batch_size: int = 512, num_workers: int = 0,
                    executor=None) -> tuple[Figure, dict]:
    """Per x-feature (rows) its ``k`` top-activating images of ``x`` (images (N, C, H, W) or an
    ImageDataset), each with the heatmap of that x-feature on it (image and heatmap side by side);
    returns the figure and ``{"indices": (L, k) positions, "values": (L, k)}``.

    ``e``: the x-features (N, L) of ``x`` when already computed (else they are, streamed in
    batches of ``batch_size`` with ``num_workers`` workers: :meth:`XNN.top_activating`); only the
    L x k images shown are read from ``x``. ``executor``: where the heatmaps are computed
    (:func:`~trustvision.explain.xnn.concept_heatmaps`; the audit's Ray pool)."""
    from trustvision.explain.plot import image_to_numpy

    if e is not None:
        idx, vals = top_k(e.cpu(), k)
    else:
        idx, vals = xnn.top_activating(x, k, batch_size, num_workers=num_workers)
        idx, vals = idx.cpu(), vals.cpu()
    L, k = idx.shape
    shown = _images(x, idx.flatten())
    shown = shown.view(L, k, *shown.shape[1:])
    fig = Figure(figsize=(1.25 * 2 * k + 0.8, 1.35 * L + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(L, 2 * k, squeeze=False)
    preds = None
    with torch.no_grad():
        logits = xnn.model(shown.flatten(0, 1).to(next(xnn.parameters()).device)).cpu()
        preds = logits.argmax(1).view(L, k)
    for ax in axes.flat:
        ax.axis("off")
    # row l's k images, one batch (a unit on the executor's actors) each
    if getattr(executor, "map", None) is None:
        rows = [xnn.heatmaps(shown[l]) for l in range(L)]
    else:
        state = _state(xnn)
        units = [Unit((shown[l].cpu(), xnn.config(), state)) for l in range(L)]
        rows = list(run_units(xnn.model, heatmaps_unit, units, executor=executor))
    for l in range(L):
        heat = rows[l][:, l].cpu()
        for j in range(k):
            img = shown[l, j]
            axes[l, 2 * j].imshow(image_to_numpy(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1,
                                  interpolation="nearest")
            c = int(preds[l, j])
            name = str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)
            pos = int(idx[l, j]) if positions is None else positions[int(idx[l, j])]
            axes[l, 2 * j].set_title(f"#{pos} pred {name}\ne = {float(vals[l, j]):.2f}", fontsize=6.5)
            h = heat[j].float()
            top = float(h.abs().max()) or 1.0
            axes[l, 2 * j + 1].imshow(h.numpy(), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
            if j == 0:
                axes[l, 2 * j + 1].set_title(f"x{l + 1} heatmap", fontsize=6.5)
    return fig, {"indices": idx.tolist(), "values": vals.tolist()}


def marker_alignment(xnn: XNN, x, marked: torch.Tensor, masks: torch.Tensor, *, e: torch.Tensor | None = None,
                     batch_size: int = 512, num_workers: int = 0, executor=None) -> list[dict]:
    """Per x-feature, against a planted marker: the AUROC of its value separating marked
    (positive) from unmarked images, and the mean share of its positive heatmap mass on the marker
    pixels of the marked images.

    ``x``: images (N, C, H, W) or an ImageDataset; ``marked`` (N,) and ``masks`` (N, 1, H, W) per
    image; ``e``: the x-features (N, L) of ``x`` when already computed. The marked images are read
    in batches of ``batch_size`` (a dataset: streamed, ``num_workers`` workers), each batch's
    heatmaps reduced to their marker mass at once. ``executor`` (the audit's Ray pool): each
    batch's heatmaps are computed there (all batches submitted at once; the same batches, so the
    same result)."""
    from trustvision.data.loading import image_batches

    if e is None:
        e = xnn.features_of(x, batch_size, num_workers=num_workers)
    e = e.cpu()
    marked = torch.as_tensor(marked).bool().flatten()
    pos = marked.nonzero().flatten()
    mm = torch.as_tensor(masks)[pos].float()
    source = x[pos] if isinstance(x, torch.Tensor) else x.subset(pos)
    batches = image_batches(source, max(int(batch_size), 1), num_workers=int(num_workers), device=xnn._device())
    if getattr(executor, "map", None) is None:
        heats = (xnn.heatmaps(xb) for xb in batches)
    else:
        state = _state(xnn)
        heats = run_units(xnn.model, heatmaps_unit, [Unit((xb.cpu(), xnn.config(), state)) for xb in batches],
                          executor=executor)
    masses, start = [], 0
    for heat in heats:
        heat = heat.clamp_min(0).cpu()  # (B, L, H, W)
        m = mm[start: start + heat.shape[0], 0].unsqueeze(1)
        start += heat.shape[0]
        masses.append((heat * m).flatten(2).sum(2) / heat.flatten(2).sum(2).clamp_min(1e-12))
    mass = torch.cat(masses) if masses else None  # (M, L)
    out = []
    for l in range(xnn.n_concepts):
        au = auroc(e[marked, l], e[~marked, l]) if bool(marked.any()) and bool((~marked).any()) else None
        out.append({"concept": l + 1, "auroc": au,
                    "marker_mass": float(mass[:, l].mean()) if mass is not None else None})
    return out


def _unfaithful(d: dict) -> str | None:
    m = d["metrics"]
    if m["agreement"] < 0.9:
        return (f"the x-features rebuild the model's decision on only {m['agreement']:.0%} of the test images: the "
                f"{d['n_concepts']} concepts do not explain this model (try more, option n_concepts)")
    return None


@register_check("concepts")
class ConceptsCheck(Check):
    title = "Concept explanations (XNN)"
    description = (
        "Which few concepts does the decision rest on? An explanation network (XNN; Qi, Khorram & Li, Artificial "
        "Intelligence 2021) is fitted on the frozen model's penultimate features of the training split: an encoder "
        "to a few non-negative x-features from which a linear read-out rebuilds the model's logits (faithfulness: "
        "squared error on logits and probabilities), a decoder that reconstructs only part of the features (sparse "
        "reconstruction) and a pull-away term that keeps the x-features apart. Shown on the test split: how often "
        "the rebuilt logits keep the model's decision (agreement, higher is better), their error, the share of the "
        "features' variance left unreconstructed, the mean |cos| between x-features (lower = more distinct), their "
        "sparsity, the accuracy when each x-feature is zeroed (a large drop: the decision rests on it), per image "
        "each x-feature's value, contribution to the logit and gradient x input heatmap, and per x-feature its "
        "top-activating test images, so a person can name the concept. With a planted marker (shortcut-digits) the "
        "x-feature that best separates marked from unmarked images is reported."
    )
    order = 72
    version = 1
    default = False  # opt-in: fitting the XNN takes seconds per model
    options = {
        "n_concepts": Option(int, 5, "x-features", min=1, max=64),
        "epochs": Option(int, 150, "epochs of the XNN's fit", min=1, max=10_000),
        "top": Option(int, 6, "top-activating test images shown per x-feature", min=1, max=16),
        "explain_n": Option(int, 4, "test images explained x-feature by x-feature", min=0, max=16),
    }
    metrics = {
        "XNN agreement": Metric(
            "higher", "share of the test images on which the XNN's {n_concepts} x-features rebuild the model's "
                      "predicted class (the logit error is under the value)"),
    }
    conditions = (
        Condition("the x-features rebuild the decision on >= 90% of the test images", lambda m, d: _unfaithful(d),
                  metric="XNN agreement"),
    )

    def applies_to(self, ctx: AuditContext) -> bool:
        return has_features(ctx.model)

    def run(self, ctx: AuditContext) -> CheckResult:
        model = ctx.model.eval()
        L = int(ctx.option("n_concepts"))
        seed = int(ctx.seed) + SEED_OFFSET
        train, test = ctx.dataset("train"), ctx.dataset("test")
        bs, workers = int(ctx.option("batch_size", 256)), int(ctx.option("num_workers", 0) or 0)
        xnn = XNN(model, n_concepts=L).to(ctx.device)
        # both splits are streamed (batches of bs images): only z, the logits and the labels are kept
        xnn.fit(train, epochs=int(ctx.option("epochs")), seed=seed, track=ctx.track, batch_size=bs,
                internal_batch_size=bs, num_workers=workers)
        z, logits, y = xnn.outputs(test, bs, num_workers=workers, what="the test split")
        met = xnn.metrics_from(z, logits, y)
        with torch.no_grad(), eval_mode(xnn):
            e = xnn.encode(z).cpu()
        del z, logits
        classes = ctx.classes
        positions = _positions(test)
        gallery, top = concept_gallery(xnn, test, int(ctx.option("top")), classes, positions, e=e,
                                       executor=ctx.executor)
        figures = {"concepts": gallery}
        captions = {"concepts": (
            f"Each row is one of the {L} x-features: its {len(top['indices'][0])} most activated test images (dataset "
            "index, predicted class, value e) with the x-feature's heatmap on each (gradient x input; red raises e, "
            "blue lowers it). What the images and the red pixels share is the concept the x-feature stands for.")}
        n_test = len(test)
        k = min(int(ctx.option("explain_n")), n_test)
        if k:
            g = ctx.generator(SEED_OFFSET)
            pick = torch.randperm(n_test, generator=g)[:k].sort().values
            for r, i in zip(xnn.explain(_images(test, pick).to(ctx.device)), pick.tolist()):
                name = f"image_{positions[i]}"
                figures[name] = r.figure(classes)
                captions[name] = (f"Test image {positions[i]}: each x-feature's heatmap (titled with its value e and "
                                  f"its contribution to the logit of the predicted class), and the contributions as "
                                  f"bars; the model's logit {r.logit:.2f}, the XNN's {r.estimate:.2f}.")
        tables = {
            "XNN faithfulness and structure": {
                "columns": ["metric", "value", "better"],
                "rows": [["agreement with the model's prediction", met.agreement, "higher"],
                         ["logit MSE", met.logit_mse, "lower"],
                         ["unreconstructed share of the features' variance", met.reconstruction_error, "lower"],
                         ["mean |cos| between x-features", met.mean_abs_cos, "lower"],
                         ["sparsity (share of values near 0)", met.sparsity, "higher"],
                         ["dead x-features", met.dead, "lower"],
                         ["accuracy of the XNN's decision", met.accuracy, "higher"],
                         ["accuracy of the model", met.model_accuracy, "higher"]]},
            "Accuracy with one x-feature removed": {
                "columns": ["x-feature", "test accuracy", "drop"],
                "rows": [[f"x{l + 1}", a, met.accuracy - a] for l, a in enumerate(met.ablation)]},
        }
        marker = None
        marked, masks = item_attribute(test, "marked"), item_attribute(test, "masks")
        if marked is not None and masks is not None:
            marked = torch.as_tensor(marked).bool()
            if bool(marked.any()) and bool((~marked).any()):
                marker = marker_alignment(xnn, test, marked, torch.as_tensor(masks), e=e, batch_size=bs,
                                          num_workers=workers, executor=ctx.executor)
                tables["x-features vs the planted marker"] = {
                    "columns": ["x-feature", "AUROC marked vs unmarked", "heatmap mass on the marker"],
                    "rows": [[f"x{r['concept']}", r["auroc"], r["marker_mass"]] for r in marker]}
        metrics = {"XNN agreement": met.agreement}
        notes = {"XNN agreement": f"logit MSE {met.logit_mse:.3g}"}
        best = max(range(L), key=lambda l: met.accuracy - met.ablation[l])
        summary = (f"{L} x-features rebuild the model's decision on {met.agreement:.1%} of the {met.n} test images "
                   f"(logit MSE {met.logit_mse:.3g}; mean |cos| {met.mean_abs_cos:.2f}); removing x{best + 1} costs the "
                   f"most accuracy ({met.accuracy:.3f} -> {met.ablation[best]:.3f}).")
        if marker:
            top_m = max(marker, key=lambda r: (r["auroc"] or 0))
            summary += (f" Planted marker: x{top_m['concept']} separates marked from unmarked images best (AUROC "
                        f"{top_m['auroc']:.2f}, {top_m['marker_mass']:.0%} of its heatmap on the marker).")
        data = {"n_concepts": L, "metrics": met.to_json(), "top_activating": {
                    "positions": [[positions[i] for i in row] for row in top["indices"]], "values": top["values"]},
                "marker": marker, "config": xnn.config(), "epochs": int(ctx.option("epochs")), "seed": seed}
        return CheckResult(data=data, figures=figures, captions=captions, summary=summary, metrics=metrics,
                           notes=notes, tables=tables)


def _positions(ds) -> list[int]:
    from trustvision.data import dataset_indices

    return dataset_indices(ds)
