"""FGSM, PGD-Linf/L2, robust accuracy and the minimal eps with known answers: the eps ball and [0, 1]
are never left, eps = 0 is clean accuracy, more steps are never weaker, the linear model's minimal
Linf eps is margin / ||w||_1 and its FGSM step is the analytic sign step, batched == one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustvision import models
from trustvision.errors import TrustVisionError
from trustvision.evaluate import adversarial as adv

torch.set_num_threads(1)


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval().to(dtype)


def _images(n=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)
    x[:, :, 0] = 0.0  # pixels on the bounds: clipping to [0, 1] is exercised
    x[:, :, -1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def _linear(d=16, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(d, 2).to(dtype)
    return nn.Sequential(nn.Flatten(), lin).eval(), lin


def _loss(net, x, y):
    with torch.no_grad():
        z = net(x)
        return nn.functional.cross_entropy(z, y, reduction="none"), z.argmax(1) != y


@pytest.mark.parametrize("name", ["fgsm", "pgd-linf", "pgd-l2"])
@pytest.mark.parametrize("eps", [0.03, 0.3, 1.5])
def test_perturbations_stay_in_the_eps_ball_and_in_0_1(name, eps):
    net = _cnn()
    x, y = _images()
    a = adv.attack(net, x, y, name, eps, steps=5, seed=3)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    d = (a - x).flatten(1)
    dist = d.abs().max(1).values if adv.NORM_OF[name] == "linf" else d.norm(dim=1)
    assert float(dist.max()) <= eps * (1 + 1e-5) + 1e-6
    assert float(dist.max()) > 0  # it moved


def test_per_image_eps_is_respected():
    net = _cnn()
    x, y = _images(6)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    for norm in ("linf", "l2"):
        a = adv.pgd(net, x, y, eps, norm=norm, steps=4)
        d = (a - x).flatten(1)
        dist = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
        assert torch.all(dist <= eps * (1 + 1e-5) + 1e-7)
        assert torch.equal(a[0], x[0])


def test_accuracy_at_eps_zero_is_clean_accuracy():
    net = _cnn()
    x, y = _images(30)
    with torch.no_grad():
        clean = float((net(x).argmax(1) == y).double().mean())
    for name in adv.list_attacks():
        # AutoAttack at eps > 0 runs its whole suite on every image it cannot break (13-20 s here on
        # this random net's 2 correct images); its eps > 0 results are the linear-model and
        # package-equality tests below
        eps = [0.0] if name.startswith("autoattack") else [0.0, 0.05]
        r = adv.robust_accuracy(net, x, y, name, eps, steps=3)
        assert r.accuracy[0] == clean == r.clean_accuracy
        assert r.accuracy[-1] <= r.accuracy[0]
    assert torch.equal(adv.pgd(net, x, y, 0.0), x)
    assert torch.equal(adv.fgsm(net, x, y, 0.0), x)


def test_pgd_keeps_the_best_iterate_so_more_steps_are_never_weaker():
    net = _cnn()
    x, y = _images(40, seed=1)
    eps = 0.05
    for norm in ("linf", "l2"):
        e = eps if norm == "linf" else 0.4
        alpha = 2.5 * e / 10
        start = adv.pgd(net, x, y, e, norm=norm, steps=0, seed=7)
        prev_loss, prev_wrong = _loss(net, start, y)
        for steps in (1, 3, 10, 25):
            a = adv.pgd(net, x, y, e, norm=norm, steps=steps, alpha=alpha, seed=7)
            loss, wrong = _loss(net, a, y)
            assert torch.all(wrong | ~prev_wrong), "an image fooled with fewer steps is no longer fooled"
            kept = ~wrong & ~prev_wrong
            assert torch.all(loss[kept] >= prev_loss[kept] - 1e-6)
            prev_loss, prev_wrong = loss, wrong
        assert int(prev_wrong.sum()) > 0


def test_steps_zero_is_the_seeded_random_start_and_seeds_matter():
    net = _cnn()
    x, y = _images(4)
    a = adv.pgd(net, x, y, 0.1, steps=0, seed=1)
    assert torch.equal(a, adv.pgd(net, x, y, 0.1, steps=0, seed=1))
    assert not torch.equal(a, adv.pgd(net, x, y, 0.1, steps=0, seed=2))
    assert torch.equal(adv.pgd(net, x, y, 0.1, steps=0, random_start=False), x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batched_equals_one_by_one_and_order_does_not_matter(norm):
    net = _cnn(torch.float64)
    x, y = _images(9, dtype=torch.float64, seed=2)
    eps = 0.08 if norm == "linf" else 0.6
    whole = adv.pgd(net, x, y, eps, norm=norm, steps=6, seed=5, batch_size=None)
    chunks = adv.pgd(net, x, y, eps, norm=norm, steps=6, seed=5, batch_size=4)
    single = torch.cat([adv.pgd(net, x[i:i + 1], y[i:i + 1], eps, norm=norm, steps=6, seed=5) for i in range(9)])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    permuted = adv.pgd(net, x[perm], y[perm], eps, norm=norm, steps=6, seed=5)
    torch.testing.assert_close(whole, single, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunks, single, rtol=0, atol=1e-10)
    torch.testing.assert_close(permuted, single[perm], rtol=0, atol=1e-10)


def test_fgsm_on_a_linear_model_is_the_analytic_sign_step():
    net, lin = _linear(d=16)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 4, 4, generator=g)
    y = torch.randint(0, 2, (20,), generator=g)
    eps = 0.07
    w = lin.weight.detach()
    direction = w[1 - y] - w[y]  # the CE gradient w.r.t. x is (1 - p_y) (w_other - w_y)
    expected = (x + eps * direction.sign().reshape(x.shape)).clamp(0, 1)
    torch.testing.assert_close(adv.fgsm(net, x, y, eps), expected, rtol=0, atol=1e-7)


def test_minimal_linf_eps_of_a_linear_model_is_margin_over_l1_norm_of_w():
    d = 64
    net, lin = _linear(d=d, seed=1)
    g = torch.Generator().manual_seed(1)
    x = 0.35 + 0.3 * torch.rand(200, 1, 8, 8, generator=g)  # in [0.35, 0.65]: far from the bounds
    with torch.no_grad():
        z = net(x)
    y = z.argmax(1)  # every image classified correctly
    w = lin.weight.detach()
    wd = w[y] - w[1 - y]
    margin = (z[torch.arange(len(y)), y] - z[torch.arange(len(y)), 1 - y]).double()
    analytic = margin / wd.abs().sum(1).double()
    keep = analytic < 0.3  # the corner x - eps sign(w) stays inside [0, 1]
    assert int(keep.sum()) >= 50
    x, y, analytic = x[keep], y[keep], analytic[keep]
    r = adv.minimal_eps(net, x, y, "linf", eps_max=0.32, iterations=20, steps=10, seed=0)
    assert r.n_flipped == len(y)
    got = torch.tensor(r.eps, dtype=torch.float64)
    assert torch.all((got - analytic).abs() <= 0.01 * analytic), (got / analytic).aminmax()
    assert torch.all(got >= analytic * (1 - 1e-4))  # never below the true minimal radius
    assert r.median == pytest.approx(float(got.median()) if len(got) % 2 else
                                     float(got.sort().values[len(got) // 2 - 1: len(got) // 2 + 1].mean()))


def test_minimal_l2_eps_of_a_linear_model_is_margin_over_l2_norm_of_w_from_above():
    net, lin = _linear(d=64, seed=1)
    g = torch.Generator().manual_seed(1)
    x = 0.35 + 0.3 * torch.rand(100, 1, 8, 8, generator=g)
    with torch.no_grad():
        z = net(x)
    y = z.argmax(1)
    w = lin.weight.detach()
    wd = w[y] - w[1 - y]
    analytic = (z[torch.arange(len(y)), y] - z[torch.arange(len(y)), 1 - y]).double() / wd.norm(dim=1).double()
    keep = analytic < 1.0
    r = adv.minimal_eps(net, x[keep], y[keep], "l2", eps_max=1.07, iterations=20, steps=10)
    got = torch.tensor(r.eps, dtype=torch.float64)
    # PGD cannot flip below the true minimal radius; 10 L2 steps from a random start get within 5%
    assert torch.all(got >= analytic[keep] * (1 - 1e-4))
    assert torch.all(got <= analytic[keep] * 1.05)


def test_minimal_eps_is_zero_for_misclassified_and_none_when_unflipped():
    net, lin = _linear(d=16)
    x = 0.5 * torch.ones(3, 1, 4, 4)
    with torch.no_grad():
        p = net(x).argmax(1)
    y = torch.stack([1 - p[0], p[1], p[2]])
    r = adv.minimal_eps(net, x, y, "linf", eps_max=1e-6, iterations=4, steps=3)
    assert r.eps[0] == 0.0 and r.eps[1] is None and r.eps[2] is None and r.median is None
    r2 = adv.minimal_eps(net, x, y, "l2", eps_max=50.0, iterations=4, steps=3)
    assert r2.eps[0] == 0.0 and r2.n_flipped == 2 and r2.median is not None


def test_eps_sweep_follows_the_image_size():
    assert adv.eps_sweep(32) == pytest.approx([0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    assert adv.eps_sweep((8, 8)) == pytest.approx([0, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255])
    assert adv.eps_sweep(224) == adv.eps_sweep(32)
    assert adv.eps_sweep(8, "l2") == adv.eps_sweep(32, "l2") == pytest.approx([0, 0.125, 0.25, 0.5, 1.0])
    assert adv.headline_eps(32) == pytest.approx(8 / 255) and adv.headline_eps(224, "l2") == pytest.approx(3.5)
    assert adv.format_eps(adv.headline_eps(8)) == "32/255" and adv.format_eps(0.5, "l2") == "0.5"
    assert adv.format_eps(0.074, "linf") == "18.9/255" and adv.format_eps(0.0) == "0"
    with pytest.raises(TrustVisionError):
        adv.eps_sweep(32, "l1")
    with pytest.raises(TrustVisionError, match="unknown attack"):
        adv.attack(_cnn(), *_images(2), "cw", 0.1)


def test_heatmap_change_known_answers():
    h = torch.arange(16.0).reshape(1, 1, 4, 4)
    same = adv.heatmap_change(h, h * 3 + 1)
    assert same["spearman"] == [pytest.approx(1.0)] and same["top_overlap"] == [1.0]
    rev = adv.heatmap_change(h, -h)
    assert rev["spearman"] == [pytest.approx(-1.0)] and rev["top_overlap"] == [0.0]
    assert adv.heatmap_change(h, torch.zeros_like(h))["spearman"] == [None]


def test_attacks_a_generative_classifier():
    torch.manual_seed(0)
    gc = models.create("ibinn-small", num_classes=10, in_chans=1, image_size=8, widths=(8, 8, 8), fc_width=32)
    gc.eval()
    x, y = _images(6)
    for name in adv.list_attacks():
        a = adv.attack(gc, x, y, name, 0.1, steps=3)
        assert torch.isfinite(a).all() and float(a.min()) >= 0 and float(a.max()) <= 1
    loss0, _ = _loss(gc, x, y)
    loss1, wrong = _loss(gc, adv.pgd(gc, x, y, 0.1, steps=5), y)
    assert torch.all(wrong | (loss1 >= loss0 - 1e-5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = _cnn(torch.float64)
    x, y = _images(8, dtype=torch.float64)
    cpu = adv.pgd(net, x, y, 0.05, steps=4, seed=1)
    gpu = adv.pgd(net.cuda(), x.cuda(), y.cuda(), 0.05, steps=4, seed=1)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-8)


# --- AutoAttack (pyautoattack, the original algorithm repackaged) ---------------------------------

def _linear10(n=60, seed=1):
    """A 10-class linear model on images far from the bounds, and each image's analytic minimal
    Linf radius min_j (z_y - z_j) / ||w_y - w_j||_1 (exact while the box [0, 1] does not bind)."""
    torch.manual_seed(seed)
    lin = nn.Linear(64, 10)
    net = nn.Sequential(nn.Flatten(), lin).eval()
    g = torch.Generator().manual_seed(seed)
    x = 0.35 + 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        z = net(x)
    y = z.argmax(1)
    w = lin.weight.detach()
    m = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(-1).clamp_min(1e-12)
    m[torch.arange(n), y] = float("inf")
    return net, x, y, m.min(1).values


def test_autoattack_on_a_linear_model_breaks_exactly_the_images_within_their_analytic_radius():
    pytest.importorskip("pyautoattack")
    net, x, y, radius = _linear10()
    s = radius.sort().values
    i = len(s) // 2
    eps = float((s[i - 1] + s[i]) / 2)  # between two images' radii: no image sits on the boundary
    a = adv.autoattack(net, x, y, eps, seed=0)
    assert (a - x).abs().max() <= eps + 1e-6 and a.min() >= 0 and a.max() <= 1
    with torch.no_grad():
        robust = net(a).argmax(1) == y
    assert torch.equal(robust, radius > eps)
    # PGD (10 steps on the cross-entropy) is weaker on this model: AutoAttack is never above it
    p = adv.pgd(net, x, y, eps, seed=0)
    with torch.no_grad():
        assert int(robust.sum()) <= int((net(p).argmax(1) == y).sum())


def test_autoattack_equals_the_package_run_directly_and_leaves_the_global_rng_alone():
    pyautoattack = pytest.importorskip("pyautoattack")
    net, x, y, radius = _linear10(n=16, seed=2)
    s = radius.sort().values
    eps = float((s[-3] + s[-2]) / 2)  # two images stay robust: every attack of the standard version runs
    before = torch.random.get_rng_state()
    ours = adv.autoattack(net, x, y, eps, seed=3, batch_size=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    aa = pyautoattack.AutoAttack(net, norm="Linf", eps=eps, seed=3, version="standard", device="cpu")
    aa.verbose = False
    theirs, _ = aa.run_standard_evaluation(x, y, batch_size=8)
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        assert torch.equal(net(ours).argmax(1) == y, radius > eps)


def test_autoattack_in_robust_accuracy_l2_ball_and_errors(monkeypatch):
    pytest.importorskip("pyautoattack")
    net, x, y, _ = _linear10(n=20)
    r = adv.robust_accuracy(net, x, y, "autoattack-l2", [0.0, 3.0], seed=0)
    assert r.norm == "l2" and r.accuracy == [1.0, 0.0]
    a = adv.attack(net, x, y, "autoattack-l2", 3.0, seed=0)
    assert float((a - x).flatten(1).norm(dim=1).max()) <= 3.0 + 1e-5
    with pytest.raises(TrustVisionError, match="one radius"):
        adv.autoattack(net, x, y, torch.linspace(0.1, 0.2, len(x)))
    monkeypatch.setitem(__import__("sys").modules, "pyautoattack", None)
    with pytest.raises(TrustVisionError, match=r"trustvision\[autoattack\]"):
        adv.autoattack(net, x, y, 0.1)
