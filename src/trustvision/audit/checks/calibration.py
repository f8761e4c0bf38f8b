"""The ``calibration`` check: ECE/MCE, reliability diagrams and temperature scaling (Guo et al. 2017)."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, register_check
from trustvision.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    reliability_diagram,
)

__all__ = ["CalibrationCheck"]

#: the search interval of the fitted temperature (trustvision.evaluate.fit_temperature's defaults)
T_BOUNDS = (0.01, 100.0)


def _t_at_bound(d: dict) -> str | None:
    t = d["temperature"]
    if min(abs(math.log(t / b)) for b in T_BOUNDS) < 1e-6:
        return (f"the fitted temperature T = {t:.3g} sits at the bound of its search interval: the "
                f"{d['temperature_fit_split']} logits give no usable calibration signal (e.g. they separate the "
                "classes perfectly); the scaled figures are not meaningful")
    return None


def _worse_after(d: dict) -> str | None:
    before, after = d["before"]["ece"], d["after_temperature_scaling"]["ece"]
    if after > before + 1e-3:
        return (f"ECE rises from {before:.4f} to {after:.4f} after temperature scaling: the temperature fitted on "
                f"{d['n_fit']} {d['temperature_fit_split']} images does not carry over to the test split")
    return None


@register_check("calibration")
class CalibrationCheck(Check):
    title = "Calibration"
    description = (
        "Does the model's confidence match its accuracy? Expected calibration error (ECE) and maximum "
        "calibration error (MCE) on top-1 confidence with equal-width bins (15 by default, the "
        "torchmetrics convention; the bin count used is stated below), reliability diagrams, and "
        "temperature scaling: one temperature T fitted on the validation split by minimising the "
        "negative log-likelihood (Newton steps on 1/T with a bisection safeguard; the NLL is convex "
        "in 1/T), then the test metrics recomputed with softmax(logits / T). Lower ECE, MCE and NLL are better."
    )
    order = 10
    metrics = {
        "ECE": Metric("lower", "expected calibration error on top-1 confidence with {n_bins} equal-width bins "
                               "(0 = confidence matches accuracy)."),
        "ECE after TS": Metric("lower", "the same after temperature scaling fitted on the validation split."),
        "Temperature": Metric(None, "the fitted temperature T is under the value (T > 1: the model was "
                                    "overconfident, T < 1: underconfident).",
                              fold_into="ECE after TS", note_format="T = {:.2f}"),
    }
    conditions = (
        Condition("temperature inside its search interval", lambda m, d: _t_at_bound(d), metric="ECE after TS"),
        Condition("temperature scaling helps", lambda m, d: _worse_after(d), metric="ECE after TS"),
    )

    def run(self, ctx: AuditContext) -> CheckResult:
        n_bins = int(ctx.option("n_bins", 15))
        z_test, y_test = ctx.logits("test")
        if "val" in list(ctx.datasets):  # a broken val split is an error, not a reason to fall back
            z_val, y_val = ctx.logits("val")
            fit_split = "val"
        else:
            # No validation split: fit on the first half of the test split, evaluate on the second.
            half = z_test.shape[0] // 2
            z_val, y_val = z_test[:half], y_test[:half]
            z_test, y_test = z_test[half:], y_test[half:]
            fit_split = "first half of test (no validation split)"
        temperature = fit_temperature(z_val, y_val)

        def metrics(z: torch.Tensor) -> dict:
            p = torch.softmax(z.double(), dim=1)
            return {
                "ece": expected_calibration_error(p, y_test, n_bins),
                "mce": maximum_calibration_error(p, y_test, n_bins),
                "nll": negative_log_likelihood(z, y_test),
                "accuracy": float((p.argmax(1) == y_test).double().mean()),
                "mean_confidence": float(p.max(1).values.mean()),
                "bins": reliability_bins(p, y_test, n_bins).to_dict(),
            }

        before, after = metrics(z_test), metrics(z_test / temperature)
        fig = Figure(figsize=(8.4, 4.2), dpi=100, layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        reliability_diagram(torch.softmax(z_test.double(), 1), y_test, n_bins, title="Before temperature scaling",
                            ax=ax1)
        reliability_diagram(torch.softmax(z_test.double() / temperature, 1), y_test, n_bins,
                            title=f"After temperature scaling (T = {temperature:.3g})", ax=ax2)
        if abs(math.log(temperature)) < 0.05:
            direction = "close to calibrated"
        else:
            direction = "overconfident" if temperature > 1 else "underconfident"
        summary = (
            f"ECE {before['ece']:.4f} ({n_bins} equal-width bins) on {len(y_test)} test images; the model is "
            f"{direction} (fitted T = {temperature:.3g} on {fit_split}); after temperature scaling the test "
            f"ECE is {after['ece']:.4f}."
        )
        rows = [
            ["ECE", before["ece"], after["ece"]],
            ["MCE", before["mce"], after["mce"]],
            ["NLL", before["nll"], after["nll"]],
            ["Mean confidence", before["mean_confidence"], after["mean_confidence"]],
            ["Accuracy", before["accuracy"], after["accuracy"]],
        ]
        return CheckResult(
            data={
                "n_bins": n_bins,
                "split": "test",
                "n": int(y_test.shape[0]),
                "temperature": temperature,
                "temperature_fit_split": fit_split,
                "n_fit": int(y_val.shape[0]),
                "before": before,
                "after_temperature_scaling": after,
            },
            figures={"reliability": fig},
            captions={"reliability": f"Reliability diagrams of the {len(y_test)} test images before and after "
                                     f"temperature scaling (T = {temperature:.3g}): blue bars are the accuracy of each "
                                     f"of the {n_bins} confidence bins, red hatching the gap to the bin's mean "
                                     "confidence, the number above a bar how many images fall in it."},
            summary=summary,
            metrics={"ECE": before["ece"], "ECE after TS": after["ece"], "Temperature": temperature},
            tables={
                f"Test calibration ({n_bins} equal-width bins)": {
                    "columns": ["metric", "before", "after temperature scaling"],
                    "rows": rows,
                }
            },
        )
