"""imagefolder:PATH with the evaluation transforms users know (issue 16): ``crop`` (timm's
crop_pct) equals torchvision's Resize(int(size / crop)) + CenterCrop(size) exactly; the command line
takes ``--image-size`` / ``--crop`` and defaults the size and channels to the model's; a dataset
that is not an image folder refuses them in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trustvision import data
from trustvision.cli import main
from trustvision.errors import TrustVisionError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i, (h, w) in enumerate([(300, 400), (400, 300), (256, 256), (231, 517)] * 2):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("size,crop", [(224, 0.875), (64, 0.5), (100, 1.0)])
def test_crop_is_torchvision_resize_and_center_crop(photos, size, crop):
    tv = pytest.importorskip("torchvision.transforms")
    ds = data.load(f"imagefolder:{photos}", split="train", image_size=size, crop=crop)
    ref = tv.Compose([tv.Resize(int(size / crop)), tv.CenterCrop(size), tv.ToTensor()])
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, size, size)
        want = ref(Image.open(ds.files[i]).convert("RGB"))
        assert float((x - want).abs().max()) <= 1 / 255 + 1e-6, ds.files[i]


def test_bad_crop_is_one_line(photos):
    for bad in (0, 1.5, "0.8", True):
        with pytest.raises(TrustVisionError, match="crop must be a fraction") as e:
            data.load(f"imagefolder:{photos}", split="train", image_size=32, crop=bad)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def big_digits(tmp_path_factory):
    """Digits upscaled to 32 x 32 RGB PNGs in class folders 0..9 (train and test)."""
    root = tmp_path_factory.mktemp("big-digits")
    for split, n in (("train", 200), ("test", 100)):
        x, y = data.load("digits", split=split).tensors()
        for i in range(n):
            d = root / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L")
            img.resize((32, 32), Image.NEAREST).convert("RGB").save(d / f"{i:04d}.png")
    return root


def test_audit_defaults_to_the_models_size_and_channels(tmp_path, big_digits):
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", f"imagefolder:{big_digits}", "--checks",
               "accuracy", "--out", str(tmp_path / "a"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["datasets"][0]["image_size"] == [8, 8] and res["datasets"][0]["num_channels"] == 1
    acc = res["models"][0]["metrics"]["Accuracy"]
    assert acc > 0.85, acc  # 32 px nearest-upscaled digits, resized back to 8 px: the model still reads them


def test_image_size_on_another_dataset_is_one_line(tmp_path, capsys):
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--image-size", "32",
               "--checks", "accuracy", "--out", str(tmp_path / "b")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-size and --crop apply to imagefolder:PATH" in err[0]


def test_explain_takes_image_size_and_crop(tmp_path, big_digits):
    rc = main(["explain", "--model", "zoo:small-cnn-digits", "--data", f"imagefolder:{big_digits}", "--method",
               "saliency", "--n", "2", "--image-size", "8", "--crop", "1.0", "--out", str(tmp_path / "e"),
               "--no-progress"])
    assert rc == 0
    heat = np.load(tmp_path / "e" / "heatmaps.npy")
    assert heat.shape[-2:] == (8, 8)
    assert torch.isfinite(torch.from_numpy(heat)).all()
