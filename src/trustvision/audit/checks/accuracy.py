"""The ``accuracy`` check: top-1 accuracy, per-class accuracy and the confusion matrix on the test split."""

from __future__ import annotations

from trustvision.audit.context import AuditContext
from trustvision.audit.registry import Check, CheckResult, Condition, Metric, register_check
from trustvision.evaluate.accuracy import confusion_matrix, confusion_matrix_figure, per_class_accuracy, top1_accuracy

__all__ = ["AccuracyCheck"]


def _near_chance(d: dict) -> str | None:
    k = len(d["classes"])
    chance = 1.0 / k
    if d["accuracy"] < chance + 0.1 * (1.0 - chance):
        return (f"accuracy {d['accuracy']:.3f} is near chance (1/{k} = {chance:.3f}): the model has not learned "
                "this task, or it is audited on data it was not trained for")
    return None


@register_check("accuracy")
class AccuracyCheck(Check):
    title = "Accuracy"
    description = (
        "Top-1 accuracy on the test split, the accuracy of each class (recall: correct / images of "
        "that class) and the confusion matrix (rows: true class, columns: predicted class, "
        "normalised per row). Higher accuracy is better."
    )
    order = 0
    metrics = {"Accuracy": Metric("higher", "top-1 accuracy on the test split.")}
    conditions = (Condition("accuracy above chance", lambda m, d: _near_chance(d), metric="Accuracy"),)

    def run(self, ctx: AuditContext) -> CheckResult:
        probs, labels = ctx.predict("test")
        classes = ctx.classes
        k = probs.shape[1]
        names = [str(c) for c in classes] if len(classes) == k else [str(i) for i in range(k)]
        acc = top1_accuracy(probs, labels)
        per_class = per_class_accuracy(probs, labels, k)
        cm = confusion_matrix(probs, labels, k)
        support = cm.sum(dim=1).tolist()
        present = [(a, n) for a, n in zip(per_class, names) if a is not None]
        worst = min(present) if present else None
        summary = f"Top-1 accuracy {acc:.2%} on {len(labels)} test images."
        if worst is not None and len(present) > 1:
            summary += f" Lowest class accuracy: {worst[1]!r} ({worst[0]:.2%})."
        rows = [[n, int(s), a] for n, s, a in zip(names, support, per_class)]
        fig = confusion_matrix_figure(cm, names, normalize=True, title="Confusion matrix (test split)")
        return CheckResult(
            data={
                "split": "test",
                "n": int(labels.shape[0]),
                "accuracy": acc,
                "classes": names,
                "per_class_accuracy": per_class,
                "support": [int(s) for s in support],
                "confusion_matrix": cm.tolist(),
            },
            figures={"confusion_matrix": fig},
            captions={"confusion_matrix": f"Confusion matrix of the {len(labels)} test images: rows are the true "
                                          "classes, columns the predicted ones, each row normalised to sum to 1."},
            summary=summary,
            metrics={"Accuracy": acc},
            tables={"Per-class accuracy": {"columns": ["class", "test images", "accuracy"], "rows": rows}},
        )
