"""Ensembles: output is the mean of the members, members trained with different seeds."""

from __future__ import annotations

import json

import torch

from trustvision import models
from trustvision.train import fit_ensemble

from _train_toy import halves


def test_ensemble_output_is_mean_of_member_probabilities():
    torch.manual_seed(0)
    ens = models.create("ensemble", num_classes=3, in_chans=1, image_size=8, member="small-cnn", n=3,
                        member_kwargs={"widths": [4, 8]}).eval()
    x = torch.rand(6, 1, 8, 8)
    mean = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0)
    assert torch.allclose(ens(x).softmax(-1), mean, atol=1e-6)


def test_fit_ensemble_trains_members_with_different_seeds_and_saves(tmp_path):
    torch.manual_seed(0)
    ens = models.create("ensemble", num_classes=2, in_chans=1, image_size=4, member="small-cnn", n=2,
                        member_kwargs={"widths": [4, 8]})
    train, test = halves(64), halves(20, seed=2, split="test")
    res = fit_ensemble(ens, train, test_set=test, epochs=2, lr=0.02, batch_size=16, seed=3, out=tmp_path,
                       progress=False)
    seeds = [m["seed"] for m in res.extra["members"]]
    assert seeds == [3, 4]
    for i in range(2):
        assert (tmp_path / "members" / f"member-{i}" / "model.safetensors").exists()
    loaded = models.load(str(tmp_path)).eval()
    x = torch.rand(5, 1, 4, 4)
    assert torch.allclose(loaded(x), ens.eval()(x), atol=1e-6)
    mean = torch.stack([m(x).softmax(-1) for m in loaded.members]).mean(0)
    assert torch.allclose(loaded(x).softmax(-1), mean, atol=1e-6)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_accuracy"] == res.test_accuracy
    assert loaded.tv_config["metrics"]["test_accuracy"] == res.test_accuracy
