"""The generative zoo recipes, rebuilt with a seed they were not chosen on, keep their figures
(issue 17: "the tests pin the recipe's figures with a tolerance that a reseeded rebuild passes").

The pinned values and their tolerances come from the seeds measured in BENCHMARKS.md ("The beta
trade-off of the generative classifier" and "Digits, five seeds"): a tolerance is the spread of
those seeds plus the noise of the test split (one test image moves the accuracy by 1/450 on
digits, 1/800 on textures; one confident error moves ECE-15 by about as much)."""

from __future__ import annotations

import os
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


@pytest.mark.skipif(not os.environ.get("TRUSTVISION_ZOO_RECIPES"),
                    reason="trains the textures GC (about 2.5 minutes): run with TRUSTVISION_ZOO_RECIPES=1")
def test_textures_recipe_reseeded():
    """Textures, the zoo recipe (beta 16, noise 0.01, learned mixture weights), seeds 0-2:
    accuracy 0.9525-0.965, ECE-15 0.0253-0.0363, its best generative score against faces the
    complexity-corrected one at 0.763-0.777 (below the twin's max-softmax: the bound issue 17's
    note shows); against uniform noise log p(x) = 1.0. A reseeded rebuild keeps all of it and
    keeps two of the three targets against the twin's seed-0-2 figures (accuracy 0.935-0.960,
    mean 0.9475; ECE-15 0.0293-0.0468, mean 0.0404)."""
    gc = _train("ibinn-small-textures", "textures")
    assert gc["test_accuracy"] >= 0.9525 - 6 / 800
    assert gc["ece_15"] <= 0.0363 + 0.006
    faces = gc["ood_generative_best"]["faces"]
    assert faces["detector"] == "complexity" and 0.74 <= faces["auroc"] <= 0.80
    assert gc["ood"]["uniform"]["log_px"]["auroc"] >= 0.99
    assert gc["test_accuracy"] >= 0.9475 - 0.01 and gc["ece_15"] < 0.0404
