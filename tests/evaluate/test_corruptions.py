"""Common corruptions (trustvision.evaluate.corruptions): the distance to the clean image grows
with severity, outputs stay in [0, 1] with the input's shape and dtype, the randomness is seeded per
image (same seed -> same images, whatever the batch), the parameter tables, known answers for the
deterministic types, one-line errors, and corruption_accuracy on a constant model."""

import pytest
import torch
import torch.nn.functional as F

from trustvision.errors import TrustVisionError
from trustvision.evaluate.calibration import expected_calibration_error
from trustvision.evaluate.corruptions import (
    CATEGORIES,
    corrupt,
    corruption_accuracy,
    corruption_params,
    list_corruptions,
)

ALL = list_corruptions()
RANDOM = ["gaussian-noise", "shot-noise", "impulse-noise", "glass-blur", "motion-blur", "snow", "frost", "fog",
          "elastic-transform"]
# With the published parameters six types are not monotone in pixel distance (see the module
# docstring); the default "monotone" set replaces their rows.
NOT_MONOTONE_PUBLISHED = {"glass-blur", "elastic-transform", "pixelate", "frost", "snow", "fog"}


def smooth_batch(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    """Photo-like test images: a smooth random field plus a sharp-edged rectangle."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, c, 5, 5, generator=g), size=(s, s), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    rects = []
    for _ in range(n):
        a, b, r = torch.rand(3, generator=g)
        rects.append((((xx - a).abs() < 0.15 + 0.2 * r) & ((yy - b).abs() < 0.2)).float())
    return (0.6 * low + 0.4 * torch.stack(rects)[:, None]).clamp(0, 1)


@pytest.fixture(scope="module")
def batches():
    return {8: smooth_batch(32, 1, 8), 32: smooth_batch(32, 3, 32)}


def distances(x, name, parameters="monotone"):
    return [float((corrupt(x, name, s, seed=3, parameters=parameters) - x).abs().mean()) for s in range(1, 6)]


def test_the_fifteen_types():
    assert len(ALL) == 15 and sorted(ALL) == sorted(n for names in CATEGORIES.values() for n in names)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("name", ALL)
def test_distance_grows_with_severity(batches, name, size):
    d = distances(batches[size], name)
    assert min(d) > 0.001, d
    assert all(b > a for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", ALL)
def test_distance_grows_with_severity_at_224_px(name):
    x = smooth_batch(3, 3, 224)
    d = distances(x, name)
    assert all(b > a for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", ALL)
def test_distance_grows_with_severity_on_real_images(name):
    """The embedded textures (32 px photographs of texture) and faces (25 px), not only the
    synthetic batch."""
    from trustvision import data

    for ds in ("textures", "faces"):
        x = data.load(ds, split="test").tensors()[0][:24]
        d = distances(x, name)
        assert all(b > a for a, b in zip(d, d[1:])), (ds, d)


@pytest.mark.parametrize("name", sorted(NOT_MONOTONE_PUBLISHED))
def test_published_parameters_are_the_papers_tables_and_why_the_default_differs(batches, name):
    from trustvision.evaluate.corruptions import _TABLES

    cifar, imagenet, geometric = _TABLES[name]

    def row(r, scale):
        r = r if isinstance(r, tuple) else (r,)
        return tuple(float(v) * (scale if i in geometric else 1) for i, v in enumerate(r))

    for s in range(1, 6):  # below 32 px CIFAR's pixel values are kept; at 224 px ImageNet-C's
        assert corruption_params(name, s, 8, "published") == pytest.approx(row(cifar[s - 1], 1))
        assert corruption_params(name, s, 224, "published") == pytest.approx(row(imagenet[s - 1], 1))
    assert any(corruption_params(name, s, size) != corruption_params(name, s, size, "published")
               for s in range(1, 6) for size in (8, 224))  # the default set replaces some row
    # with the published rows some severity step does not move further from the clean image
    steps = [distances(batches[size], name, "published") for size in (8, 32)]
    steps.append(distances(smooth_batch(3, 3, 224), name, "published"))
    assert any(any(b <= a for a, b in zip(d, d[1:])) for d in steps), steps


def test_monotone_keeps_the_published_rows_of_the_other_nine():
    for name in set(ALL) - NOT_MONOTONE_PUBLISHED:
        for size in (8, 32, 100, 224):
            for s in range(1, 6):
                assert corruption_params(name, s, size) == corruption_params(name, s, size, "published")
    with pytest.raises(TrustVisionError, match="monotone, published"):
        corrupt(torch.rand(1, 1, 8, 8), "fog", 1, parameters="papers")


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 8), (1, 32), (3, 32)])
def test_range_shape_dtype(channels, size):
    x = smooth_batch(3, channels, size, seed=1)
    for name in ALL:
        for s in (1, 5):
            out = corrupt(x, name, s)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    x64 = x.double()
    out = corrupt(x64, "fog", 2)
    assert out.dtype == torch.float64 and out.shape == x.shape
    single = corrupt(x[0], "snow", 3)
    assert single.shape == x[0].shape and torch.equal(single, corrupt(x[:1], "snow", 3)[0])


@pytest.mark.parametrize("name", RANDOM)
def test_seeded_per_image_and_batch_independent(batches, name):
    x = batches[32][:5]
    a, b = corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(x, name, 3, seed=8))
    # an image's result does not depend on the rest of the batch
    alone = torch.cat([corrupt(x[i:i + 1], name, 3, seed=7) for i in range(5)])
    torch.testing.assert_close(alone, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(corrupt(x.flip(0), name, 3, seed=7), a.flip(0), atol=1e-5, rtol=0)
    # with dataset indices the key is the index, not the content
    by_index = corrupt(x, name, 3, seed=7, indices=[10, 11, 12, 13, 14])
    torch.testing.assert_close(corrupt(x[2:4], name, 3, seed=7, indices=[12, 13]), by_index[2:4], atol=1e-5, rtol=0)


def test_parameter_tables():
    assert corruption_params("gaussian-noise", 3, 32) == pytest.approx((.08,))
    assert corruption_params("gaussian-noise", 3, 224) == pytest.approx((.18,))
    assert corruption_params("gaussian-noise", 3, 96) == pytest.approx((.13,))  # halfway between 64 and 128
    assert corruption_params("shot-noise", 1, 96) == pytest.approx(((500 * 60) ** 0.5,))  # geometric
    assert corruption_params("jpeg-compression", 5, 8) == (40.0,)
    assert corruption_params("jpeg-compression", 1, 500) == (25.0,)
    # geometric parameters scale with the image (not below 32 px)
    assert corruption_params("defocus-blur", 5, 64) == pytest.approx((3.0, .2))
    assert corruption_params("defocus-blur", 5, 8) == pytest.approx((1.5, .1))
    assert corruption_params("defocus-blur", 5, 448) == pytest.approx((20.0, 1.0))
    assert corruption_params("glass-blur", 4, 224, "published") == pytest.approx((1.1, 3, 2))
    assert corruption_params("glass-blur", 4, 448, "published") == pytest.approx((2.2, 6, 2))
    # the monotone glass blur scales its blur, not its displacement (pixels)
    assert corruption_params("glass-blur", 4, 448) == pytest.approx((2.2, 3, 4))
    # integers interpolated between the tables round half up: iterations (3 + 4) / 2 at 96 px -> 4
    assert corruption_params("glass-blur", 4, 96)[2] == 4.0 and corruption_params("glass-blur", 4, 96)[1] == 2.5


def test_known_answers():
    gray = torch.full((2, 3, 16, 16), 0.5)
    torch.testing.assert_close(corrupt(gray, "brightness", 2), torch.full_like(gray, 0.6))
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    out = corrupt(rgb, "brightness", 5)  # HSV value + 0.3: hue and saturation kept, so RGB scales with V
    v, v2 = rgb.amax(1, keepdim=True), out.amax(1, keepdim=True)
    torch.testing.assert_close(v2, v + 0.3)
    torch.testing.assert_close(out, rgb * v2 / v)
    c = corrupt(rgb, "contrast", 2)  # (x - mean) * 0.5 + mean
    m = rgb.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(c, (rgb - m) * 0.5 + m)
    noise = corrupt(torch.full((8, 1, 32, 32), 0.5), "gaussian-noise", 1) - 0.5
    assert float(noise.std()) == pytest.approx(0.04, rel=0.05) and abs(float(noise.mean())) < 0.003
    imp = corrupt(torch.full((8, 3, 32, 32), 0.5), "impulse-noise", 5)
    assert float((imp != 0.5).double().mean()) == pytest.approx(0.07, abs=0.01)
    px = corrupt(smooth_batch(2, 3, 32), "pixelate", 5)  # 20 x 20 blocks upsampled: at most 20 distinct rows
    assert len(torch.unique(px[0, 0], dim=0)) <= 20


@pytest.mark.parametrize("name", ["defocus-blur", "glass-blur", "motion-blur", "zoom-blur", "elastic-transform",
                                  "pixelate"])
def test_geometric_types_keep_a_constant_image(name):
    x = torch.full((3, 3, 40, 40), 0.37)
    for s in (1, 5):
        torch.testing.assert_close(corrupt(x, name, s), x, atol=1e-5, rtol=0)


def test_shot_noise_is_poisson():
    out = corrupt(torch.full((16, 1, 32, 32), 0.5), "shot-noise", 1)  # Poisson(0.5 * 500) / 500
    assert float(out.mean()) == pytest.approx(0.5, abs=0.002)
    assert float(out.var()) == pytest.approx(0.5 / 500, rel=0.05)


@pytest.mark.parametrize("size", [8, 32, 100])
def test_pixelate_is_pil_box(size):
    import numpy as np
    from PIL import Image

    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 255).round() / 255
    for s in range(1, 6):
        c = corruption_params("pixelate", s, size, "published")[0]
        a = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        k = int(size * c)
        ref = np.asarray(a.resize((k, k), Image.BOX).resize((size, size), Image.BOX), dtype=np.float32) / 255
        out = corrupt(x, "pixelate", s, parameters="published")[0].permute(1, 2, 0).numpy()
        assert np.abs(out - ref).max() <= 1 / 255 + 1e-6  # PIL rounds to uint8


@pytest.mark.parametrize("bad", [0, 6, 2.5, True, "3"])
def test_bad_severity_is_a_one_line_error(bad):
    with pytest.raises(TrustVisionError, match="severity must be an integer 1..5") as e:
        corrupt(torch.rand(1, 1, 8, 8), "fog", bad)
    assert "\n" not in str(e.value)


def test_unknown_name_and_bad_images_are_one_line_errors():
    with pytest.raises(TrustVisionError, match="did you mean 'fog'") as e:
        corrupt(torch.rand(1, 1, 8, 8), "fogg", 1)
    assert "\n" not in str(e.value)
    with pytest.raises(TrustVisionError, match="C = 1 or 3"):
        corrupt(torch.rand(1, 2, 8, 8), "fog", 1)
    with pytest.raises(TrustVisionError, match="float tensor"):
        corrupt(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "fog", 1)
    with pytest.raises(TrustVisionError, match="unknown corruption"):
        corruption_accuracy(torch.nn.Identity(), (torch.rand(2, 1, 8, 8), torch.zeros(2)), corruptions=["nope"])


class Constant(torch.nn.Module):
    """Always predicts class 0 with probability softmax([2, 0, 0])."""

    def forward(self, x):
        return torch.tensor([2.0, 0.0, 0.0]).expand(x.shape[0], 3)


def test_corruption_accuracy_on_a_constant_model():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 3, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    res = corruption_accuracy(Constant(), (x, y), severities=(1, 3), batch_size=7)
    frac0 = float((y == 0).double().mean())
    assert res.corruptions == ALL and res.severities == [1, 3] and res.n == 20
    assert all(v == pytest.approx(frac0) for row in res.accuracy.values() for v in row)
    assert res.mean_accuracy == pytest.approx(frac0) and res.clean_accuracy == pytest.approx(frac0)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]).double(), 0).expand(20, 3)
    ece = expected_calibration_error(p, y)
    assert res.ece == pytest.approx([ece, ece]) and res.clean_ece == pytest.approx(ece)
    assert res.confidence == pytest.approx([float(p[0, 0])] * 2)
    d = res.to_json()
    assert d["accuracy_by_severity"] == pytest.approx([frac0, frac0]) and d["mean_ece"] == pytest.approx(ece)


def test_corruption_accuracy_is_seeded_and_batch_size_free(splits_factory, tiny_model):
    ds = splits_factory(n=24)["test"]
    net = tiny_model
    kw = dict(severities=(2, 5), corruptions=["gaussian-noise", "glass-blur"], seed=1)
    a = corruption_accuracy(net, ds, batch_size=5, **kw)
    b = corruption_accuracy(net, ds, batch_size=24, **kw)
    assert a.accuracy == b.accuracy and a.ece == pytest.approx(b.ece)
    assert a.accuracy["gaussian-noise"][1] <= a.clean_accuracy
