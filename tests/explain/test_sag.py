"""SAG: known minimal sufficient sets, OR of ANDs, diversity, batching, JSON and rendering."""

import json

import pytest
import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.explain import SAG


def patch_mean(x, p, grid=4):
    """Mean of patch p of a 4x4 grid on an 8x8 image (2x2 pixels)."""
    r, c = divmod(p, grid)
    return x[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((1, 2, 3))


class AndModel(nn.Module):
    """p_0 is high only when patches 5 AND 10 are both visible."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        v = 6 * (patch_mean(x, 5) + patch_mean(x, 10)) - 5
        return torch.stack([v, torch.zeros_like(v)], 1)


class OrModel(nn.Module):
    """p_0 is high when {0, 1} OR {14, 15} is visible (an OR of ANDs)."""

    def forward(self, x):
        a = patch_mean(x, 0) * patch_mean(x, 1)
        b = patch_mean(x, 14) * patch_mean(x, 15)
        v = 12 * torch.maximum(a, b) - 6
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_and_model_has_one_minimal_root_and_batched_steps():
    model = AndModel()
    res = SAG(model, grid=4).explain(torch.ones(1, 8, 8), target=0)
    assert res.roots == [(5, 10)]
    assert res.diverse == [0] and res.shown == [0]
    assert res.root_confidence[0] == pytest.approx(1.0, abs=1e-6)
    g = res.graph
    # the root and its two children; each child keeps p = sigmoid(1) -> relative 0.73 (> 40%)
    assert set(g.nodes) == {(5, 10), (5,), (10,)}
    assert g.edges[(5, 10), (5,)]["removed"] == 10
    rel = torch.sigmoid(torch.tensor(1.0)) / torch.sigmoid(torch.tensor(7.0))
    assert g.nodes[(5,)]["relative"] == pytest.approx(float(rel), abs=1e-5)
    assert g.edges[(5, 10), (5,)]["drop"] == pytest.approx(1 - float(rel), abs=1e-5)
    # batched: far fewer forward calls than patch sets scored
    search_calls = len(model.calls)
    assert res.forward_passes > 2 * search_calls / 3
    assert max(model.calls) >= 15


def test_or_model_finds_both_disjoint_roots():
    res = SAG(OrModel(), grid=4, beam_width=16, successors=16).explain(torch.ones(1, 1, 8, 8), 0)
    assert sorted(res.roots) == [(0, 1), (14, 15)]
    assert sorted(res.roots[i] for i in res.diverse) == [(0, 1), (14, 15)]


def test_diversity_keeps_largest_low_overlap_subset():
    roots = [(0, 1, 2), (2, 3, 4), (1, 2, 5), (6, 7)]
    rel = [0.95, 0.97, 0.99, 0.91]
    chosen = SAG._diverse(roots, rel)
    # (1,2,5) overlaps (0,1,2) in two patches; the best 3-set is {(2,3,4), (1,2,5), (6,7)}
    # or {(0,1,2), (2,3,4), (6,7)}: the higher total confidence wins, most confident first
    assert chosen == [2, 1, 3]


def test_json_and_render(tmp_path):
    res = SAG(AndModel(), grid=4).explain(torch.ones(1, 1, 8, 8), target=0)
    data = json.loads(json.dumps(res.to_json()))
    assert data["roots"][0]["patches"] == [5, 10]
    assert len(data["graph"]["nodes"]) == 3 and len(data["graph"]["edges"]) == 2
    paths = res.render(tmp_path / "sag")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_errors():
    with pytest.raises(TrustVisionError, match="one image"):
        SAG(AndModel(), grid=4).explain(torch.ones(2, 1, 8, 8))
    with pytest.raises(TrustVisionError, match="finer"):
        SAG(AndModel(), grid=16).explain(torch.ones(1, 8, 8))
