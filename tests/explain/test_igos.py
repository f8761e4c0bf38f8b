"""I-GOS / iGOS++: known optima on a one-pixel model, batched == one at a time, shapes, flags."""

import math

import pytest
import torch

from trustvision.errors import TrustVisionError
from trustvision.explain import IGOS, ExplanationWarning, IGOSPlusPlus
from trustvision._utils.images import blur_params, default_mask_size, gaussian_blur, make_baseline
from trustvision.explain.igos import total_variation

METHODS = [IGOS, IGOSPlusPlus]


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


@pytest.mark.parametrize("cls", METHODS)
def test_heatmap_peaks_on_the_only_pixel_that_matters(cls, one_pixel):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    heat = cls(one_pixel).attribute(x, baselines="zero", iterations=10)
    flat = heat.flatten(1)
    assert (flat.argmax(1) == 3 * 8 + 5).all()
    assert (flat[:, 3 * 8 + 5] > 0.5).all()
    assert (heat >= 0).all() and (heat <= 1).all()


@pytest.mark.parametrize("cls", METHODS)
def test_batched_equals_one_at_a_time(cls, tiny_cnn):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(iterations=4, ig_steps=5, noise=0.0, baselines="blur")
    batched = cls(tiny_cnn).attribute(x, **kw)
    assert float(batched.amax()) > 0.01  # the masks really moved
    single = torch.cat([cls(tiny_cnn).attribute(x[i : i + 1], **kw) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    chunked = cls(tiny_cnn).attribute(x, internal_batch_size=3, **kw)
    torch.testing.assert_close(batched, chunked, atol=1e-4, rtol=0)
    assert tiny_cnn.training is False


@pytest.mark.parametrize("cls,per_iter", [(IGOS, 1), (IGOSPlusPlus, 4)])
def test_pass_counts_and_shapes(cls, per_iter, tiny_cnn):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 10, 5))
    x = torch.rand(2, 3, 12, 10)
    expl = cls(model)
    heat = expl.attribute(x, iterations=3, ig_steps=4, mask_size=(3, 5))
    assert heat.shape == (2, 1, 12, 10)
    low = expl.attribute(x, iterations=3, ig_steps=4, mask_size=(3, 5), return_mask=True)
    assert low.shape == (2, 1, 3, 5)
    # 3 iterations x 4 IG points x per_iter terms x 2 images forward+backward passes
    assert expl.last_info.forward_backward_passes == 3 * 4 * per_iter * 2
    assert expl.last_info.forward_passes >= (1 + 3) * per_iter * 2


def test_training_mode_is_restored(tiny_cnn):
    tiny_cnn.train()
    IGOS(tiny_cnn).attribute(torch.rand(1, 1, 8, 8), iterations=1, ig_steps=2)
    assert tiny_cnn.training and tiny_cnn.bn.training


def test_flags_low_confidence_and_not_predicted(one_pixel):
    x = torch.ones(2, 1, 8, 8)
    with pytest.warns(ExplanationWarning, match="1 of 2 images"):
        _, info = IGOS(one_pixel).attribute(
            x, target=[0, 1], iterations=1, ig_steps=2, return_info=True
        )
    assert info.predicted == [0, 0]
    assert info.not_predicted == [False, True]
    assert info.low_confidence == [False, True]
    assert info.unreliable == [False, True]
    assert info.target_probability[0] == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-5)
    assert set(info.to_json()) >= {"unreliable", "target", "final_loss"}


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
def test_grouped_line_search_equals_sequential(cls, tiny_cnn):
    calls = []
    hook = tiny_cnn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(iterations=4, ig_steps=3, seed=0)
    seq = cls(tiny_cnn, line_search_group=1).attribute(x, **kw)
    n_seq = len(calls)
    calls.clear()
    grouped = cls(tiny_cnn, line_search_group=4).attribute(x, **kw)
    hook.remove()
    torch.testing.assert_close(seq, grouped, atol=1e-4, rtol=0)
    assert len(calls) <= n_seq
