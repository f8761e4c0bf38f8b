"""MMD-critic (Kim et al. 2016): prototypes, criticisms, the 1-nearest-prototype evaluation.

The greedy selections are checked against a plain implementation of the paper's algorithm written
here (dense kernel, every candidate's objective evaluated directly, log det by ``slogdet``).
"""

import json

import numpy as np
import pytest
import torch

from trustvision.errors import TrustVisionError
from trustvision.evaluate.criticism import (
    bias_enrichment,
    kmedoids_prototypes,
    median_gamma,
    mmd_critic,
    prototype_classifier,
    prototype_curve,
    random_prototypes,
)


def clusters(n=40, seed=0, sigma=0.3):
    """Two 2-D Gaussian clusters at (0, 0) and (6, 0): rows 0..n-1 and n..2n-1."""
    g = torch.Generator().manual_seed(seed)
    a = sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = sigma * torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([6.0, 0.0], dtype=torch.float64)
    return torch.cat([a, b])


# -- a straightforward implementation of the paper's greedy algorithm --------------------------


def naive_block(x: np.ndarray, gamma: float, m: int, k: int, logdet: bool):
    n = len(x)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    kern = np.exp(-gamma * d2)
    protos: list[int] = []
    for _ in range(m):
        best, best_f = None, -np.inf
        for c in range(n):
            if c in protos:
                continue
            q = protos + [c]
            f = 2.0 / (len(q) * n) * kern[q].sum() - kern[np.ix_(q, q)].sum() / len(q) ** 2
            if f > best_f:
                best, best_f = c, f
        protos.append(best)
    witness = kern.mean(1) - kern[:, protos].mean(1)
    crits: list[int] = []
    for _ in range(k):
        best, best_v = None, -np.inf
        for c in range(n):
            if c in protos or c in crits:
                continue
            q = crits + [c]
            v = np.abs(witness[q]).sum()
            if logdet:
                v += np.linalg.slogdet(kern[np.ix_(q, q)])[1]
            if v > best_v:
                best, best_v = c, v
        crits.append(best)
    mmd2 = kern.mean() - 2 * kern[protos].mean() + kern[np.ix_(protos, protos)].mean()
    return protos, crits, witness, mmd2


def naive(x: np.ndarray, y: np.ndarray | None, gamma: float, m: int, k: int, logdet: bool):
    groups = [np.arange(len(x))] if y is None else [np.flatnonzero(y == c) for c in np.unique(y)]
    protos, crits, witness = [], [], np.zeros(len(x))
    for idx in groups:
        p, c, w, _ = naive_block(x[idx], gamma, m, k, logdet)
        protos += idx[p].tolist()
        crits += idx[c].tolist()
        witness[idx] = w
    return protos, crits, witness


# -- behaviour on clusters ---------------------------------------------------------------------


def test_two_prototypes_land_one_in_each_cluster():
    x = clusters()
    res = mmd_critic(x, n_prototypes=2, n_criticisms=0, per_class=False)
    assert sorted(int(i) // 40 for i in res.prototypes) == [0, 1]
    assert res.prototypes_by_class == {"all": res.prototypes.tolist()}


def test_planted_outliers_are_the_top_criticisms():
    # Two tight clusters (one prototype each) and a small planted group of 3 near-identical outliers
    # far from both. The witness of a planted point is ~ 3/n (its group's mass, no prototype near);
    # every cluster point has w ~ -3/(2n) (each prototype carries 1/2 of the mass, its cluster only
    # (n - 3)/(2n)). A single isolated outlier would only reach 1/n, less than the bulk's deficit
    # once there are two of them: MMD-critic criticises under-represented mass, not distance.
    g = torch.Generator().manual_seed(1)
    planted = torch.tensor([[3.0, 10.0]], dtype=torch.float64) + 0.01 * torch.randn(
        3, 2, generator=g, dtype=torch.float64)
    x = torch.cat([clusters(sigma=0.1), planted])  # rows 80, 81, 82
    plain = mmd_critic(x, n_prototypes=2, n_criticisms=3, per_class=False, gamma=0.1, regularizer=None)
    assert sorted(plain.criticisms.tolist()) == [80, 81, 82]
    assert float(plain.witness[80:].min()) > 1.5 * float(plain.witness[:80].abs().max())
    assert plain.witness[80:].numpy() == pytest.approx(3 / 83, rel=1e-3)
    # with the log-det term the first criticism is still a planted point, the next ones are elsewhere
    div = mmd_critic(x, n_prototypes=2, n_criticisms=3, per_class=False, gamma=0.1)
    assert div.criticisms[0] in (80, 81, 82) and all(int(i) < 80 for i in div.criticisms[1:])


def test_mmd2_never_increases_and_equals_the_direct_value():
    # a kernel narrower than the clusters: F is monotone there (the paper's diagonal dominance)
    x = clusters(n=60, seed=3)
    res = mmd_critic(x, n_prototypes=12, n_criticisms=0, per_class=False, gamma=10.0)
    trace = np.array(res.mmd2["all"])
    assert len(trace) == 12
    assert np.all(np.diff(trace) < 0)
    assert trace[-1] < 0.1 * trace[0]
    p = res.prototypes.tolist()
    kern = np.exp(-res.gamma * ((x.numpy()[:, None] - x.numpy()[None]) ** 2).sum(-1))
    assert trace[-1] == pytest.approx(kern.mean() - 2 * kern[p].mean() + kern[np.ix_(p, p)].mean(), abs=1e-12)
    assert trace[-1] == pytest.approx(naive_block(x.numpy(), res.gamma, 12, 0, True)[3], abs=1e-12)


def test_logdet_makes_duplicated_outliers_give_distinct_criticisms():
    dup = torch.tensor([[3.0, 10.0]], dtype=torch.float64).repeat(3, 1)  # rows 80, 81, 82: three copies
    x = torch.cat([clusters(sigma=0.1), dup])
    plain = mmd_critic(x, n_prototypes=2, n_criticisms=3, per_class=False, gamma=0.1, regularizer=None)
    assert sorted(plain.criticisms.tolist()) == [80, 81, 82]  # the same point three times
    div = mmd_critic(x, n_prototypes=2, n_criticisms=3, per_class=False, gamma=0.1, regularizer="logdet")
    crit = div.criticisms.tolist()
    assert crit[0] in (80, 81, 82) and crit[1] < 80 and crit[2] < 80
    chosen = x[crit]
    assert float(torch.pdist(chosen).min()) > 3.0  # the copy and one point of each cluster
    assert sorted(int(i) // 40 for i in crit[1:]) == [0, 1]
    # the gain of a step is |w| + log(Schur complement); the first one has nothing to condition on
    assert div.criticism_gains["all"][0] == pytest.approx(abs(float(div.witness[crit[0]])), abs=1e-12)
    assert div.criticism_gains["all"][1] < abs(float(div.witness[crit[1]]))


# -- against the plain implementation ----------------------------------------------------------


@pytest.mark.parametrize("per_class", [True, False])
@pytest.mark.parametrize("regularizer", ["logdet", None])
def test_matches_the_plain_greedy_algorithm(per_class, regularizer):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), [20, 25, 18])
    x = rng.normal(size=(len(y), 4)) + 1.5 * y[:, None]
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    gamma = 0.3
    res = mmd_critic(torch.from_numpy(x), y, n_prototypes=4, n_criticisms=3, gamma=gamma,
                     regularizer=regularizer, per_class=per_class)
    p, c, w = naive(x, y if per_class else None, gamma, 4, 3, regularizer == "logdet")
    assert res.prototypes.tolist() == p
    assert res.criticisms.tolist() == c
    np.testing.assert_allclose(res.witness.numpy(), w, atol=1e-12)
    if per_class:
        assert list(res.prototypes_by_class) == [0, 1, 2]
        assert all(int(y[i]) == k for k, v in res.prototypes_by_class.items() for i in v)


def test_chunked_blocks_equal_dense_blocks():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(2), 30)
    x = torch.from_numpy(rng.normal(size=(60, 3)) + y[:, None])
    dense = mmd_critic(x, y, n_prototypes=5, n_criticisms=4, gamma=0.5)
    chunked = mmd_critic(x, y, n_prototypes=5, n_criticisms=4, gamma=0.5, block_size=7)  # 30 > 7: chunks of 1 row
    assert chunked.prototypes.tolist() == dense.prototypes.tolist()
    assert chunked.criticisms.tolist() == dense.criticisms.tolist()
    np.testing.assert_allclose(chunked.mmd2[0], dense.mmd2[0], atol=1e-12)
    torch.testing.assert_close(chunked.witness, dense.witness, atol=1e-12, rtol=0)


def test_indices_refer_to_the_callers_order():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 30)
    x = (rng.normal(size=(90, 5)) + 2 * y[:, None]).astype(np.float32)
    ref = mmd_critic(x, y, n_prototypes=3, n_criticisms=2)
    perm = rng.permutation(90)
    res = mmd_critic(x[perm], y[perm], n_prototypes=3, n_criticisms=2)
    assert res.gamma == pytest.approx(ref.gamma, rel=1e-6)
    for k in range(3):
        assert perm[res.prototypes_by_class[k]].tolist() == ref.prototypes_by_class[k]
        assert perm[res.criticisms_by_class[k]].tolist() == ref.criticisms_by_class[k]
    torch.testing.assert_close(res.witness, ref.witness[torch.from_numpy(perm)], atol=1e-6, rtol=0)


def test_numpy_and_tensor_inputs_agree_and_result_serialises():
    x = clusters().numpy()
    y = np.repeat([0, 1], 40)
    a = mmd_critic(x, y, n_prototypes=2, n_criticisms=1)
    b = mmd_critic(torch.from_numpy(x), torch.from_numpy(y), n_prototypes=2, n_criticisms=1)
    assert a.prototypes.tolist() == b.prototypes.tolist() and a.criticisms.tolist() == b.criticisms.tolist()
    d = json.loads(a.to_json())
    assert d["prototypes"] == a.prototypes.tolist()
    assert d["prototypes_by_class"] == {"0": a.prototypes_by_class[0], "1": a.prototypes_by_class[1]}
    assert len(d["witness"]) == 80 and len(d["mmd2"]["0"]) == 2
    assert d["gamma"] == a.gamma and d["regularizer"] == "logdet" and d["per_class"] is True


# -- gamma, evaluation helpers -------------------------------------------------------------------


def test_median_gamma_is_one_over_the_median_squared_distance():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # squared distances of the 6 pairs: 1, 4, 18, 5, 13, 10 -> median (5 + 10) / 2 = 7.5
    assert median_gamma(x) == pytest.approx(1 / 7.5)
    # same-class pairs only: (0, 1) -> 1 and (2, 3) -> 10 -> median 5.5
    assert median_gamma(x, [0, 0, 1, 1]) == pytest.approx(1 / 5.5)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, 3))
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)[np.triu_indices(30, 1)]
    assert median_gamma(z) == pytest.approx(1 / np.median(d2), rel=1e-12)
    assert mmd_critic(z, n_prototypes=2, n_criticisms=1, per_class=False).gamma == pytest.approx(1 / np.median(d2))
    # a seeded subsample above max_samples: reproducible
    assert median_gamma(z, max_samples=10, seed=3) == median_gamma(z, max_samples=10, seed=3)


def test_prototype_classifier_known_answer():
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([2, 0, 1])
    test = torch.tensor([[1.0, 1.0], [9.0, -1.0], [1.0, 8.0], [6.0, 0.0]])
    assert prototype_classifier(protos, labels, test).tolist() == [2, 0, 1, 0]
    assert prototype_classifier(protos.numpy(), [2, 0, 1], test.numpy(), batch_size=1).tolist() == [2, 0, 1, 0]


def test_random_and_kmedoids_return_m_per_class():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), [15, 20, 25])
    # each class is two tight sub-clusters at +-3 along its own axis
    centers = np.eye(3)[y] * 3 * np.where(np.arange(60) % 2 == 0, 1, -1)[:, None]
    x = centers + 0.1 * rng.normal(size=(60, 3))
    for idx in (random_prototypes(y, 2, seed=0), kmedoids_prototypes(x, y, 2, seed=0)):
        assert idx.dtype == torch.long and len(set(idx.tolist())) == 6
        assert np.bincount(y[idx.numpy()]).tolist() == [2, 2, 2]
    assert random_prototypes(y, 2, seed=1).tolist() == random_prototypes(y, 2, seed=1).tolist()
    med = kmedoids_prototypes(x, y, 2, seed=0).numpy()
    # one medoid in each sub-cluster of each class, and it is the sub-cluster's medoid
    for k in range(3):
        mk = med[y[med] == k]
        assert sorted(mk % 2) == [0, 1]
        for i in mk:
            members = np.flatnonzero((y == k) & (np.arange(60) % 2 == i % 2))
            cost = np.linalg.norm(x[members][:, None] - x[members][None], axis=-1).sum(1)
            assert i == members[cost.argmin()]


def test_mmd_critic_prototypes_beat_random_on_digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm]
    rows = prototype_curve(x[:1000], y[:1000], x[1000:], y[1000:], ms=(2, 5), methods=("mmd-critic", "random"),
                           seeds=range(5))
    acc = {(r["method"], r["m"]): r for r in rows}
    for m in (2, 5):
        mmd, rnd = acc["mmd-critic", m]["accuracy"], acc["random", m]
        # measured: m=2 0.89 vs 0.76 +- 0.03; m=5 0.92 vs 0.86 +- 0.02 (mean +- std over 5 seeds)
        assert mmd > rnd["accuracy"] + 0.03
        assert mmd > rnd["accuracy"] + 1.5 * rnd["accuracy_std"]
    assert acc["mmd-critic", 5]["accuracy"] > acc["mmd-critic", 2]["accuracy"]
    # on these real data the per-class MMD^2 falls at every greedy step
    res = mmd_critic(x[:1000], y[:1000], n_prototypes=10, n_criticisms=0)
    assert all(np.all(np.diff(v) < 0) for v in res.mmd2.values())


def test_prototype_curve_table_layout():
    x = clusters().numpy()
    y = np.repeat([0, 1], 40)
    rows = prototype_curve(x, y, x, y, ms=(1, 3), seeds=(0, 1))
    assert [(r["method"], r["m"]) for r in rows] == [
        ("mmd-critic", 1), ("mmd-critic", 3), ("random", 1), ("random", 3), ("k-medoids", 1), ("k-medoids", 3)]
    assert all(r["accuracy"] == 1.0 for r in rows)
    assert [r["runs"] for r in rows] == [1, 1, 2, 2, 2, 2]


def test_bias_enrichment_known_answer():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    attr = [True, False, False, False, True, True, False, False, False]
    out = bias_enrichment([0, 1, 4, 5], attr, labels)
    assert out[0] == {"n": 4, "base_rate": 0.25, "selected": 2, "rate": 0.5, "ratio": 2.0}
    assert out[1] == {"n": 5, "base_rate": 0.4, "selected": 2, "rate": 1.0, "ratio": pytest.approx(2.5)}
    none = bias_enrichment(torch.tensor([2]), torch.tensor(attr), torch.tensor(labels))
    assert none[0]["rate"] == 0.0 and none[0]["ratio"] == 0.0
    assert none[1]["selected"] == 0 and none[1]["rate"] is None and none[1]["ratio"] is None


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, words", [
    (lambda x, y: mmd_critic(x.reshape(20, 2, 2), np.zeros(20, int)), "2-D"),
    (lambda x, y: mmd_critic(x, y[:-1]), "one entry per feature vector"),
    (lambda x, y: mmd_critic(x), "needs labels"),
    (lambda x, y: mmd_critic(x, y, n_prototypes=9, n_criticisms=2), r"fewer than n_prototypes \+ n_criticisms = 11"),
    (lambda x, y: mmd_critic(x, y, n_prototypes=0), "n_prototypes must be an integer >= 1"),
    (lambda x, y: mmd_critic(x, y, regularizer="l2"), "unknown regularizer"),
    (lambda x, y: mmd_critic(x, y, 2, 1, gamma=-1.0), "gamma must be a positive number"),
    (lambda x, y: mmd_critic(np.full((20, 4), np.nan), y), "NaN"),
    (lambda x, y: mmd_critic(np.ones((20, 4)), y, n_prototypes=1, n_criticisms=0), "pass gamma="),
    (lambda x, y: random_prototypes(y, 11), "fewer than m = 11"),
    (lambda x, y: kmedoids_prototypes(x, y, 11), "fewer than m = 11"),
    (lambda x, y: prototype_classifier(x, y, x[:, :2]), "dimensions"),
    (lambda x, y: prototype_curve(x, y, x, y, methods=("kmeans",)), "unknown method"),
    (lambda x, y: bias_enrichment([0], [True] * 3, y), "attribute must be 1-D"),
    (lambda x, y: mmd_critic(x, ["a"] * 20), "labels must be integers"),
])
def test_user_errors_raise_trustvisionerror(call, words):
    x = np.random.default_rng(0).normal(size=(20, 4))
    y = np.repeat([0, 1], 10)
    with pytest.raises(TrustVisionError, match=words) as info:
        call(x, y)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("no_tf32")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(4), 50)
    x = torch.from_numpy(rng.normal(size=(200, 16)) + y[:, None]).float()
    cpu = mmd_critic(x, y, n_prototypes=5, n_criticisms=3)
    gpu = mmd_critic(x.cuda(), torch.from_numpy(y).cuda(), n_prototypes=5, n_criticisms=3)
    assert gpu.prototypes.tolist() == cpu.prototypes.tolist()
    assert gpu.criticisms.tolist() == cpu.criticisms.tolist()
    assert gpu.gamma == pytest.approx(cpu.gamma, rel=1e-5)
    torch.testing.assert_close(gpu.witness, cpu.witness, atol=1e-5, rtol=0)
    assert gpu.witness.device.type == "cpu"
    chunked = mmd_critic(x.cuda(), y, n_prototypes=5, n_criticisms=3, block_size=16)
    assert chunked.prototypes.tolist() == cpu.prototypes.tolist()
    assert kmedoids_prototypes(x.cuda(), y, 3).tolist() == kmedoids_prototypes(x, y, 3).tolist()
    assert prototype_classifier(x[cpu.prototypes].cuda(), y[cpu.prototypes.numpy()], x.cuda()).tolist() == \
        prototype_classifier(x[cpu.prototypes], y[cpu.prototypes.numpy()], x).tolist()
