"""Model criticism with MMD-critic: prototypes, criticisms and the 1-nearest-prototype evaluation.

Prototypes are the samples that summarise a set of (feature) vectors best in kernel mean
discrepancy; criticisms are the samples the prototypes explain worst. Run on a model's features
per class, they expose what a class "looks like" to the model and which of its images do not fit
(Stock & Cisse use them to find class biases, e.g. a spurious attribute shared by the prototypes).

The kernel is the RBF kernel ``k(x, x') = exp(-gamma ||x - x'||^2)``, computed in per-class blocks
(the paper's block-diagonal "local" kernel) when ``per_class=True``: no kernel entry between two
classes is ever computed. In a block of ``n`` samples ``X``:

* **prototypes** ``P`` (greedy, ``|P| = m``): each step adds the sample that maximises
  ``F(P) = 2/(|P| n) sum_{p in P, x in X} k(p, x) - 1/|P|^2 sum_{p, p' in P} k(p, p')``, i.e. that
  minimises ``MMD^2(X, P) = mean_{x,x'} k(x, x') - F(P)``;
* **witness** ``w(x) = mean_{i} k(x, x_i) - mean_{p in P} k(x, p)``: positive where the data are
  denser than the prototypes, negative where the prototypes over-represent it;
* **criticisms** ``C`` (greedy, among the non-prototypes): each step adds the sample maximising
  ``sum_{c in C} |w(c)| + log det K_CC``; the gain of adding ``c`` is
  ``|w(c)| + log(k(c, c) - k_cC K_CC^-1 k_Cc)``, whose Schur complement is kept for every candidate
  by an incremental (pivoted) Cholesky update, so no matrix is inverted. The log-det term keeps the
  criticisms diverse (two copies of one outlier are not both chosen); ``regularizer=None`` drops it.

MMD^2 usually falls at every prototype step (it does on the digits); it is guaranteed to only
under the paper's diagonal-dominance condition (a kernel narrow next to the data's spread): with a
wide kernel and two balanced clusters, a third prototype unbalances the prototype mean and MMD^2
rises. The witness measures under-represented *mass*: a tight group of g atypical samples has
``w ~ g/n``, a single isolated outlier only ``1/n``, and a prototype set that carries none of the
outliers' mass leaves every well-represented sample a deficit of about (outlier mass) x (its kernel
density), so lone outliers among many rank below well-covered samples.

Every greedy step costs O(n): the row sums ``sum_x k(c, x)`` are computed once per block and
``sum_p k(c, p)`` is updated with one kernel row per step. Blocks of up to ``block_size`` samples
are computed densely (``block_size^2`` floats); larger blocks are computed in chunks of rows of at
most as many entries, so memory stays bounded. All indices refer to the caller's order.

The paper's quantitative evaluation is a 1-nearest-prototype classifier
(:func:`prototype_classifier`): test accuracy vs the number of prototypes per class, against
random (:func:`random_prototypes`) and k-medoids (:func:`kmedoids_prototypes`) prototypes of the
same size; :func:`prototype_curve` runs the comparison (higher accuracy is better).
:func:`bias_enrichment` measures how a per-sample attribute (e.g. "carries a shortcut marker") is
over- or under-represented among chosen samples relative to each class's base rate.

References:
    Kim, Khanna, Koyejo. "Examples are not enough, learn to criticize! Criticism for
    interpretability." NeurIPS 2016.
    Stock, Cisse. "ConvNets and ImageNet beyond accuracy: understanding mistakes and uncovering
    biases." ECCV 2018.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([0.1 * torch.randn(20, 2, generator=g), 5 + 0.1 * torch.randn(20, 2, generator=g)])
    >>> x[7] = torch.tensor([2.5, 2.5])  # an outlier between the clusters
    >>> res = mmd_critic(x, n_prototypes=2, n_criticisms=1, per_class=False)
    >>> sorted(int(i) // 20 for i in res.prototypes), res.criticisms.tolist()
    ([0, 1], [7])
    >>> prototype_classifier(x[res.prototypes], res.prototypes // 20, torch.tensor([[0.2, 0.0], [4.0, 6.0]])).tolist()
    [0, 1]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from trustvision._utils.io import to_jsonable
from trustvision.errors import TrustVisionError

__all__ = [
    "MMDCriticResult",
    "mmd_critic",
    "median_gamma",
    "prototype_classifier",
    "random_prototypes",
    "kmedoids_prototypes",
    "prototype_curve",
    "bias_enrichment",
]

#: Default size of the largest class block whose kernel is held densely (5000^2 float32 = 100 MB).
BLOCK_SIZE = 5000
#: Key of the single block when ``per_class=False``.
ALL = "all"


# -- inputs ----------------------------------------------------------------------------------


def _features(features, name: str = "features") -> torch.Tensor:
    """(n, d) floating tensor on the caller's device (numpy arrays go to the CPU)."""
    if isinstance(features, torch.Tensor):
        x = features.detach()
    else:
        try:
            x = torch.as_tensor(np.asarray(features))
        except (TypeError, ValueError) as exc:
            raise TrustVisionError(f"{name} must be a (n, d) tensor or numpy array of numbers ({exc})") from None
    if x.ndim != 2:
        raise TrustVisionError(
            f"{name} must be 2-D (n_samples, n_features); got shape {tuple(x.shape)}; flatten them, "
            f"e.g. {name}.flatten(1) or model.features(images)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise TrustVisionError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one vector")
    if x.dtype == torch.float64:
        pass
    elif x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                              torch.bool):
        x = x.float()
    else:
        raise TrustVisionError(f"{name} must be real numbers, got dtype {x.dtype}; convert with .float()")
    if not bool(torch.isfinite(x).all()):
        raise TrustVisionError(f"{name} contain NaN or inf; remove or replace those vectors first")
    return x


def _labels(labels, n: int, name: str = "labels") -> torch.Tensor:
    """(n,) int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        y = labels.detach().cpu()
    else:
        arr = np.asarray(labels)
        if arr.dtype.kind not in "biu":
            raise TrustVisionError(f"{name} must be integers, got {arr.dtype}; map class names to 0..K-1 first")
        y = torch.as_tensor(arr)
    if y.is_floating_point() or y.is_complex():
        if not bool((y == y.round()).all()):
            raise TrustVisionError(f"{name} must be integers, got {y.dtype}; map class names to 0..K-1 first")
    y = y.long()
    if y.ndim != 1 or y.shape[0] != n:
        raise TrustVisionError(
            f"{name} must be 1-D with one entry per feature vector ({n}); got shape {tuple(y.shape)}")
    return y


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise TrustVisionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _groups(labels: torch.Tensor | None, n: int) -> list[tuple[int | str, torch.Tensor]]:
    """[(key, caller indices (CPU int64, ascending))]: one per class, or one ``"all"`` block."""
    if labels is None:
        return [(ALL, torch.arange(n))]
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=len(classes)).tolist()
    return [(int(c), idx) for c, idx in zip(classes.tolist(), torch.split(order, counts))]


# -- pairwise blocks -------------------------------------------------------------------------


def _sqdist(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 (len(a), len(b)) from the Gram matrix; in place, clamped at 0."""
    out = a @ b.T
    return out.mul_(-2).add_(sa[:, None]).add_(sb[None, :]).clamp_(min=0)


class _Block:
    """The pairwise matrix ``f(||x_i - x_j||^2)`` of one block of vectors, held densely when the
    block has at most ``block_size`` rows, else computed in chunks of rows on demand (each chunk at
    most ``block_size^2`` entries). Diagonal entries are exactly ``f(0)``."""

    def __init__(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], block_size: int):
        self.x = x - x.mean(0, keepdim=True)  # distances are shift-invariant; centring limits cancellation
        self.sq = (self.x * self.x).sum(1)
        self.fn = fn
        self.n = x.shape[0]
        self.chunk = max(1, (block_size * block_size) // self.n)
        self.dense = self._rows(torch.arange(self.n, device=x.device)) if self.n <= block_size else None

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.fn(_sqdist(self.x[idx], self.x, self.sq[idx], self.sq))
        out[torch.arange(len(idx), device=out.device), idx] = float(self.fn(torch.zeros((), dtype=out.dtype)))
        return out

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), n) rows of the matrix (``idx`` on the block's device)."""
        return self.dense[idx] if self.dense is not None else self._rows(idx)

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, matrix rows) in chunks: slices of the dense matrix, else computed on demand."""
        if self.dense is not None:
            yield slice(0, self.n), self.dense
            return
        for s in range(0, self.n, self.chunk):
            sl = slice(s, min(self.n, s + self.chunk))
            yield sl, self._rows(torch.arange(sl.start, sl.stop, device=self.x.device))

    def _reduce(self, fn: Callable[[torch.Tensor], torch.Tensor], width: int) -> torch.Tensor:
        """(n, width) float64 ``fn(rows in float64)`` over the matrix, cast in slices of <= 2^21 entries
        (a float64 copy of a whole 5000 x 5000 block would need 200 MB)."""
        out = torch.empty(self.n, width, dtype=torch.float64, device=self.x.device)
        step = max(1, 2**21 // self.n)
        for sl, rows in self.chunks():
            for s in range(0, rows.shape[0], step):
                out[sl.start + s : sl.start + s + step] = fn(rows[s : s + step].double())
        return out

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        """(n, k) float64 product of the matrix with ``m`` (n, k)."""
        m = m.double()
        return self._reduce(lambda rows: rows @ m, m.shape[1])

    def rowsum(self) -> torch.Tensor:
        """(n,) float64 row sums."""
        return self._reduce(lambda rows: rows.sum(1, keepdim=True), 1)[:, 0]


def _rbf(gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda sq: sq.mul_(-gamma).exp_()


# -- gamma -----------------------------------------------------------------------------------


def median_gamma(features, labels=None, *, max_samples: int = 1000, seed: int = 0) -> float:
    """The median heuristic: ``gamma = 1 / median{||x_i - x_j||^2 : i < j}``.

    The median is taken over the pairs of distinct samples (numpy's median: the mean of the two
    middle values for an even count), only over pairs of the same class when ``labels`` are given
    (the scale of the per-class kernel blocks). When there are more than ``max_samples`` vectors,
    it is computed on ``max_samples`` of them drawn without replacement with ``seed``.

    Args:
        features: (n, d) tensor or numpy array.
        labels: optional (n,) integer labels.
    """
    x = _features(features)
    n = x.shape[0]
    y = None if labels is None else _labels(labels, n)
    max_samples = _count(max_samples, "max_samples", 2)
    if n > max_samples:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:max_samples]
        x, y = x[pick.to(x.device)], (None if y is None else y[pick])
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    sq = (x * x).sum(1)
    d = _sqdist(x, x, sq, sq)
    keep = torch.ones_like(d, dtype=torch.bool).triu_(1)
    if y is not None:
        yd = y.to(d.device)
        keep &= yd[:, None] == yd[None, :]
    vals = d[keep]
    if vals.numel() == 0:
        raise TrustVisionError("the median heuristic needs two samples of one class; pass gamma= explicitly")
    # torch.quantile takes at most 2^24 values; beyond that the lower of the two middle values
    med = float(torch.quantile(vals.cpu(), 0.5)) if vals.numel() <= 2**24 else float(vals.median())
    if not med > 0:
        raise TrustVisionError("the median squared distance is 0 (duplicated vectors); pass gamma= explicitly")
    return 1.0 / med


# -- MMD-critic ------------------------------------------------------------------------------


@dataclass
class MMDCriticResult:
    """Prototypes and criticisms of :func:`mmd_critic`. Indices are in the caller's order.

    Attributes:
        prototypes: (sum of m,) int64 indices, grouped by class (ascending), greedy order in a class.
        criticisms: (sum of c,) int64 indices, the same layout.
        prototypes_by_class: class -> prototype indices (key ``"all"`` when ``per_class=False``).
        criticisms_by_class: class -> criticism indices.
        mmd2: class -> MMD^2 between the class's data and its prototypes after each greedy step
            (lower is better; usually but not always decreasing, see the module docstring).
        witness: (n,) float64 witness value of every sample, within its own class's block
            (against its class's prototypes).
        criticism_gains: class -> gain of each greedy criticism step (``|w(c)|`` plus the log of
            its Schur complement with ``regularizer="logdet"``).
        gamma: the RBF kernel parameter used.
        per_class, regularizer, n_prototypes, n_criticisms: the settings (counts per block).
    """

    prototypes: torch.Tensor
    criticisms: torch.Tensor
    prototypes_by_class: dict
    criticisms_by_class: dict
    mmd2: dict
    witness: torch.Tensor
    criticism_gains: dict
    gamma: float
    per_class: bool
    regularizer: str | None
    n_prototypes: int
    n_criticisms: int
    kernel: str = field(default="rbf")

    def to_dict(self) -> dict:
        """Plain JSON types (lists, floats, string keys)."""
        return to_jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})

    def to_json(self, **kwargs) -> str:
        """The result as a strict JSON string (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


def _greedy_prototypes(block: _Block, m: int) -> tuple[list[int], list[float], torch.Tensor]:
    """Greedy maximisation of F(P); returns (block indices, MMD^2 after each step, witness (n,))."""
    n = block.n
    dev = block.x.device
    r = block.rowsum()  # sum_x k(c, x) for every candidate c
    kbar = float(r.sum()) / (n * n)
    s = torch.zeros(n, dtype=torch.float64, device=dev)  # sum_{p in P} k(c, p)
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    a = b = 0.0  # sum_{p, x} k(p, x) and sum_{p, p'} k(p, p')
    chosen: list[int] = []
    mmd2: list[float] = []
    for t in range(1, m + 1):
        gain = 2.0 * (a + r) / (t * n) - (b + 2.0 * s + 1.0) / (t * t)
        c = int(gain.masked_fill(taken, -math.inf).argmax())
        chosen.append(c)
        taken[c] = True
        a += float(r[c])
        b += 2.0 * float(s[c]) + 1.0
        s += block.rows(torch.tensor([c], device=dev))[0].double()
        mmd2.append(kbar - 2.0 * a / (t * n) + b / (t * t))
    return chosen, mmd2, r / n - s / m


def _greedy_criticisms(block: _Block, witness: torch.Tensor, taken: torch.Tensor, k: int,
                       logdet: bool) -> tuple[list[int], list[float]]:
    """Greedy maximisation of sum |w(c)| (+ log det K_CC) over the samples not in ``taken``."""
    n = block.n
    dev = block.x.device
    absw = witness.abs()
    resid = torch.ones(n, dtype=torch.float64, device=dev)  # k(c,c) - k_cC K_CC^-1 k_Cc
    proj = torch.zeros(k, n, dtype=torch.float64, device=dev)  # rows of L^-1 K_C. (Cholesky of K_CC)
    taken = taken.clone()
    tiny = torch.finfo(torch.float64).tiny
    chosen: list[int] = []
    gains: list[float] = []
    for t in range(k):
        gain = absw + resid.clamp_min(tiny).log() if logdet else absw
        c = int(gain.masked_fill(taken, -math.inf).argmax())
        chosen.append(c)
        gains.append(float(gain[c]))
        taken[c] = True
        if logdet and t + 1 < k:
            d = float(resid[c])
            if d > 1e-12:
                row = block.rows(torch.tensor([c], device=dev))[0].double()
                e = (row - proj[:t, c] @ proj[:t]) / math.sqrt(d)
                proj[t] = e
                resid = (resid - e * e).clamp_min(0.0)
    return chosen, gains


def mmd_critic(
    features,
    labels=None,
    n_prototypes: int = 10,
    n_criticisms: int = 5,
    gamma: float | None = None,
    regularizer: str | None = "logdet",
    per_class: bool = True,
    *,
    block_size: int = BLOCK_SIZE,
    median_samples: int = 1000,
    seed: int = 0,
) -> MMDCriticResult:
    """Prototypes and criticisms of ``features`` by MMD-critic (Kim et al. 2016); see the module.

    Args:
        features: (n, d) tensor (any device; the work runs there) or numpy array, e.g. a model's
            penultimate-layer features.
        labels: (n,) integer labels; needed when ``per_class`` (the default).
        n_prototypes: prototypes per class (per block), >= 1.
        n_criticisms: criticisms per class, >= 0, chosen among the class's non-prototypes.
        gamma: RBF parameter of ``exp(-gamma ||x - x'||^2)``; default: the median heuristic
            ``1 / median ||x_i - x_j||^2`` over pairs of the same block, on at most
            ``median_samples`` vectors drawn with ``seed`` (:func:`median_gamma`).
        regularizer: ``"logdet"`` (diverse criticisms, the paper's) or ``None`` (plain top |w|).
        per_class: one kernel block per class (the paper's "local" kernel) or one for all samples.
        block_size: blocks with at most this many samples get a dense kernel; larger ones are
            computed in chunks of at most ``block_size^2`` entries.

    Returns:
        :class:`MMDCriticResult` with indices into ``features`` (caller's order) and tensors on the CPU.
    """
    x = _features(features)
    n = x.shape[0]
    if per_class and labels is None:
        raise TrustVisionError("per_class=True needs labels; pass labels= or per_class=False")
    y = None if labels is None else _labels(labels, n)
    m = _count(n_prototypes, "n_prototypes", 1)
    k = _count(n_criticisms, "n_criticisms", 0)
    block_size = _count(block_size, "block_size", 1)
    if regularizer not in ("logdet", None):
        raise TrustVisionError(f"unknown regularizer {regularizer!r}; use 'logdet' or None")
    groups = _groups(y if per_class else None, n)
    for key, idx in groups:
        if len(idx) < m + k:
            where = f"class {key}" if per_class else "the data"
            raise TrustVisionError(
                f"{where} has {len(idx)} samples, fewer than n_prototypes + n_criticisms = {m + k}; lower "
                "n_prototypes or n_criticisms" + (" or pass per_class=False" if per_class else ""))
    if gamma is None:
        gamma = median_gamma(x, y if per_class else None, max_samples=median_samples, seed=seed)
    elif isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < float(gamma) < math.inf):
        raise TrustVisionError(f"gamma must be a positive number, got {gamma!r}; or pass gamma=None (median heuristic)")
    gamma = float(gamma)

    protos: dict = {}
    crits: dict = {}
    mmd2: dict = {}
    gains: dict = {}
    witness = torch.zeros(n, dtype=torch.float64)
    for key, idx in groups:
        block = _Block(x[idx.to(x.device)], _rbf(gamma), block_size)
        p, trace, w = _greedy_prototypes(block, m)
        taken = torch.zeros(block.n, dtype=torch.bool, device=x.device)
        taken[torch.tensor(p, device=x.device)] = True
        c, g = _greedy_criticisms(block, w, taken, k, regularizer == "logdet") if k else ([], [])
        del block
        protos[key] = idx[p].tolist()
        crits[key] = idx[c].tolist() if c else []
        mmd2[key] = trace
        gains[key] = g
        witness[idx] = w.cpu()
    flat = lambda d: torch.tensor([i for v in d.values() for i in v], dtype=torch.long)  # noqa: E731
    return MMDCriticResult(
        prototypes=flat(protos), criticisms=flat(crits), prototypes_by_class=protos, criticisms_by_class=crits,
        mmd2=mmd2, witness=witness, criticism_gains=gains, gamma=gamma, per_class=bool(per_class),
        regularizer=regularizer, n_prototypes=m, n_criticisms=k)


# -- evaluation: 1-nearest prototype ---------------------------------------------------------


def prototype_classifier(prototype_features, prototype_labels, test_features, *,
                         batch_size: int = 4096) -> torch.Tensor:
    """Labels of the nearest prototype (Euclidean; the first one on ties) for every test vector.

    Args:
        prototype_features: (m, d) prototypes.
        prototype_labels: (m,) their integer labels.
        test_features: (n, d) vectors to classify (moved to the prototypes' device).
        batch_size: test vectors per distance batch (memory ``batch_size x m``).

    Returns:
        (n,) int64 predicted labels on the CPU.
    """
    p = _features(prototype_features, "prototype_features")
    yp = _labels(prototype_labels, p.shape[0], "prototype_labels")
    q = _features(test_features, "test_features").to(p.device)
    if q.shape[1] != p.shape[1]:
        raise TrustVisionError(
            f"test_features have {q.shape[1]} dimensions but the prototypes {p.shape[1]}; use the same features")
    dtype = torch.float64 if torch.float64 in (p.dtype, q.dtype) else torch.float32
    p, q = p.to(dtype), q.to(dtype)
    mu = p.mean(0, keepdim=True)
    p, q = p - mu, q - mu
    sp, sq = (p * p).sum(1), (q * q).sum(1)
    batch_size = _count(batch_size, "batch_size", 1)
    nearest = torch.cat([_sqdist(q[s:s + batch_size], p, sq[s:s + batch_size], sp).argmin(1).cpu()
                         for s in range(0, q.shape[0], batch_size)])
    return yp[nearest]


def _check_m(groups, m: int) -> None:
    for key, idx in groups:
        if len(idx) < m:
            raise TrustVisionError(f"class {key} has {len(idx)} samples, fewer than m = {m}; lower m")


def random_prototypes(labels, m: int, seed: int = 0) -> torch.Tensor:
    """``m`` indices per class drawn uniformly without replacement with ``seed`` (the paper's
    random baseline); (K * m,) int64, grouped by class (ascending)."""
    y = _labels(labels, len(labels) if not isinstance(labels, torch.Tensor) else labels.shape[0])
    m = _count(m, "m", 1)
    groups = _groups(y, y.shape[0])
    _check_m(groups, m)
    g = torch.Generator().manual_seed(int(seed))
    return torch.cat([idx[torch.randperm(len(idx), generator=g)[:m]] for _, idx in groups])


def _kmedoids_block(x: torch.Tensor, m: int, g: torch.Generator, n_iter: int, block_size: int) -> torch.Tensor:
    """Block indices of ``m`` medoids: k-medoids++ seeding, then alternating assignment / medoid update."""
    block = _Block(x, torch.sqrt_, block_size)
    n = block.n
    dev = x.device
    first = int(torch.randint(n, (1,), generator=g))
    med = [first]
    dmin = block.rows(torch.tensor([first], device=dev))[0].double().cpu()
    for _ in range(1, m):
        w = dmin * dmin
        w[med] = 0
        nxt = int(torch.multinomial(w, 1, generator=g)) if float(w.sum()) > 0 else \
            next(i for i in range(n) if i not in med)
        med.append(nxt)
        dmin = torch.minimum(dmin, block.rows(torch.tensor([nxt], device=dev))[0].double().cpu())
    med_t = torch.tensor(med, device=dev)
    ar = torch.arange(m, device=dev)
    for _ in range(n_iter):
        assign = block.rows(med_t).argmin(0)
        assign[med_t] = ar
        onehot = torch.nn.functional.one_hot(assign, m).to(torch.float64)
        cost = block.matmul(onehot).masked_fill_(onehot == 0, math.inf)  # cost[i, j]: sum of D[i, cluster j]
        best = cost.argmin(0)
        improve = cost[best, ar] < cost[med_t, ar] * (1 - 1e-12)
        if not bool(improve.any()):
            break
        med_t = torch.where(improve, best, med_t)
    return med_t.cpu()


def kmedoids_prototypes(features, labels, m: int, seed: int = 0, *, n_iter: int = 50,
                        block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``m`` k-medoids (Euclidean) per class: seeded k-medoids++ start, then alternating
    assignment and medoid updates (each cluster's member with the least summed distance to its
    cluster) until no medoid improves or ``n_iter`` rounds; batched per class.

    Returns:
        (K * m,) int64 indices into ``features``, grouped by class (ascending).
    """
    x = _features(features)
    y = _labels(labels, x.shape[0])
    m = _count(m, "m", 1)
    n_iter = _count(n_iter, "n_iter", 0)
    groups = _groups(y, x.shape[0])
    _check_m(groups, m)
    g = torch.Generator().manual_seed(int(seed))
    return torch.cat([idx[_kmedoids_block(x[idx.to(x.device)], m, g, n_iter, block_size)] for _, idx in groups])


METHODS = ("mmd-critic", "random", "k-medoids")


def prototype_curve(
    train_features,
    train_labels,
    test_features,
    test_labels,
    ms: Sequence[int] = (1, 2, 5, 10),
    methods: Sequence[str] = METHODS,
    *,
    gamma: float | None = None,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[dict]:
    """Test accuracy of the 1-nearest-prototype classifier vs prototypes per class (higher is better).

    MMD-critic runs once with ``max(ms)`` prototypes (greedy: its first ``m`` are its answer for
    ``m``); random and k-medoids are drawn per ``m`` and averaged over ``seeds``.

    Returns:
        Rows ``{"method", "m", "accuracy", "accuracy_std", "runs"}`` (std over seeds; 0 for MMD-critic).
    """
    xtr = _features(train_features, "train_features")
    ytr = _labels(train_labels, xtr.shape[0], "train_labels")
    xte = _features(test_features, "test_features")
    yte = _labels(test_labels, xte.shape[0], "test_labels")
    unknown = [mt for mt in methods if mt not in METHODS]
    if unknown:
        raise TrustVisionError(f"unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}")
    ms = [_count(v, "m", 1) for v in ms]
    if not ms or not seeds:
        raise TrustVisionError("prototype_curve needs at least one m in ms= and one seed in seeds=")

    def acc(idx: torch.Tensor) -> float:
        pred = prototype_classifier(xtr[idx.to(xtr.device)], ytr[idx], xte)
        return float((pred == yte).double().mean())

    rows: list[dict] = []
    for method in methods:
        if method == "mmd-critic":
            res = mmd_critic(xtr, ytr, n_prototypes=max(ms), n_criticisms=0, gamma=gamma)
            for m in ms:
                idx = torch.tensor([i for v in res.prototypes_by_class.values() for i in v[:m]])
                rows.append({"method": method, "m": m, "accuracy": acc(idx), "accuracy_std": 0.0, "runs": 1})
            continue
        for m in ms:
            draw = random_prototypes if method == "random" else \
                (lambda y, m, s: kmedoids_prototypes(xtr, y, m, s))
            a = np.array([acc(draw(ytr, m, s)) for s in seeds])
            rows.append({"method": method, "m": m, "accuracy": float(a.mean()), "accuracy_std": float(a.std()),
                         "runs": len(seeds)})
    return rows


# -- bias probe ------------------------------------------------------------------------------


def bias_enrichment(indices, attribute, labels) -> dict[int, dict]:
    """How often a per-sample boolean ``attribute`` holds among chosen samples vs its class's base rate.

    Args:
        indices: chosen sample indices (e.g. ``result.criticisms``).
        attribute: (n,) booleans (e.g. "the image carries no shortcut marker").
        labels: (n,) integer labels; each chosen index counts for its own label's class.

    Returns:
        class -> ``{"n", "base_rate", "selected", "rate", "ratio"}``: class size, the attribute's
        rate in the class, how many chosen samples the class has, the rate among them (``None``
        when none) and ``rate / base_rate`` (the enrichment; ``None`` when undefined).
    """
    y = _labels(labels, len(labels) if not isinstance(labels, torch.Tensor) else labels.shape[0])
    a = torch.as_tensor(np.asarray(attribute.cpu() if isinstance(attribute, torch.Tensor) else attribute))
    if a.ndim != 1 or a.shape[0] != y.shape[0]:
        raise TrustVisionError(f"attribute must be 1-D with one entry per label ({y.shape[0]}); got shape "
                               f"{tuple(a.shape)}")
    a = a.bool()
    idx = torch.as_tensor(np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices),
                          dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= y.shape[0]):
        raise TrustVisionError(f"indices must lie in 0..{y.shape[0] - 1}; pass indices into the same samples as labels")
    out: dict[int, dict] = {}
    for key, members in _groups(y, y.shape[0]):
        base = float(a[members].double().mean())
        sel = idx[y[idx] == key]
        rate = float(a[sel].double().mean()) if sel.numel() else None
        out[key] = {"n": int(members.numel()), "base_rate": base, "selected": int(sel.numel()), "rate": rate,
                    "ratio": (rate / base) if rate is not None and base > 0 else None}
    return out
