"""Structured attention graphs (SAG): the minimal sufficient patch sets of an image, as a graph.

Reference:
    Shitole, Li, Kahng, Tadepalli, Fern. "One Explanation is Not Enough: Structured Attention
    Graphs for Image Classification." NeurIPS 2021.

Registered as the ``sag`` method of kind ``"graph"``: ``SAG(model).attribute(images)`` returns one
:class:`SAGResult` per image (``explain(image)`` explains one image).

The image is cut into a ``grid`` x ``grid`` lattice of patches (patch ``r * grid + c``; default:
7 x 7 as in the paper, ``min(H, W) // 2`` per side for images under 14 pixels). A patch
set S is *sufficient* when the image showing only S (the other patches replaced by the baseline)
keeps p_c >= ``threshold`` x p_c(full image). A beam search from the empty set adds one of the
``successors`` unused patches ranked most important by a coarse I-GOS heatmap (2 iterations at
grid resolution); sufficient candidates are pruned greedily to minimal sets (roots); the others
fill the beam. All candidates of a beam step, all removals of a pruning step and all children of
a graph level are each scored in one batched forward pass. A diverse subset of roots has
pairwise overlap <= 1 patch; the graph links each shown root to its subsets with one patch
removed, expanded while the relative confidence stays above ``expand_threshold`` (40%).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Mean(nn.Module):
    ...     def forward(self, x):
    ...         m = x.mean((1, 2, 3))
    ...         return torch.stack([8 * m, torch.zeros_like(m)], 1)
    >>> res = SAG(Mean(), grid=2).explain(torch.ones(1, 8, 8), target=0)
    >>> len(res.roots[0]) > 0
    True
    >>> [r.grid for r in SAG(Mean()).attribute(torch.ones(2, 1, 8, 8), target=0)]
    [(4, 4), (4, 4)]
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import networkx as nx
import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision._utils.images import (
    BaselineType,
    TargetType,
    as_pair,
    check_inputs,
    chunks,
    eval_mode,
    make_baseline,
    patch_masks,
    resolve_target,
)
from trustvision.explain._base import ExplanationWarning, Explainer
from trustvision.explain.igos import IGOS

__all__ = ["SAG", "SAGResult", "auto_grid"]

PatchSet = tuple[int, ...]


@dataclass
class SAGResult:
    """One image's SAG. Patch sets are sorted tuples of patch indices ``r * grid_w + c``.

    ``roots``: minimal sufficient sets in the order found; ``root_confidence``: their relative
    confidence p_c(S) / p_c(image); ``diverse``: indices into ``roots`` of the largest subset with
    pairwise overlap <= 1 patch (most confident first); ``shown``: the first ``show`` of those;
    ``graph``: networkx DiGraph, nodes = patch sets (attributes ``relative``, ``probability``,
    ``depth``), edges parent -> child with one patch removed (attributes ``removed``, ``drop``).
    """

    target: int
    probability: float
    predicted: int
    grid: tuple[int, int]
    threshold: float
    baseline: str
    roots: list[PatchSet]
    root_confidence: list[float]
    diverse: list[int]
    shown: list[int]
    graph: nx.DiGraph
    importance: list[float]
    forward_passes: int
    heatmap_passes: int
    seconds: float
    image: torch.Tensor | None = field(default=None, repr=False)
    baseline_image: torch.Tensor | None = field(default=None, repr=False)
    #: drawing limits of :meth:`figure` (the graph itself keeps every node)
    draw_levels: int = field(default=4, repr=False)
    draw_per_level: int = field(default=8, repr=False)

    def summary(self) -> dict:
        """The few numbers of one image worth a line in a table: its roots, the diverse ones
        and the forward passes spent."""
        return {"roots": [list(r) for r in self.roots],
                "diverse_roots": [list(self.roots[k]) for k in self.diverse],
                "forward_passes": self.forward_passes}

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the image itself is left out)."""
        return {
            "target": self.target,
            "probability": self.probability,
            "predicted": self.predicted,
            "grid": list(self.grid),
            "threshold": self.threshold,
            "baseline": self.baseline,
            "roots": [
                {"patches": list(r), "relative_confidence": c}
                for r, c in zip(self.roots, self.root_confidence)
            ],
            "diverse": self.diverse,
            "shown": self.shown,
            "importance": self.importance,
            "graph": {
                "nodes": [
                    {"patches": list(n), **{k: v for k, v in d.items()}}
                    for n, d in self.graph.nodes(data=True)
                ],
                "edges": [
                    {"parent": list(a), "child": list(b), **d}
                    for a, b, d in self.graph.edges(data=True)
                ],
            },
            "forward_passes": self.forward_passes,
            "heatmap_passes": self.heatmap_passes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict, image: "torch.Tensor | None" = None,
                  baseline_image: "torch.Tensor | None" = None) -> "SAGResult":
        """The result :meth:`to_json` wrote (the graph rebuilt node by node and edge by edge,
        in the same order); ``image`` / ``baseline_image`` are attached for drawing."""
        g = nx.DiGraph()
        for node in d["graph"]["nodes"]:
            g.add_node(tuple(node["patches"]), **{k: v for k, v in node.items() if k != "patches"})
        for e in d["graph"]["edges"]:
            g.add_edge(tuple(e["parent"]), tuple(e["child"]),
                       **{k: v for k, v in e.items() if k not in ("parent", "child")})
        return cls(target=d["target"], probability=d["probability"], predicted=d["predicted"],
                   grid=tuple(d["grid"]), threshold=d["threshold"], baseline=d["baseline"],
                   roots=[tuple(r["patches"]) for r in d["roots"]],
                   root_confidence=[r["relative_confidence"] for r in d["roots"]], diverse=list(d["diverse"]),
                   shown=list(d["shown"]), graph=g, importance=list(d["importance"]),
                   forward_passes=d["forward_passes"], heatmap_passes=d["heatmap_passes"], seconds=d["seconds"],
                   image=image, baseline_image=baseline_image)

    # -- drawing ---------------------------------------------------------------------------

    def _show_only(self, patches: Sequence[int]) -> "torch.Tensor":
        ind = torch.zeros(1, self.grid[0] * self.grid[1])
        ind[0, list(patches)] = 1
        m = patch_masks(ind, self.grid, self.image.shape[-2:])[0]
        return self.image * m + self.baseline_image * (1 - m)

    @staticmethod
    def _to_numpy(img: torch.Tensor):
        a = img.detach().cpu().clamp(0, 1)
        return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()

    @property
    def needs_no_patch(self) -> bool:
        """True when the baseline alone (no patch of the image) keeps the class: then the empty set
        is the only root and there is no graph to show."""
        return self.roots == [()]

    def layout(self, width: float = 9.0) -> dict:
        """Where :meth:`figure` draws the graph, in inches of a panel ``width`` wide: ``{"boxes":
        {node: (x0, y0, x1, y1)} of each thumbnail, "labels": {node: (x0, y0, x1, y1)} of its
        percentage below it, "height": panel height, "drawn": nodes drawn}``. Boxes and labels of
        different nodes never overlap (tested): rows are a thumbnail + label + gap apart and a row's
        thumbnails are sized to fit its width."""
        g = self.graph
        levels: dict[int, list] = {}
        for node, d in g.nodes(data=True):
            levels.setdefault(d["depth"], []).append(node)
        if not levels or self.needs_no_patch:
            return {"boxes": {}, "labels": {}, "height": 0.0, "drawn": 0}
        first = min(levels)
        levels = {d: sorted(sorted(v, key=lambda q: (-g.nodes[q]["relative"], q))[: self.draw_per_level])
                  for d, v in sorted(levels.items()) if d < first + self.draw_levels}
        widest = max(len(v) for v in levels.values())
        side = min(1.1, 0.8 * width / widest)  # thumbnail side: fits the widest row with 20% gaps
        label_h, gap = 0.18, 0.22
        row_h = side + label_h + gap
        height = row_h * len(levels) + 0.1
        boxes, labels = {}, {}
        for r, (depth, nodes) in enumerate(levels.items()):
            top = height - 0.05 - r * row_h
            step = width / len(nodes)
            for i, node in enumerate(nodes):
                cx = (i + 0.5) * step
                boxes[node] = (cx - side / 2, top - side, cx + side / 2, top)
                labels[node] = (cx - side / 2, top - side - label_h, cx + side / 2, top - side)
        return {"boxes": boxes, "labels": labels, "height": height, "drawn": len(boxes)}

    def figure(self, class_names: Sequence[str] | None = None, label: int | None = None,
               index: int | None = None):
        """A matplotlib Figure: the image and each shown root on top, the graph below, laid out by
        :meth:`layout`. ``class_names`` name the classes in titles; ``label`` (the true class) and
        ``index`` (the image's index in its dataset) go in the title when given."""
        from matplotlib.figure import Figure

        if self.image is None:
            raise TrustVisionError("this SAG result has no image attached; cannot draw it")

        def name(c: int) -> str:
            return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)

        cmap = "gray" if self.image.shape[0] == 1 else None
        ncols = 1 + max(1, len(self.shown))
        width = max(3.0 * ncols, 6.0)
        lay = self.layout(width - 0.4)
        top_h = 2.9
        graph_h = lay["height"] + 0.6 if lay["drawn"] else 1.0
        fig = Figure(figsize=(width, top_h + graph_h), dpi=100)
        gs = fig.add_gridspec(2, ncols, height_ratios=[top_h, graph_h])
        ax = fig.add_subplot(gs[0, 0])
        ax.imshow(self._to_numpy(self.image), cmap=cmap, vmin=0, vmax=1)
        head = [] if index is None else [f"test image {index}"]
        if label is not None:
            head.append(f"true {name(label)}")
        head.append(f"explained {name(self.target)}" + (f" (predicted {name(self.predicted)})"
                                                         if self.predicted != self.target else ""))
        ax.set_title(", ".join(head) + f"\np = {self.probability:.2f}", fontsize=8)
        ax.axis("off")
        if self.needs_no_patch:
            ax = fig.add_subplot(gs[0, 1:])
            ax.axis("off")
            ax.text(0.0, 0.5, f"No patch of the image is needed: on the {self.baseline} baseline alone the "
                              f"model keeps {self.root_confidence[0]:.0%} of its confidence in\n"
                              f"{name(self.target)} (the threshold is {self.threshold:.0%}), so there is no "
                              "structure to explain;\nthe prediction does not rest on what the image shows.",
                    fontsize=8, va="center", wrap=True)
        else:
            for j, ri in enumerate(self.shown):
                ax = fig.add_subplot(gs[0, j + 1])
                ax.imshow(self._to_numpy(self._show_only(self.roots[ri])), cmap=cmap, vmin=0, vmax=1)
                k = len(self.roots[ri])
                ax.set_title(f"root {ri + 1}: {k} patch{'es' if k != 1 else ''} keep{'s' if k == 1 else ''}\n"
                             f"{self.root_confidence[ri]:.0%} of the confidence", fontsize=8)
                ax.axis("off")
        ax = fig.add_subplot(gs[1, :])
        ax.axis("off")
        g = self.graph
        if lay["drawn"]:
            w = width - 0.4
            ax.set_xlim(0, w)
            ax.set_ylim(0, lay["height"])
            ax.set_aspect("equal")
            for a, b, d in g.edges(data=True):
                if a in lay["boxes"] and b in lay["boxes"]:
                    (ax0, ay0, ax1, _), (bx0, _, bx1, by1) = lay["labels"][a], lay["boxes"][b]
                    ax.plot([(ax0 + ax1) / 2, (bx0 + bx1) / 2], [ay0, by1], color="0.6",
                            lw=0.5 + 3 * max(d["drop"], 0), zorder=1)
            for node, (x0, y0, x1, y1) in lay["boxes"].items():
                ax.imshow(self._to_numpy(self._show_only(node)), cmap=cmap, vmin=0, vmax=1,
                          extent=(x0, x1, y0, y1), zorder=2, interpolation="nearest")
                ax.add_patch(__import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, ec="0.3", zorder=3))
                lx0, ly0, lx1, ly1 = lay["labels"][node]
                ax.text((lx0 + lx1) / 2, (ly0 + ly1) / 2, f"{g.nodes[node]['relative']:.0%}", ha="center",
                        va="center", fontsize=7, zorder=3)
        note = (f" ({lay['drawn']} of {g.number_of_nodes()} nodes drawn)"
                if g.number_of_nodes() > lay["drawn"] else "")
        if not self.needs_no_patch:
            ax.set_title("Structured attention graph: each minimal sufficient patch set (top row) and its subsets "
                         "with one patch removed;\nthe percentage is the confidence kept, relative to the full image"
                         + note, fontsize=8)
        fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.02, hspace=0.25)
        return fig

    def render(self, path: str | Path) -> list[Path]:
        """Write the figure as ``<path>.png`` and ``<path>.svg``; returns both paths."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path
        stem.parent.mkdir(parents=True, exist_ok=True)
        fig = self.figure()
        out = []
        for ext in (".png", ".svg"):
            p = stem.with_name(stem.name + ext)
            fig.savefig(p, dpi=120)
            out.append(p)
        return out


def auto_grid(height: int, width: int) -> tuple[int, int]:
    """The default patch grid: 7 x 7 (the paper's, at 224 px), ``min(H, W) // 2`` per side for
    images under 14 pixels (4 x 4 patches of 2 x 2 pixels on 8 x 8 digits)."""
    g = min(7, max(1, min(height, width) // 2))
    return (g, g)


class SAG(Explainer):
    """Structured attention graphs for one image at a time, every search step batched.

    Args:
        model: classifier taking [0, 1] images (N, C, H, W) and returning logits.
        grid: patches per side or (rows, cols); ``None`` or 0 = :func:`auto_grid` of each image
            (7 x 7 as in the paper for images of 14 pixels and more).
        threshold: a set is sufficient when p_c(S) >= threshold * p_c(image) (0.9).
        beam_width: beam states kept per depth (3); successors: patches tried per state (15).
        max_roots: stop after this many roots (10). show: roots drawn and put in the graph (3).
        baseline: ``"zero"`` (the paper's black) or ``"blur"`` or a tensor.
        expand_threshold: graph nodes are expanded while relative confidence > this (0.4).
        max_nodes: safety cap on graph size. batch_size: most images per forward pass.
    """

    name, title, order = "sag", "SAG", 50
    kind = "graph"
    #: what ``attribute`` returns a list of (``explain_images`` stores them with ``to_json`` / ``from_json``)
    result_type = SAGResult
    in_audit = False

    def __init__(
        self,
        model: nn.Module,
        grid: int | Sequence[int] | None = None,
        threshold: float = 0.9,
        beam_width: int = 3,
        successors: int = 15,
        max_roots: int = 10,
        show: int = 3,
        baseline: BaselineType = "zero",
        expand_threshold: float = 0.4,
        max_nodes: int = 300,
        batch_size: int | None = 256,
    ):
        super().__init__(model)
        self.grid = self._check_grid(grid)
        self.threshold = float(threshold)
        self.beam_width = int(beam_width)
        self.successors = int(successors)
        self.max_roots = int(max_roots)
        self.show = int(show)
        self.baseline = baseline
        self.expand_threshold = float(expand_threshold)
        self.max_nodes = int(max_nodes)
        self.batch_size = batch_size

    @staticmethod
    def _check_grid(grid: int | Sequence[int] | None) -> tuple[int, int] | None:
        if grid is None or (isinstance(grid, int) and grid == 0):
            return None
        pair = as_pair(grid)
        if min(pair) < 1:
            raise TrustVisionError(f"grid must be positive (or 0 = automatic), got {grid!r}")
        return pair

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        grid: int | Sequence[int] | None = None,
    ) -> list[SAGResult]:
        """One :class:`SAGResult` per image of ``inputs`` (N, C, H, W) in [0, 1], for class
        ``target`` (default: the predicted class).

        ``seed``: seed of the noise of the coarse I-GOS ranking; ``internal_batch_size``: most
        patch sets per forward pass (default: the constructor's ``batch_size``); ``grid``: patch
        grid of this call (default: the constructor's; 0 = automatic).
        """
        x = check_inputs(inputs).detach()
        g = self._check_grid(grid) if grid is not None else self.grid
        with eval_mode(self.model):
            t = resolve_target(self.model, x, target)
        return [self._explain(x[i : i + 1], int(t[i]), seed=seed, grid=g,
                              batch_size=internal_batch_size or self.batch_size)
                for i in range(x.shape[0])]

    # One batched forward over many patch sets.
    @torch.no_grad()
    def _score(self, sets: list[PatchSet]) -> torch.Tensor:
        c = self._ctx
        ind = torch.zeros(len(sets), c["n_patches"], device=c["x"].device)
        for i, s in enumerate(sets):
            if s:
                ind[i, list(s)] = 1
        out = torch.empty(len(sets), device=c["x"].device)
        for sl in chunks(len(sets), c["batch_size"]):
            m = patch_masks(ind[sl], c["grid"], c["x"].shape[-2:]).to(c["x"].dtype)
            phi = c["x"] * m + c["b"] * (1 - m)
            out[sl] = torch.softmax(self.model(phi), dim=1)[:, c["t"]]
        c["passes"] += len(sets)
        return out.cpu()

    def _prune(self, s: PatchSet, thr: float) -> tuple[PatchSet, float]:
        """Greedy removal: drop the patch whose removal keeps p_c highest while >= thr."""
        cur, cur_p = s, None
        while len(cur) > 1:
            subs = [tuple(q for q in cur if q != p) for p in cur]
            probs = self._score(subs)
            best = int(torch.argmax(probs))
            if float(probs[best]) < thr:
                break
            cur, cur_p = subs[best], float(probs[best])
        if cur_p is None:
            cur_p = float(self._score([cur])[0])
        return cur, cur_p

    def explain(self, image: torch.Tensor, target: int | None = None) -> SAGResult:
        """The SAG of one image (C, H, W) or (1, C, H, W) in [0, 1] for class ``target``
        (default: the predicted class); ``attribute`` explains a batch."""
        x = check_inputs(image).detach()
        if x.shape[0] != 1:
            raise TrustVisionError(
                f"SAG.explain takes one image, got a batch of {x.shape[0]}; call it per image "
                "or use SAG.attribute"
            )
        return self._explain(x, target, seed=0, grid=self.grid, batch_size=self.batch_size)

    def _explain(self, x: torch.Tensor, target: int | None, *, seed: int,
                 grid: tuple[int, int] | None, batch_size: int | None) -> SAGResult:
        start = time.perf_counter()
        grid = grid or auto_grid(*x.shape[-2:])
        gh, gw = grid
        if gh > x.shape[-2] or gw > x.shape[-1]:
            raise TrustVisionError(f"grid {grid} is finer than the image {tuple(x.shape[-2:])}")
        with eval_mode(self.model):
            t = int(resolve_target(self.model, x, target)[0])
            b = make_baseline(x, self.baseline)
            igos = IGOS(self.model)
            with warnings.catch_warnings():  # the reliability of the target is reported below
                warnings.simplefilter("ignore", ExplanationWarning)
                imp = igos.attribute(
                    x, target=t, baselines=b, mask_size=grid, iterations=2, return_mask=True,
                    seed=seed,
                ).flatten().cpu()
            heat_passes = igos.last_info.forward_backward_passes + igos.last_info.forward_passes
            self._ctx = dict(x=x, b=b, t=t, n_patches=gh * gw, passes=0, grid=grid,
                             batch_size=batch_size)
            with torch.no_grad():
                probs = torch.softmax(self.model(x), dim=1)[0]
            p_full, predicted = float(probs[t]), int(probs.argmax())
            self._ctx["passes"] += 1
            thr = self.threshold * p_full
            order = sorted(range(gh * gw), key=lambda p: (-float(imp[p]), p))
            roots, root_p = self._search(order, thr)
            rel = [p / p_full for p in root_p]
            diverse = self._diverse(roots, rel)
            shown = diverse[: self.show]
            graph = self._graph([roots[i] for i in shown], p_full)
            passes = self._ctx["passes"]
        self._ctx = {}
        baseline_name = self.baseline if isinstance(self.baseline, str) else "tensor"
        return SAGResult(
            target=t, probability=p_full, predicted=predicted, grid=grid, threshold=self.threshold,
            baseline=str(baseline_name), roots=roots, root_confidence=rel, diverse=diverse,
            shown=shown, graph=graph, importance=imp.tolist(), forward_passes=passes,
            heatmap_passes=heat_passes, seconds=time.perf_counter() - start,
            image=x[0].cpu(), baseline_image=b[0].cpu(),
        )

    def _search(self, order: list[int], thr: float) -> tuple[list[PatchSet], list[float]]:
        roots: list[PatchSet] = []
        root_p: list[float] = []
        p_empty = float(self._score([()])[0])
        if p_empty >= thr:  # the baseline alone keeps the class: the empty set is the only root
            return [()], [p_empty]
        beams: list[PatchSet] = [()]
        seen: set[PatchSet] = set()
        n_patches = len(order)
        for _depth in range(n_patches):
            cands: list[PatchSet] = []
            for s in beams:
                used = set(s)
                for p in [q for q in order if q not in used][: self.successors]:
                    c = tuple(sorted(used | {p}))
                    if c in seen or any(set(r) <= set(c) for r in roots):
                        continue
                    seen.add(c)
                    cands.append(c)
            if not cands:
                break
            probs = self._score(cands).tolist()
            ranked = sorted(zip(cands, probs), key=lambda cp: -cp[1])
            for c, p in ranked:
                if p < thr or len(roots) >= self.max_roots:
                    continue
                if any(set(r) <= set(c) for r in roots):
                    continue
                r, rp = self._prune(c, thr)
                if r not in roots:
                    roots.append(r)
                    root_p.append(rp)
            beams = [c for c, p in ranked if p < thr][: self.beam_width]
            if len(roots) >= self.max_roots or not beams:
                break
        return roots, root_p

    @staticmethod
    def _diverse(roots: list[PatchSet], rel: list[float]) -> list[int]:
        """Largest subset with pairwise overlap <= 1 patch (ties: higher total confidence)."""
        if not roots:
            return []
        g = nx.Graph()
        g.add_nodes_from(range(len(roots)))
        for i in range(len(roots)):
            for j in range(i + 1, len(roots)):
                if len(set(roots[i]) & set(roots[j])) <= 1:
                    g.add_edge(i, j)
        best = max(nx.find_cliques(g), key=lambda c: (len(c), sum(rel[i] for i in c), [-i for i in c]))
        return sorted(best, key=lambda i: (-rel[i], i))

    def _graph(self, shown: list[PatchSet], p_full: float) -> nx.DiGraph:
        g = nx.DiGraph()
        if not shown:
            return g
        top = max(len(r) for r in shown)
        root_probs = self._score(shown).tolist()
        for r, p in zip(shown, root_probs):
            g.add_node(r, probability=p, relative=p / p_full, depth=top - len(r), root=True)
        frontier = list(dict.fromkeys(shown))
        while frontier and g.number_of_nodes() < self.max_nodes:
            expand = [s for s in frontier if g.nodes[s]["relative"] > self.expand_threshold and len(s) > 1]
            children: list[PatchSet] = []
            for s in expand:
                for p in s:
                    c = tuple(q for q in s if q != p)
                    if c not in g and c not in children:
                        children.append(c)
            budget = self.max_nodes - g.number_of_nodes()
            children = children[:budget]
            probs = dict(zip(children, self._score(children).tolist())) if children else {}
            for c, p in probs.items():
                g.add_node(c, probability=p, relative=p / p_full, depth=top - len(c), root=False)
            for s in expand:
                for p in s:
                    c = tuple(q for q in s if q != p)
                    if c in g:
                        drop = g.nodes[s]["relative"] - g.nodes[c]["relative"]
                        g.add_edge(s, c, removed=p, drop=drop)
            frontier = list(probs)
        return g
