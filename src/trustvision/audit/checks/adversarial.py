"""The ``adversarial`` check: robust accuracy under FGSM, PGD-Linf and PGD-L2 over an eps sweep,
the median minimal eps that flips a prediction, explanations of adversarial images next to the
clean ones (Stock & Cisse 2018), and for generative classifiers whether log p(x) detects the
adversarial images.

Opt-in (``trustvision audit --checks adversarial``): three attacks x six radii x 10 PGD steps
plus the bisection are about 100 forward + backward passes per image, too long for the default
audit on large models.
"""

from __future__ import annotations

import math
import warnings

import torch
from matplotlib.figure import Figure

from trustvision import explain
from trustvision._utils.digest import digest, weights_digest
from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, Option, register_check
from trustvision.data import random_subset
from trustvision.errors import TrustVisionError
from trustvision.explain._base import ExplanationWarning
from trustvision.evaluate.adversarial import (
    NORM_OF,
    MinimalEps,
    TITLES,
    attack,
    eps_sweep,
    format_eps,
    heatmap_change,
    headline_eps,
    list_attacks,
    minimal_eps,
    robust_accuracy,
)
from trustvision.models import is_generative

__all__ = ["AdversarialCheck", "robustness_curve", "pair_figure"]

#: seed offsets: the attacked sample and the random starts
SAMPLE_OFFSET, ATTACK_OFFSET = 1313, 1314


def _collapses(d: dict) -> str | None:
    """Warn when, for some attack, accuracy at its smallest nonzero eps is below half the clean."""
    bad = []
    for name, r in d["attacks"].items():
        nz = [(e, a) for e, a in zip(r["eps"], r["accuracy"]) if e > 0]
        if nz and r["clean_accuracy"] > 0 and nz[0][1] < 0.5 * r["clean_accuracy"]:
            bad.append(f"{TITLES[name]} at eps {format_eps(nz[0][0], r['norm'])}: {nz[0][1]:.0%}")
    if bad:
        return (f"accuracy falls below half of the clean {d['clean_accuracy']:.0%} at the smallest attack radius "
                f"({'; '.join(bad)}): tiny perturbations change most predictions")
    return None


def robustness_curve(curves: dict[str, dict]) -> Figure:
    """Robust accuracy vs eps, one panel per threat model (Linf, L2), one line per attack."""
    norms = [n for n in ("linf", "l2") if any(r["norm"] == n for r in curves.values())]
    fig = Figure(figsize=(4.2 * max(1, len(norms)) + 0.4, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, max(1, len(norms)), squeeze=False)[0]
    for ax, norm in zip(axes, norms):
        for name, r in curves.items():
            if r["norm"] == norm:
                xs = [e * 255 if norm == "linf" else e for e in r["eps"]]
                ax.plot(xs, r["accuracy"], "o-", label=TITLES[name])
        ax.set_xlabel("eps (x 1/255, Linf)" if norm == "linf" else "eps (L2 norm)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def pair_figure(clean: torch.Tensor, adv: torch.Tensor, heat_clean: dict, heat_adv: dict,
                titles_clean: list[str], titles_adv: list[str]) -> Figure:
    """Rows alternate: a clean image with each method's heatmap, then its adversarial version with
    its heatmaps (:func:`trustvision.explain.plot.heatmap_grid` on the interleaved rows)."""
    from trustvision.explain.plot import heatmap_grid

    def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([a, b], 1).flatten(0, 1)

    titles = [t for pair in zip(titles_clean, titles_adv) for t in pair]
    return heatmap_grid(interleave(clean, adv), {m: interleave(heat_clean[m], heat_adv[m]) for m in heat_clean},
                        titles)


def _eps_option(values: list[str], key: str) -> list[float] | None:
    """The radii of option ``key`` as floats (``k/255`` accepted), sorted; None for ``auto``."""
    if not values or [v.strip().lower() for v in values] == ["auto"]:
        return None
    out = []
    for v in values:
        try:
            if "/" in v:
                a, b = v.split("/", 1)
                e = float(a) / float(b)
            else:
                e = float(v)
        except (ValueError, ZeroDivisionError):
            e = float("nan")
        if not (math.isfinite(e) and e >= 0):
            raise TrustVisionError(f"option adversarial.{key} takes radii >= 0 such as 0,2/255,8/255, got {v!r}")
        out.append(e)
    return sorted(set(out))


@register_check("adversarial")
class AdversarialCheck(Check):
    title = "Adversarial robustness"
    description = (
        "How easily do imperceptible perturbations change the predictions? A seeded sample of test images "
        "(option n) is attacked with FGSM (Goodfellow et al. 2015) and PGD in the Linf and L2 balls (Madry et al. "
        "2018; 10 steps of 2.5 eps / steps from a seeded random start; per image the strongest iterate is kept), "
        "untargeted on the true label, perturbed images kept in [0, 1]. Shown: accuracy at each radius eps (an "
        "image counts as robust when it is classified correctly clean and attacked), the median over the images "
        "of the smallest PGD radius that flips the prediction (bisection; 0 for images misclassified already), "
        "and clean and adversarial images side by side with their heatmaps and how much each heatmap changed "
        "(Spearman rank correlation and overlap of the top 10% pixels): an explanation that changes completely "
        "under an imperceptible perturbation tells the user not to trust the prediction (Stock & Cisse 2018). "
        "For generative classifiers: whether log p(x) tells the adversarial images from the clean ones "
        "(AUROC, clean = positive). The radii follow the image size: Linf 0, 1, 2, 4, 8, 16 / 255 and L2 up to "
        "1.0 at 32 x 32 (CIFAR scale), Linf scaled by sqrt(1024 / pixels) on smaller images (x 4 at 8 x 8). "
        "PGD gives an upper bound of the robust accuracy; for the strongest figure add AutoAttack to option attacks "
        "(autoattack, autoattack-l2: the original standard version of Croce & Hein 2020, APGD-CE, APGD-T, FAB-T "
        "and Square on the points still robust; needs pip install 'trustvision[autoattack]'). Higher is better."
    )
    order = 75
    version = 2
    default = False  # opt-in: about 100 forward + backward passes per attacked image
    options = {
        "n": Option(int, 200, "test images attacked (a seeded sample; 0 = the whole test split)", min=0),
        "attacks": Option(list, ["fgsm", "pgd-linf", "pgd-l2"], "attacks, in this order (autoattack, autoattack-l2: "
                                                                "AutoAttack standard, the strongest and slowest: "
                                                                "about 8 min for 200 8 x 8 digits at 6 radii on 2 "
                                                                "CPU cores)",
                          choices=list_attacks),
        "eps_linf": Option(list, ["auto"], "Linf radii of FGSM and PGD-Linf, e.g. 0,2/255,8/255 (auto: the sweep for "
                                           "the image size, 0..8/255..16/255 at 32 x 32)"),
        "eps_l2": Option(list, ["auto"], "L2 radii of PGD-L2, e.g. 0,0.25,0.5 (auto: the sweep for the image size, "
                                         "0..0.5..1 up to 32 x 32)"),
        "steps": Option(int, 10, "PGD steps (the issue's strong option: 50)", min=1, max=1000),
        "seed": Option(int, 0, "seed of the PGD random starts (added to the audit seed)", min=0),
        "minimal_eps": Option(bool, True, "bisect the minimal flipping radius per image"),
        "bisection": Option(int, 8, "bisection rounds of the minimal radius (precision eps_max / 2**rounds)",
                            min=1, max=30),
        "explain_n": Option(int, 8, "attacked images whose heatmaps are compared (clean vs adversarial)", min=0),
        "pairs": Option(int, 4, "of those, images shown as clean / adversarial pairs", min=0, max=16),
        "methods": Option(list, ["saliency", "integrated-gradients", "igos"], "heatmap methods compared",
                          choices=lambda: tuple(explain.list_methods("heatmap"))),
        "iterations": Option(int, 5, "iterations of the I-GOS family", min=0),
    }
    metrics = {
        "Robust accuracy ({attack})": Metric(
            "higher", "test accuracy under {attack} at the headline radius (Linf 8/255, L2 0.5 at CIFAR scale, "
                      "scaled with the image size; the radius is under the value); an upper bound of the true "
                      "robust accuracy.", group="robust"),
        "Median minimal eps ({norm})": Metric(
            "higher", "median over the attacked test images of the smallest {norm} PGD radius that flips the "
                      "prediction (0 for misclassified images)."),
        "Heatmap rank correlation": Metric(
            "higher", "mean Spearman correlation between each image's clean and adversarial heatmap (first "
                      "method; 1 = unchanged ranking)."),
        "Adversarial detection AUROC (log p(x))": Metric(
            "higher", "generative classifiers: AUROC of log p(x) separating clean (positive) from adversarial "
                      "test images (0.5 = chance)."),
    }
    conditions = (
        Condition("the smallest perturbation keeps at least half the accuracy", lambda m, d: _collapses(d),
                  metric="Robust accuracy (PGD-Linf)"),
    )

    def run(self, ctx: AuditContext) -> CheckResult:
        model, dev = ctx.model, ctx.device
        test = ctx.dataset("test")
        n = int(ctx.option("n")) or len(test)
        x, y, idx = random_subset(test, n, ctx.generator(SAMPLE_OFFSET))
        if len(x) == 0:
            raise TrustVisionError("the test split is empty; the adversarial check needs test images")
        size = tuple(x.shape[-2:])
        steps, seed = int(ctx.option("steps")), int(ctx.seed) + int(ctx.option("seed")) + ATTACK_OFFSET
        bs = int(ctx.option("batch_size", 256))
        names = list(dict.fromkeys(ctx.option("attacks")))
        grids = {"linf": _eps_option(list(ctx.option("eps_linf")), "eps_linf") or eps_sweep(size, "linf"),
                 "l2": _eps_option(list(ctx.option("eps_l2")), "eps_l2") or eps_sweep(size, "l2")}
        model.eval()
        curves = {}
        for name in ctx.track(names, len(names), "attacks"):
            r = robust_accuracy(model, x, y, name, grids[NORM_OF[name]], steps=steps, seed=seed, batch_size=bs,
                                executor=ctx.executor, cache=ctx.scratch(self.name))
            curves[name] = r.to_json()
            ctx.log(f"{TITLES[name]}: accuracy {', '.join(f'{a:.2f}' for a in r.accuracy)}")
        clean_acc = next(iter(curves.values()))["clean_accuracy"] if curves else float("nan")

        metrics, notes = {}, {}
        for name, r in curves.items():
            e = headline_eps(size, r["norm"])
            pick = min(range(len(r["eps"])), key=lambda i: abs(r["eps"][i] - e))
            if r["eps"][pick] > 0 and name != "fgsm":
                key = f"Robust accuracy ({TITLES[name]})"
                metrics[key] = r["accuracy"][pick]
                notes[key] = f"eps={format_eps(r['eps'][pick], r['norm'])}; clean {clean_acc:.3f}"

        minimal = {}
        if ctx.option("minimal_eps"):
            for norm in dict.fromkeys(NORM_OF[nm] for nm in names if nm != "fgsm"):
                kw = dict(eps_max=max(grids[norm]) or None, iterations=int(ctx.option("bisection")), steps=steps,
                          seed=seed, batch_size=bs)
                # one unit of work per norm, stored when it finishes (a resumed audit reads it back)
                key = digest(weights_digest(model), "minimal_eps", norm, kw, x, y)
                hit = ctx.scratch(self.name).get(key)
                me = MinimalEps(**hit) if hit is not None else minimal_eps(model, x, y, norm, **kw)
                if hit is None:
                    ctx.scratch(self.name)[key] = me.to_json()
                minimal[norm] = me.to_json()
                label = "Linf" if norm == "linf" else "L2"
                if me.median is not None:
                    metrics[f"Median minimal eps ({label})"] = me.median
                    notes[f"Median minimal eps ({label})"] = (f"{format_eps(me.median, norm)}; {me.n_flipped} of {me.n} "
                                                              f"flipped by {format_eps(me.eps_max, norm)}")

        # heatmaps of clean and adversarial images (PGD-Linf at the headline radius when run)
        main = "pgd-linf" if "pgd-linf" in names else next((nm for nm in names if nm != "fgsm"), names[0])
        e_main = headline_eps(size, NORM_OF[main])
        k = min(int(ctx.option("explain_n")), len(x))
        explained, skipped = {}, {}
        figures, captions, tables = {}, {}, {}
        if k:
            adv_main = attack(model, x[:k], y[:k], main, e_main, steps=steps, seed=seed, batch_size=bs)
            dist = (adv_main - x[:k]).flatten(1)
            dist = dist.abs().amax(1) if NORM_OF[main] == "linf" else dist.norm(dim=1)
            xk, yk = x[:k].to(dev), y[:k]
            with torch.no_grad():
                pc = torch.softmax(model(xk), 1).cpu()
                pa = torch.softmax(model(adv_main.to(dev)), 1).cpu()
            heat_c, heat_a = {}, {}
            for m in ctx.option("methods"):
                cls = explain.get(m)
                reason = cls.unmet_requirement(model)
                if reason is not None:
                    skipped[m] = reason
                    continue
                kw = {"iterations": int(ctx.option("iterations"))} if "iterations" in cls.keywords() else {}
                ex = cls(model)
                hc, uc = _heatmaps(ex, xk, ctx.seed, kw)
                ha, ua = _heatmaps(ex, adv_main.to(dev), ctx.seed, kw)
                heat_c[cls.title], heat_a[cls.title] = hc, ha
                explained[cls.title] = {**heatmap_change(hc, ha), "unreliable_clean": uc, "unreliable_adversarial": ua}
            rows = []
            for i in range(k):
                rows.append([int(idx[i]), _cls(ctx, int(yk[i])),
                             _cls(ctx, int(pc[i].argmax())), float(pc[i].max()),
                             _cls(ctx, int(pa[i].argmax())), float(pa[i].max()),
                             float(dist[i])]
                            + [v for t in explained.values() for v in (t["spearman"][i], t["top_overlap"][i])])
            tables["Heatmaps of clean vs adversarial images"] = {
                "columns": ["test image", "true", "clean prediction", "p", "adversarial prediction", "p",
                            f"{'Linf' if NORM_OF[main] == 'linf' else 'L2'} distance"]
                           + [c for t in explained for c in (f"{t}: rank correlation", f"{t}: top-10% overlap")],
                "rows": rows}
            show = min(int(ctx.option("pairs")), k)
            if show and heat_c:
                figures["pairs"] = pair_figure(
                    x[:show], adv_main[:show], {t: h[:show] for t, h in heat_c.items()},
                    {t: h[:show] for t, h in heat_a.items()},
                    [f"#{int(idx[i])} true {_cls(ctx, int(yk[i]))}\nclean: pred {_cls(ctx, int(pc[i].argmax()))} "
                     f"({float(pc[i].max()):.2f})" for i in range(show)],
                    [f"{TITLES[main]}: pred {_cls(ctx, int(pa[i].argmax()))} ({float(pa[i].max()):.2f})"
                     + _rho_note(explained, i) for i in range(show)])
                captions["pairs"] = (
                    "Each test image (upper row: dataset index, true and predicted class, probability) and its "
                    f"{TITLES[main]} adversarial version at eps {format_eps(e_main, NORM_OF[main])} (lower row; rho: "
                    "rank correlation of the first method's two heatmaps), with the heatmap of each method for the "
                    "class predicted on that image (bright = important, each scaled to its maximum). If the heatmaps "
                    "change completely while the image looks the same, do not trust the explanation.")
            first = next(iter(explained), None)
            if first is not None:
                vals = [v for v in explained[first]["spearman"] if v is not None]
                if vals:
                    metrics["Heatmap rank correlation"] = sum(vals) / len(vals)
                    notes["Heatmap rank correlation"] = f"{first}, {len(vals)} images, {TITLES[main]}"

        detection = None
        if is_generative(model):
            detection = _detection(ctx, model, x, y, main, e_main, steps, seed, bs)
            if detection and detection.get("auroc_log_px") is not None:
                metrics["Adversarial detection AUROC (log p(x))"] = detection["auroc_log_px"]
                notes["Adversarial detection AUROC (log p(x))"] = (
                    f"{detection['n_adversarial']} {TITLES[main]} images at {format_eps(e_main, NORM_OF[main])}")

        figures["robust_accuracy"] = robustness_curve(curves)
        captions["robust_accuracy"] = (
            f"Accuracy of the model on {len(x)} test images as the attack radius grows (eps 0 = clean). Linf radii "
            "are in units of 1/255 (one grey level of an 8-bit image); PGD runs "
            f"{steps} steps from a seeded random start. A robust model keeps its accuracy at small radii.")
        tables["Robust accuracy"] = {
            "columns": ["attack", "eps", "accuracy", "images"],
            "rows": [[TITLES[nm], format_eps(e, r["norm"]), a, r["n"]] for nm, r in curves.items()
                     for e, a in zip(r["eps"], r["accuracy"])]}
        if minimal:
            tables["Minimal flipping radius"] = {
                "columns": ["norm", "median eps", "images flipped", "images", "searched up to", "precision"],
                "rows": [["Linf" if nm == "linf" else "L2", m["median"], m["n_flipped"], m["n"], m["eps_max"],
                          m["tolerance"]] for nm, m in minimal.items()]}
        if detection:
            tables["Detecting adversarial images by likelihood"] = {
                "columns": ["score", "AUROC (clean = positive)", "clean images", "adversarial images"],
                "rows": [[s, detection[f"auroc_{s}"], detection["n_clean"], detection["n_adversarial"]]
                         for s in ("log_px", "typicality") if f"auroc_{s}" in detection]}

        data = {"n": len(x), "indices": idx.tolist(), "image_size": list(size), "steps": steps, "seed": seed,
                "clean_accuracy": clean_acc, "attacks": curves, "minimal_eps": minimal,
                "explained_attack": main, "explained_eps": e_main, "heatmap_change": explained,
                "skipped_methods": skipped, "detection": detection}
        flagged = [f"{t} {sum(v['unreliable_clean'])} clean / {sum(v['unreliable_adversarial'])} adversarial"
                   for t, v in explained.items() if any(v["unreliable_clean"]) or any(v["unreliable_adversarial"])]
        parts = [f"{TITLES[nm]} at eps {format_eps(r['eps'][-1], r['norm'])}: {r['accuracy'][-1]:.0%}"
                 for nm, r in curves.items()]
        medians = [f" Median minimal {'Linf' if nm == 'linf' else 'L2'} radius "
                   + (format_eps(m["median"], nm) if m["median"] is not None else "above " + format_eps(m["eps_max"], nm))
                   + "." for nm, m in minimal.items()]
        summary = (f"Clean accuracy {clean_acc:.0%} on {len(x)} test images; " + "; ".join(parts) + "."
                   + "".join(medians)
                   + (f" Heatmap rank correlation clean vs adversarial: {metrics['Heatmap rank correlation']:.2f}."
                      if "Heatmap rank correlation" in metrics else "")
                   + (f" log p(x) separates clean from adversarial images with AUROC {detection['auroc_log_px']:.2f} "
                      "(0.5 = chance)."
                      if detection and detection.get("auroc_log_px") is not None else "")
                   + (f" Heatmaps the methods flag unreliable (low confidence, constant, ...): {'; '.join(flagged)}."
                      if flagged else "")
                   + (f" Skipped methods: {', '.join(skipped)}." if skipped else ""))
        return CheckResult(data=data, figures=figures, captions=captions, summary=summary, metrics=metrics,
                           notes=notes, tables=tables)


def _heatmaps(ex, x: torch.Tensor, seed: int, kw: dict) -> tuple[torch.Tensor, list[bool]]:
    """Heatmaps (N, 1, H, W) on the CPU for the predicted class, and per image whether the method
    flagged its heatmap unreliable (recorded in the data instead of warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplanationWarning)
        h = ex.attribute(x, target=None, seed=seed, **kw).detach().cpu()
    info = ex.last_info
    return h, list(info.unreliable) if info is not None else [False] * len(x)


def _rho_note(explained: dict, i: int) -> str:
    first = next(iter(explained.values()), None)
    v = first["spearman"][i] if first else None
    return "" if v is None else f"\nrho = {v:.2f}"


def _cls(ctx: AuditContext, c: int) -> str:
    classes = ctx.classes
    return str(classes[c]) if 0 <= c < len(classes) else str(c)


def _detection(ctx, model, x, y, main, eps, steps, seed, bs) -> dict | None:
    """AUROC of log p(x) (and typicality, fitted on the training split) separating the clean test
    images (positive) from the adversarial ones that flip a correct prediction."""
    from trustvision.evaluate.ood import TypicalityTest, auroc, log_px_score

    adv = attack(model, x, y, main, eps, steps=steps, seed=seed, batch_size=bs)
    dev = ctx.device
    with torch.no_grad():
        pc = torch.cat([model(x[i:i + bs].to(dev)).argmax(1).cpu() for i in range(0, len(x), bs)])
        pa = torch.cat([model(adv[i:i + bs].to(dev)).argmax(1).cpu() for i in range(0, len(x), bs)])
    flipped = (pc == y) & (pa != y)
    if not flipped.any():
        return {"n_clean": len(x), "n_adversarial": 0, "auroc_log_px": None}
    xa = adv[flipped]
    out = {"n_clean": len(x), "n_adversarial": int(flipped.sum()),
           "auroc_log_px": auroc(log_px_score(model, x, bs), log_px_score(model, xa, bs))}
    if "train" in list(ctx.datasets):
        train = ctx.dataset("train")
        xt = train.subset(range(min(2000, len(train)))).tensors()[0]  # only these are read
        t = TypicalityTest(model, batch_size=bs).fit(xt)
        out["auroc_typicality"] = auroc(t.score(x), t.score(xa))
    return out
