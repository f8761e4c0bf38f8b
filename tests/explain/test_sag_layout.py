"""The SAG figure's layout: no two nodes (thumbnail or percentage label) overlap, at any graph size."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch

from trustvision.explain.sag import SAGResult


def _result(levels: list[int], roots=None) -> SAGResult:
    g = nx.DiGraph()
    nodes_by_level = []
    pid = 0
    for depth, n in enumerate(levels):
        row = []
        for _ in range(n):
            node = tuple(range(pid, pid + len(levels) - depth))
            pid += 1
            g.add_node(node, relative=0.5 + 0.01 * pid, probability=0.5, depth=depth)
            row.append(node)
        nodes_by_level.append(row)
    for upper, lower in zip(nodes_by_level, nodes_by_level[1:]):
        for a, b in itertools.product(upper[:2], lower[:3]):
            g.add_edge(a, b, removed=0, drop=0.3)
    roots = roots if roots is not None else [nodes_by_level[0][0]]
    return SAGResult(target=3, probability=0.97, predicted=3, grid=(7, 7), threshold=0.9, baseline="zero",
                     roots=roots, root_confidence=[0.95] * len(roots), diverse=[0], shown=[0], graph=g,
                     importance=[0.0] * 49, forward_passes=1, heatmap_passes=1, seconds=0.0,
                     image=torch.rand(1, 28, 28), baseline_image=torch.zeros(1, 28, 28))


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 1e-9 and b[0] < a[2] - 1e-9 and a[1] < b[3] - 1e-9 and b[1] < a[3] - 1e-9


@pytest.mark.parametrize("levels", [[1], [3, 8, 12], [1, 2, 4, 8, 16], [8, 8, 8, 8, 8]])
@pytest.mark.parametrize("width", [6.0, 9.0, 12.0])
def test_no_two_nodes_overlap(levels, width):
    res = _result(levels)
    lay = res.layout(width)
    rects = [r for n in lay["boxes"] for r in (lay["boxes"][n], lay["labels"][n])]
    assert lay["drawn"] == sum(min(n, res.draw_per_level) for n in levels[: res.draw_levels])
    for a, b in itertools.combinations(rects, 2):
        assert not _overlap(a, b), (a, b)
    for x0, y0, x1, y1 in rects:  # inside the panel
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= lay["height"]
    res.figure(class_names=[str(i) for i in range(10)], label=3, index=44)  # draws from this layout


def test_empty_root_says_no_patch_is_needed():
    res = _result([1], roots=[()])
    res.root_confidence = [1.07]
    assert res.needs_no_patch and res.layout()["drawn"] == 0
    fig = res.figure(class_names=[f"c{i}" for i in range(10)])
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "No patch of the image is needed" in texts and "107%" in texts and "c3" in texts
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "explained c3" in titles and "107%" not in titles
