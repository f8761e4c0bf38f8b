"""The generative zoo recipes, rebuilt with a seed they were not chosen on, keep their figures
(issue 17: "the tests pin the recipe's figures with a tolerance that a reseeded rebuild passes").

The pinned values and their tolerances come from the seeds measured in BENCHMARKS.md ("The beta
trade-off of the generative classifier" and "Digits, five seeds"): a tolerance is the spread of
those seeds plus the noise of the test split (one test image moves the accuracy by 1/450 on
digits, 1/800 on textures; one confident error moves ECE-15 by about as much)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for sub in ("scripts", "benchmarks"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

pytestmark = pytest.mark.slow  # trains the recipes (seconds on digits, minutes on textures)

RESEED = 7  # not one of the seeds the recipes were chosen or measured on (0-4)


def _train(name: str, data: str):
    import torch
    from build_zoo_generative import RECIPES
    from gc_tradeoff import OOD_SETS_FOR, train_and_measure

    torch.set_num_threads(1)
    r = RECIPES[name]
    beta = (r.get("model_kwargs") or {}).get("beta", 1.0) if r["model"] == "ibinn-small" else None
    return train_and_measure(r, RESEED, beta=beta, ood_names=OOD_SETS_FOR[data])


def test_digits_recipes_reseeded():
    """Digits, seeds 0-4: GC accuracy 0.9889-0.9933, ECE-15 0.0038-0.0081, typicality AUROC vs
    faces >= 0.9974 and vs uniform 1.0; the twin 0.9800-0.9933."""
    gc = _train("ibinn-small-digits", "digits")
    ff = _train("ibinn-small-ff-digits", "digits")
    assert gc["test_accuracy"] >= 0.9889 - 3 / 450
    assert gc["ece_15"] <= 0.0081 + 0.003
    assert gc["ood"]["faces"]["typicality"]["auroc"] >= 0.99
    assert gc["ood"]["uniform"]["typicality"]["auroc"] >= 0.99
    assert ff["test_accuracy"] >= 0.9800 - 3 / 450
    assert abs(gc["test_accuracy"] - ff["test_accuracy"]) <= 0.015 + 2 / 450
