"""I-GOS / iGOS++: known optima on a one-pixel model, batched == one at a time (noise on), a
saturated model whose mask must move, reliability flags (constant heatmaps, baselines that keep
the class, low confidence), the blur ladder, noise calibration and the automatic chunking."""

import math
import warnings

import pytest
import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.explain import IGOS, ExplanationWarning, IGOSPlusPlus
from trustvision.explain._base import constant_heatmaps, constant_rows, summarise_reasons
from trustvision._utils.images import (
    AutoChunk,
    blur_ladder,
    blur_params,
    default_mask_size,
    eval_mode,
    gaussian_blur,
    make_baseline,
    baseline_levels,
    uninformative_baseline,
)
from trustvision.explain.igos import total_variation

METHODS = [IGOS, IGOSPlusPlus]


class Saturated(nn.Module):
    """Two classes; logit_0 = 40 * (mean of the 3x3 block at rows/cols 2..4 - 0.5): on a white
    image p_0 = sigmoid(20) = 1 - 2e-9, and deleting a few block pixels leaves it at ~1."""

    def forward(self, x):
        v = 40 * (x[:, 0, 2:5, 2:5].mean((1, 2)) - 0.5)
        return torch.stack([v, torch.zeros_like(v)], 1)


class Fixed(nn.Module):
    """Output ignores the input entirely (logits 3, 0): no heatmap can say anything."""

    def forward(self, x):
        return torch.tensor([[3.0, 0.0]]).expand(x.shape[0], 2)


class Contrast(nn.Module):
    """p_0 = sigmoid(60 * (std of the image - 0.1)): blurring lowers it."""

    def forward(self, x):
        v = 60 * (x.flatten(1).std(1) - 0.1)
        return torch.stack([v, torch.zeros_like(v)], 1)


class NoiseShy(nn.Module):
    """p_0 = sigmoid(6 - 2000 * mean squared horizontal neighbour difference): Gaussian noise of
    std 0.045 (the default for a model without norm_std) destroys the class, half of it does not."""

    def forward(self, x):
        d = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3))
        v = 6 - 2000 * d
        return torch.stack([v, torch.zeros_like(v)], 1)


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplanationWarning)
        return fn(*a, **kw)


@pytest.mark.parametrize("cls", METHODS)
def test_exact_optimum_without_tv(cls, one_pixel):
    # Without the TV term the optimum is known: delete exactly the one pixel that matters
    # (its removal takes p_0 from sigmoid(3) to sigmoid(-3) for an area cost of 1/64).
    x = torch.ones(2, 1, 8, 8)
    heat, info = cls(one_pixel).attribute(x, baselines="zero", l2=0.0, return_info=True)
    expected = torch.zeros(8, 8)
    expected[3, 5] = 1.0
    assert heat.shape == (2, 1, 8, 8)
    torch.testing.assert_close(heat[:, 0], expected.expand(2, 8, 8), atol=1e-4, rtol=0)
    if cls is IGOS:
        opt = 1 / (1 + math.exp(3)) + 1 / 64  # p_0 after deletion + l1 * mean|1-M|
        assert info.final_loss == pytest.approx([opt, opt], abs=1e-4)
    assert info.unreliable == [False, False] and info.area_weight == [1.0, 1.0]


@pytest.mark.parametrize("cls", METHODS)
def test_heatmap_peaks_on_the_only_pixel_that_matters(cls, one_pixel):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    heat = cls(one_pixel).attribute(x, baselines="zero", iterations=10)
    flat = heat.flatten(1)
    assert (flat.argmax(1) == 3 * 8 + 5).all()
    assert (flat[:, 3 * 8 + 5] > 0.5).all()
    assert (heat >= 0).all() and (heat <= 1).all()


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("noise", [0.0, None])
def test_batched_equals_one_at_a_time(cls, noise, tiny_cnn):
    """Noise on or off: the same image gets the same heatmap alone, in a batch (in any order), and
    with any chunking: its noise is drawn from (seed, its pixels, the iteration)."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(iterations=4, ig_steps=5, noise=noise, seed=3)
    batched, info = quiet(cls(tiny_cnn).attribute, x, return_info=True, **kw)
    assert float(batched.amax()) > 0.01  # the masks really moved
    if noise is None:
        assert min(info.noise_std) > 0  # the noise was on
    single = torch.cat([quiet(cls(tiny_cnn).attribute, x[i : i + 1], **kw) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    chunked = quiet(cls(tiny_cnn).attribute, x, internal_batch_size=3, **kw)
    torch.testing.assert_close(batched, chunked, atol=1e-5, rtol=0)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = quiet(cls(tiny_cnn).attribute, x[perm], **kw)
    torch.testing.assert_close(batched[perm], shuffled, atol=1e-5, rtol=0)
    assert tiny_cnn.training is False
    if noise is None:  # another seed is other noise: other heatmaps
        other = quiet(cls(tiny_cnn).attribute, x, **{**kw, "seed": 4})
        assert float((other - batched).abs().max()) > 1e-3


def test_identical_images_get_identical_heatmaps(tiny_cnn):
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(7)).expand(3, 1, 8, 8)
    heat = quiet(IGOS(tiny_cnn).attribute, x, iterations=3, ig_steps=4)
    assert torch.equal(heat[0], heat[1]) and torch.equal(heat[0], heat[2])


@pytest.mark.parametrize("cls", METHODS)
def test_saturated_model_gets_a_mask_that_moves(cls):
    """The cause of the blank heatmaps: at M = 1 a saturated softmax does not move when cells are
    deleted, so the noise-free score at the mask rises along every small step of the integrated-
    gradient direction (the area term grows, the score does not fall): a line search on that one
    point rejects all steps. The integrated objective does fall, and the mask moves to the block."""
    model = Saturated()
    x = torch.ones(2, 1, 8, 8)
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[2:5, 2:5] = True

    def single_point(m):  # the old line-search objective: p_0 at the mask itself + area
        return torch.softmax(model(x[:1] * m), 1)[0, 0] + (1 - m).mean()

    m1 = torch.ones(1, 1, 8, 8)
    step = m1 - 0.05 * block.float()
    assert float(single_point(step)) > float(single_point(m1))  # every small deletion "costs"

    heat, info = cls(model).attribute(x, baselines="zero", return_info=True)
    assert info.constant == [False, False] and info.unreliable == [False, False]
    assert min(info.accepted_steps) >= 1
    flat = heat[:, 0]
    # the block ranks first: its least important pixel above every pixel outside it
    assert (flat[:, block].amin(1) > flat[:, ~block].amax(1)).all() and float(flat[:, block].mean()) > 0.3


@pytest.mark.parametrize("cls", METHODS)
def test_constant_heatmap_of_a_model_that_ignores_its_input_is_flagged(cls):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.warns(ExplanationWarning, match=r"3 of 3 images have unreliable heatmaps.*3 constant heatmaps"):
        heat, info = cls(Fixed()).attribute(x, iterations=3, ig_steps=4, return_info=True)
    assert float(heat.amax() - heat.amin()) == 0
    assert info.constant == [True, True, True] and info.unreliable == [True, True, True]
    assert info.target_probability[0] == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-5)
    assert all(r[0].startswith("heatmap is constant") for r in info.reasons)
    # the baseline (any baseline) gives the same output: it keeps the class, and says so
    assert info.baseline_keeps_class == [True] * 3
    assert "the baseline keeps the class (p = 0.95 on the blurred image, 0.95 on the image)" in info.reasons[0]
    d = info.to_json()
    assert d["unreliable"] == [True] * 3 and d["reasons"] == info.reasons and d["constant"] == [True] * 3


def test_flags_low_confidence_and_not_predicted(one_pixel):
    x = torch.ones(2, 1, 8, 8)
    with pytest.warns(ExplanationWarning, match="1 of 2 images"):
        _, info = IGOS(one_pixel).attribute(
            x, target=[0, 1], iterations=1, ig_steps=2, baselines="zero", return_info=True
        )
    assert info.predicted == [0, 0]
    assert info.not_predicted == [False, True]
    assert info.low_confidence == [False, True]
    assert info.unreliable == [False, True]
    assert info.target_probability[0] == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-5)
    assert info.reasons[0] == []
    assert "low confidence (p = 0.05 < 0.5)" in info.reasons[1]
    assert "not the predicted class (the model predicts 0)" in info.reasons[1]
    # deleting the pixel raises p_1: its mask cannot move (and the zero image shows class 1 better)
    assert info.constant == [False, True] and info.baseline_keeps_class == [False, True]
    assert set(info.to_json()) >= {"unreliable", "reasons", "target", "final_loss"}


def test_summarise_reasons_counts_kinds():
    reasons = [["heatmap is constant: no step of the mask optimisation was accepted",
                "the baseline keeps the class (p = 0.97 on the blurred image, 0.99 on the image)"],
               ["heatmap is constant: the mask ended with every cell equal"], [], ["low confidence (p = 0.30 < 0.5)"]]
    assert summarise_reasons(reasons) == "2 constant heatmaps, 1 baseline keeping the class, 1 low confidence"
    assert constant_heatmaps(torch.stack([torch.zeros(1, 4, 4), torch.eye(4).unsqueeze(0) * 1e-9])) == [True, False]


def test_constant_test_by_hand():
    # rows: all zero, all one, spread just below / above atol + rtol * max|h|, a one-cell bump of
    # 1e-9, a NaN, and a negative row whose max|h| is its min (-2: the bound 2e-6 at atol = 0)
    h = torch.stack([torch.zeros(16), torch.ones(16), torch.full((16,), 0.5), torch.full((16,), 0.5),
                     torch.zeros(16), torch.zeros(16), torch.full((16,), -2.0)])
    h[2, 0] += 0.9e-4
    h[3, 0] += 1.2e-4
    h[4, 3] = 1e-9
    h[5, 2] = float("nan")
    h[6, 0] += 1.5e-6  # spread 1.5e-6 < 1e-6 * 2
    assert constant_heatmaps(h, 1e-4) == [True, True, True, False, True, True, True]
    assert constant_heatmaps(h, 0.0) == [True, True, False, False, False, True, True]
    assert constant_rows(h.view(7, 1, 4, 4), 0.0).tolist() == [True, True, False, False, False, True, True]
    h[6, 0] += 1.5e-6  # spread 3e-6 > 2e-6
    assert constant_heatmaps(h, 0.0)[6] is False
    assert constant_heatmaps(torch.zeros(3, 0)) == [True, True, True]
    # other dtypes are read in float32 (bool and integer maps have no aminmax)
    assert constant_heatmaps(torch.eye(4, dtype=torch.bool).view(1, 16)) == [False]
    assert constant_heatmaps(h[:3].to(torch.bfloat16), 1e-4)[:2] == [True, True]


def test_blur_ladder_by_hand():
    assert blur_ladder(224, 224) == [(51, 50.0), (101, 100.0), (201, 200.0), (401, 400.0), (801, 800.0), None]
    ladder8 = blur_ladder(8, 8)
    assert [lv[0] for lv in ladder8[:-1]] == [3, 5, 9, 17] and ladder8[-1] is None
    assert [lv[0] for lv in blur_ladder(32, 32)[:-1]] == [7, 13, 25, 49, 97]


def test_uninformative_baseline_takes_the_weakest_blur_that_removes_the_class():
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float() * 0.8 + 0.1  # high-contrast images
    t = torch.zeros(3, dtype=torch.long)
    model = Contrast()
    ladder = blur_ladder(8, 8)
    images = [gaussian_blur(x, *lv) for lv in ladder[:-1]]
    images += [x.mean((2, 3), keepdim=True).expand_as(x), torch.full_like(x, 0.5), torch.zeros_like(x)]
    assert baseline_levels(8, 8) == ["blurred image"] * 4 + ["mean-colour image", "grey image", "black image"]
    with torch.no_grad():
        p_image = torch.softmax(model(x), 1)[:, 0]
        per_level = torch.stack([torch.softmax(model(b), 1)[:, 0] for b in images])  # (levels, N)
    base, p, level, runs = uninformative_baseline(model, x, t)
    for i in range(3):
        expected = next(j for j in range(len(images)) if per_level[j, i] < 0.5 * p_image[i])
        assert int(level[i]) == expected
        assert float(p[i]) == pytest.approx(float(per_level[expected, i]), abs=1e-6)
        torch.testing.assert_close(base[i], images[expected][i])
    assert int(level.max()) > 0  # the paper's blur alone was not enough for some image
    assert runs == 3 + int((level + 1).sum())


def test_baseline_that_keeps_the_class_is_flagged_with_its_probability():
    class Brightness(nn.Module):  # p_0 depends on the mean only: a blur keeps it, black does not
        def forward(self, x):
            v = 10 * (x.mean((1, 2, 3)) - 0.3)
            return torch.stack([v, torch.zeros_like(v)], 1)

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.4 + 0.4
    _, info = quiet(IGOS(Brightness()).attribute, x, iterations=2, ig_steps=3, baselines="blur",
                    return_info=True)
    assert info.baseline_keeps_class == [True, True] and info.unreliable == [True, True]
    p0 = info.baseline_probability[0]
    assert p0 == pytest.approx(info.target_probability[0], abs=0.02)  # the mean is (nearly) kept
    assert f"the baseline keeps the class (p = {p0:.2f} on the blurred image, " \
           f"{info.target_probability[0]:.2f} on the image)" in info.reasons[0]
    # the default climbs the ladder: no blur, not the mean colour, not grey: black removes the class
    _, auto = quiet(IGOS(Brightness()).attribute, x, iterations=2, ig_steps=3, return_info=True)
    assert auto.baseline_name == ["black image"] * 2 and auto.baseline_keeps_class == [False, False]
    assert max(auto.baseline_probability) < 0.1


def test_noise_that_destroys_the_class_is_reduced():
    x = torch.full((2, 1, 8, 8), 0.5)
    model = NoiseShy()
    _, info = quiet(IGOS(model).attribute, x, iterations=1, ig_steps=2, baselines="zero", return_info=True)
    default = 0.2 * 0.225  # the model has no norm_std
    # E[d] = 2 sigma^2. At 0.045: 2000 * 0.00405 = 8.1 -> logit -2.1, p = 0.11 (from 0.9975 on the
    # flat image, the path and the black baseline); at half: logit 6 - 2.0 = 4, p = 0.98
    assert info.noise_std == pytest.approx([default / 2] * 2, rel=1e-5)
    _, info_off = quiet(IGOS(model).attribute, x, iterations=1, ig_steps=2, baselines="zero", noise=0.0,
                        return_info=True)
    assert info_off.noise_std == [0.0, 0.0]


@pytest.mark.parametrize("cls,per_iter", [(IGOS, 1), (IGOSPlusPlus, 4)])
def test_pass_counts_and_shapes(cls, per_iter):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 10, 5))
    x = torch.rand(2, 3, 12, 10)
    expl = cls(model)
    heat = quiet(expl.attribute, x, iterations=3, ig_steps=4, mask_size=(3, 5))
    assert heat.shape == (2, 1, 12, 10)
    low = quiet(expl.attribute, x, iterations=3, ig_steps=4, mask_size=(3, 5), return_mask=True)
    assert low.shape == (2, 1, 3, 5)
    # 3 iterations x 4 IG points x per_iter terms x 2 images forward+backward passes
    assert expl.last_info.forward_backward_passes == 3 * 4 * per_iter * 2
    # at least: the image, its baseline, the image, the path midpoint and the baseline clean and with 4 noise
    # draws each, the objective at the start; the line search adds more
    assert expl.last_info.forward_passes >= 2 * (1 + 1 + 3 + 3 * 4) + 2 * per_iter


def test_training_mode_is_restored(tiny_cnn):
    tiny_cnn.train()
    quiet(IGOS(tiny_cnn).attribute, torch.rand(1, 1, 8, 8), iterations=1, ig_steps=2)
    assert tiny_cnn.training and tiny_cnn.bn.training


def test_bad_arguments_give_one_line_errors(tiny_cnn):
    with pytest.raises(TrustVisionError, match="baseline"):
        IGOS(tiny_cnn).attribute(torch.rand(1, 1, 8, 8), baselines="gray")
    with pytest.raises(TrustVisionError, match="shape"):
        IGOS(tiny_cnn).attribute(torch.rand(8, 8))
    with pytest.raises(TrustVisionError, match="target"):
        IGOS(tiny_cnn).attribute(torch.rand(2, 1, 8, 8), target=[0, 1, 2])


def test_defaults_scale_with_image_size():
    assert default_mask_size(224, 224) == (28, 28)
    assert default_mask_size(8, 8) == (8, 8)
    assert default_mask_size(32, 32) == (16, 16)
    assert blur_params(224, 224) == (51, 50.0)
    k, s = blur_params(8, 8)
    assert k == 3 and s == pytest.approx(50 * 8 / 224)
    const = torch.full((2, 3, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const), const)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1
    b = gaussian_blur(x)
    assert b.sum() == pytest.approx(1.0, abs=1e-5) and b.max() < 0.2
    t = torch.full((1, 1, 1, 1), 0.5)
    assert make_baseline(torch.rand(2, 1, 4, 4), t).shape == (2, 1, 4, 4)


def test_total_variation_by_hand():
    m = torch.ones(1, 1, 3, 3)
    m[0, 0, 1, 1] = 0
    # 6 vertical and 6 horizontal pairs, 2 of each touch the hole: 2/6 + 2/6
    assert float(total_variation(m)) == pytest.approx(4 / 6)


@pytest.mark.parametrize("cls", METHODS)
def test_l2_is_in_the_papers_units(cls, tiny_cnn, monkeypatch):
    """l2 is the TV weight at the paper's 28x28 mask: the weight applied is l2 * cells / 784 (so
    the paper's l2 = 20 is the default at every mask size, bit for bit)."""
    seen = []
    reg = cls._regulariser
    monkeypatch.setattr(cls, "_regulariser", lambda self, z, l1, l2, rd=None: (
        seen.append((tuple(z.shape), l2)), reg(self, z, l1, l2, rd))[-1])
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(iterations=2, ig_steps=3, seed=0)
    default = quiet(cls(tiny_cnn).attribute, x, **kw)
    paper = quiet(cls(tiny_cnn).attribute, x, l2=20, **kw)
    assert torch.equal(default, paper)
    quiet(cls(tiny_cnn).attribute, x, l2=5.0, mask_size=4, **kw)
    eight = [l2 for shape, l2 in seen if shape[-2:] == (8, 8)]
    four = [l2 for shape, l2 in seen if shape[-2:] == (4, 4)]
    assert eight and four and eight == pytest.approx([20 * 64 / 784] * len(eight))
    assert four == pytest.approx([5 * 16 / 784] * len(four))


@pytest.mark.parametrize("cls", METHODS)
def test_grouped_line_search_equals_sequential(cls, tiny_cnn):
    """The same heatmaps, bit for bit, whatever number of trials one call scores (the audit picks
    it from measured pass times, so a loaded machine or a Ray worker may pick another)."""
    calls = []
    hook = tiny_cnn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(iterations=4, ig_steps=3, seed=0)
    seq = quiet(cls(tiny_cnn, line_search_group=1).attribute, x, **kw)
    n_seq = len(calls)
    for group in (3, 4):
        calls.clear()
        grouped = quiet(cls(tiny_cnn, line_search_group=group).attribute, x, **kw)
        assert torch.equal(seq, grouped), group
        assert len(calls) <= n_seq
    hook.remove()


def test_auto_chunk_covers_every_row_once_in_order(monkeypatch):
    import trustvision._utils.images as images

    seen = []
    AutoChunk(fixed=4).run(10, lambda sl: seen.append((sl.start, sl.stop)))
    assert seen == [(0, 3), (3, 6), (6, 10)]  # at most 4 rows, in equal pieces
    chunk = AutoChunk(row_bytes=64 << 10, grad=False)  # 256 KiB / 64 KiB: probes start at 4 rows
    assert chunk.size == 4
    clock = [0.0]  # a fake clock: every row costs 2 ms whatever the chunk size
    monkeypatch.setattr(images.time, "perf_counter", lambda: clock[0])

    def work(sl):
        seen.append((sl.start, sl.stop))
        clock[0] += 0.002 * (sl.stop - sl.start)

    for total in (3, 50, 7, 100):
        seen = []
        chunk.run(total, work)
        assert seen[0][0] == 0 and seen[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))  # contiguous, in order
    # every size probed 3 times; 8 and 16 rows were not 10% faster per row than 4, so probing
    # stopped at 16; each probed once more, all three are as fast: the largest is kept (fewer calls)
    assert sorted(chunk._tries.items()) == [(4, 4), (8, 4), (16, 4)]
    assert chunk.chunk_size() == 16
    seen = []
    chunk.run(100, work)
    widths = [b - a for a, b in seen]
    assert sum(widths) == 100 and max(widths) <= 16 and min(widths) == 14  # 7 equal pieces


def test_auto_chunk_sees_past_a_slow_first_call_and_a_plateau(monkeypatch):
    """The first call at a new batch shape is slow (kernels are made for it) and the time per
    row holds still from 1 to 4 rows and falls again at 8 (a CPU ResNet-18): AutoChunk keeps each
    size's fastest of its probes and doubles past one flat size, so it picks 8 rows."""
    import trustvision._utils.images as images

    clock, shapes = [0.0], set()
    per_row = {1: 0.065, 2: 0.057, 4: 0.056, 8: 0.050, 16: 0.058, 32: 0.060}  # (16, 32: > 10% slower than 8)
    monkeypatch.setattr(images.time, "perf_counter", lambda: clock[0])

    def work(sl):
        rows = sl.stop - sl.start
        clock[0] += per_row.get(rows, 0.06) * rows + (0.0 if rows in shapes else 0.5)  # (a new shape: +0.5 s)
        shapes.add(rows)

    chunk = AutoChunk(row_bytes=150528 * 4)  # a 224 px RGB row: probes start at 1 row
    assert chunk.size == 1
    while chunk.chunk_size() is None:
        chunk.run(40, work)
    assert chunk.chunk_size() == 8
    seen = []
    chunk.run(20, lambda sl: seen.append(sl.stop - sl.start))
    assert seen == [6, 7, 7]  # at most 8 rows, in equal pieces


def test_auto_chunk_is_not_fooled_by_a_slow_start(monkeypatch):
    """A run's first passes are slower than its later ones (memory being mapped, cold caches),
    and the small sizes are probed first: their probes read slow, the larger ones look faster
    and doubling goes on. Every size is probed once more before the choice, so the size that is
    fastest once the run is warm (8 rows; 32 is 9% slower: the old rule, the largest within 10%,
    kept 128) is kept."""
    import trustvision._utils.images as images

    clock = [0.0]
    steady = {1: 0.094, 2: 0.082, 4: 0.0745, 8: 0.0707, 16: 0.074, 32: 0.077, 64: 0.080}
    monkeypatch.setattr(images.time, "perf_counter", lambda: clock[0])

    def work(sl):
        cold = 1 + 0.8 * max(0.0, 1 - clock[0] / 20)  # the first 20 s: up to 1.8x slower
        clock[0] += steady.get(sl.stop - sl.start, 0.08) * (sl.stop - sl.start) * cold

    chunk = AutoChunk(row_bytes=150528 * 4)
    while chunk.chunk_size() is None:
        chunk.run(160, work)
    assert max(chunk._tries) >= 32  # (the slow start carried doubling past the best size)
    assert chunk.chunk_size() == 8


def test_eval_mode_restores_every_flag_and_leaves_an_eval_model_alone():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    net[1].train(False)  # mixed flags: each comes back as it was
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before
    calls = []
    net.eval()
    net.train = lambda mode=True: calls.append(mode)  # an eval model: nothing is set or restored
    with eval_mode(net):
        pass
    assert calls == [] and not any(m.training for m in net.modules())


def test_auto_chunk_respects_the_memory_budget(monkeypatch):
    import trustvision._utils.images as images

    monkeypatch.setattr(images, "_memory_budget", lambda device: 4 << 20)
    chunk = AutoChunk(row_bytes=64 << 10, grad=True)  # 4 MiB holds 16 rows of 4 x 64 KiB
    x = torch.ones(200, 1, requires_grad=True)
    sizes = []

    def work(sl):
        sizes.append(sl.stop - sl.start)
        (x[sl] ** 2).sum().backward()

    for _ in range(3):
        chunk.run(200, work)
    assert chunk.max_rows is not None and 8 <= chunk.max_rows <= 16
    assert chunk.chunk_size() is not None and max(sizes) <= chunk.max_rows


@pytest.mark.parametrize("cls", METHODS)
def test_written_out_penalty_gradient_equals_autograd(cls):
    """The area + (bilateral) TV gradients written out for the line search equal autograd's, and
    the penalties computed with them equal the regulariser, per image and with a per-image area
    weight (masks at the image's resolution: no upsampling)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(3, 3, 6, 7, generator=gen)
    z = torch.rand(3, cls.n_masks, 6, 7, generator=gen)
    l1 = torch.tensor([1.0, 0.25, 0.0625])
    expl = cls(nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 7, 2)))
    expl._ctx = dict(images=x, size=(6, 7))
    by_autograd = expl._regulariser_grad(z, l1, 0.7)
    value, grad = expl._penalties(z, l1, 0.7)  # value and gradient from the same differences
    torch.testing.assert_close(grad, by_autograd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(value, expl._regulariser(z, l1, 0.7), atol=1e-6, rtol=1e-5)
    assert float(grad.abs().amax()) > 0.01 and float(value.abs().amin()) > 0.01  # not trivially zero


@pytest.mark.parametrize("cls", METHODS)
def test_noise_drawn_per_pass_equals_the_iteration_table(cls, tiny_cnn, monkeypatch):
    """Images whose iteration noise is too large to keep draw it per pass and per image
    (``_stream_noise``, and their direction rows are gathered per pass): the same heatmaps, bit
    for bit, as with the table drawn once per iteration."""
    import trustvision.explain.igos as igos

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(iterations=3, ig_steps=4, seed=1)
    table = quiet(cls(tiny_cnn).attribute, x, **kw)
    monkeypatch.setattr(igos, "NOISE_TABLE_BYTES", 0)
    streamed = quiet(cls(tiny_cnn).attribute, x, **kw)
    assert torch.equal(table, streamed)
    assert float(table.amax()) > 0.01
    # a pass cut into chunks of 2 rows draws each image's noise once, not once per chunk
    draws, draw = [], cls._draw_noise
    monkeypatch.setattr(cls, "_draw_noise", lambda self, i, it, out=None: draws.append((it, i)) or draw(self, i, it, out))
    passes = []
    rows = cls._rows
    monkeypatch.setattr(cls, "_rows", lambda self, plan, masks, it, grad: (
        passes.append(it) if it is not None and plan.nidx is not None else None) or rows(self, plan, masks, it, grad))
    chunked = quiet(cls(tiny_cnn).attribute, x, internal_batch_size=2, **kw)
    assert torch.allclose(table, chunked, atol=1e-5)  # (chunking: float rounding)
    assert len(passes) >= kw["iterations"]
    assert len(draws) <= 3 * len(passes)  # 3 images, each drawn once per noisy pass
