"""Safe checkpoint I/O: round trips, the zoo, and one-line errors for every bad input."""

import json
import os
import pickle

import pytest
import torch

from trustvision import TrustVisionError, models
from trustvision.models import checkpoint

ARCHS = [
    ("small-cnn", {"dropout": 0.1}),
    ("resnet20", {}),
    ("ensemble", {"n": 2, "member": "resnet20"}),
    ("torchvision:shufflenet_v2_x0_5", {}),
]


def _one_line_error(fn, match):
    with pytest.raises(TrustVisionError, match=match) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _train_a_little(m, chans, size):
    """Touch BatchNorm running stats so that the round trip covers buffers too."""
    m.train()
    with torch.no_grad():
        m(torch.rand(4, chans, size, size))
    return m.eval()


@pytest.mark.parametrize("name,kw", ARCHS, ids=[a[0] for a in ARCHS])
def test_round_trip_is_exact(tmp_path, name, kw):
    torch.manual_seed(0)
    m = _train_a_little(models.create(name, num_classes=3, in_chans=2, image_size=8,
                                      mean=[0.1, 0.2], std=[0.3, 0.4], **kw), 2, 8)
    out = models.save(m, tmp_path / "ck", classes=["a", "b", "c"], dataset="toy",
                      metrics={"test_accuracy": 0.5}, note="hello")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "trustvision-checkpoint" and cfg["format_version"] == 1
    assert cfg["architecture"] == name and cfg["num_classes"] == 3 and cfg["in_chans"] == 2
    assert cfg["image_size"] == [8, 8] and cfg["classes"] == ["a", "b", "c"]
    assert cfg["normalization"]["mean"] == pytest.approx([0.1, 0.2])
    assert cfg["normalization"]["std"] == pytest.approx([0.3, 0.4])
    assert cfg["dataset"] == "toy" and cfg["metrics"] == {"test_accuracy": 0.5}
    assert cfg["note"] == "hello" and "trustvision_version" in cfg
    x = torch.rand(4, 2, 8, 8)
    for src in (out, out / "model.safetensors", str(out)):
        m2 = models.load(src)
        assert not m2.training and type(m2) is type(m)
        assert torch.equal(m2(x), m(x))
        assert torch.equal(m2.features(x), m.features(x))
        assert m2.classes == ["a", "b", "c"] and m2.tv_config["dataset"] == "toy"
    # re-saving a loaded model keeps its metadata
    again = models.save(models.load(out), tmp_path / "ck2")
    cfg2 = json.loads((again / "config.json").read_text())
    assert cfg2["classes"] == ["a", "b", "c"] and cfg2["metrics"] == {"test_accuracy": 0.5}


def test_foreign_state_dict(tmp_path):
    torch.manual_seed(0)
    m = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8).eval()
    torch.save(m.state_dict(), tmp_path / "w.pth")
    m2 = models.load(tmp_path / "w.pth", architecture="small-cnn", num_classes=3, in_chans=1,
                     image_size=8)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(m2(x), m(x))
    # {"state_dict": ...} wrappers and a bare torchvision state dict for the wrapped model
    import torchvision

    tv = torchvision.models.resnet18(num_classes=4).eval()
    torch.save({"state_dict": tv.state_dict()}, tmp_path / "tv.pt")
    m3 = models.load(tmp_path / "tv.pt", architecture="torchvision:resnet18", num_classes=4,
                     in_chans=3, image_size=32)
    xi = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m3(xi), tv(m3.normalize(xi)), atol=1e-5)
    _one_line_error(lambda: models.load(tmp_path / "w.pth"), "lacks architecture")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        # Unpickling would create a file: proof of code execution.
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"weight": _Evil(str(marker))}, f)
    assert not marker.exists()
    msg = _one_line_error(
        lambda: models.load(evil, architecture="small-cnn", num_classes=3, in_chans=1,
                            image_size=8),
        "refusing to load",
    )
    assert not marker.exists()
    assert "torch.save(model.state_dict()" in msg
    # the same through torch.save's zip format
    torch.save({"weight": _Evil(str(marker))}, tmp_path / "evil2.pth")
    _one_line_error(lambda: models.load(tmp_path / "evil2.pth", architecture="small-cnn",
                                        num_classes=3, in_chans=1, image_size=8),
                    "refusing to load")
    assert not marker.exists()


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    m = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8)
    return models.save(m, tmp_path / "ck")


def test_missing_path(tmp_path):
    _one_line_error(lambda: models.load(tmp_path / "nope"), "checkpoint not found.*trustvision zoo")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: models.load(tmp_path / "empty"), "has no model.safetensors")


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    _one_line_error(lambda: models.load(ckpt), "corrupt or not a safetensors file")


def test_corrupt_or_missing_config(ckpt):
    good = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text("{not json")
    _one_line_error(lambda: models.load(ckpt), "not valid JSON.*re-save")
    (ckpt / "config.json").write_text("[1, 2]")
    _one_line_error(lambda: models.load(ckpt), "JSON object")
    cfg = json.loads(good)
    del cfg["num_classes"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _one_line_error(lambda: models.load(ckpt), "lacks num_classes")
    (ckpt / "config.json").unlink()
    _one_line_error(lambda: models.load(ckpt), "config.json is missing")
    # the build arguments can stand in for a missing config.json
    m = models.load(ckpt, architecture="small-cnn", num_classes=3, in_chans=1, image_size=8)
    assert m.num_classes == 3


def test_unknown_architecture_and_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architecture": "small-cnm"}))
    _one_line_error(lambda: models.load(ckpt), "unknown model 'small-cnm'.*did you mean")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_classes": 5}))
    msg = _one_line_error(lambda: models.load(ckpt), "do not fit 'small-cnn'.*wrong shape")
    assert "fc.weight" in msg and "(3, 128)" in msg
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architecture": "resnet20"}))
    _one_line_error(lambda: models.load(ckpt), "missing.*unexpected")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    _one_line_error(lambda: models.load(ckpt), "format 'other'")


def test_save_errors(tmp_path):
    from trustvision.models.feedforward import SmallCNN

    _one_line_error(lambda: models.save(SmallCNN(3, 1, 8), tmp_path / "x"), "models.create")
    m = models.create("small-cnn", 3, 1, 8)
    _one_line_error(lambda: models.save(m, tmp_path / "x", classes=["a"]), "one name per class")


def test_zoo(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    models.save(m, tmp_path / "small-cnn-digits", dataset="digits",
                metrics={"test_accuracy": 0.97})
    (tmp_path / "junk").mkdir()  # folders without config.json are ignored
    entries = models.list_zoo(tmp_path)
    assert [e["name"] for e in entries] == ["zoo:small-cnn-digits"]
    e = entries[0]
    assert e["architecture"] == "small-cnn" and e["dataset"] == "digits"
    assert e["metrics"]["test_accuracy"] == 0.97 and e["size_bytes"] > 100_000
    monkeypatch.setenv("TRUSTVISION_ZOO", str(tmp_path))
    assert models.list_zoo() == entries
    z = models.load("zoo:small-cnn-digits")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(z(x), m(x))
    _one_line_error(lambda: models.load("zoo:small-cnn-digit"),
                    "unknown zoo model.*did you mean 'zoo:small-cnn-digits'.*`trustvision zoo`")
    _one_line_error(lambda: models.load("zoo:"), "trustvision zoo")


def test_zoo_cli(tmp_path, monkeypatch, capsys):
    from trustvision.cli import main

    monkeypatch.setenv("TRUSTVISION_ZOO", str(tmp_path))
    assert main(["zoo"]) == 0
    assert "no zoo models" in capsys.readouterr().out
    models.save(models.create("small-cnn", 10, 1, 8), tmp_path / "small-cnn-digits",
                dataset="digits", metrics={"test_accuracy": 0.975})
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "zoo:small-cnn-digits" in out and "97.5%" in out and "digits" in out and "MB" in out
    models.save(models.create("small-cnn", 10, 1, 8), tmp_path / "small-cnn-shortcut-digits",
                dataset="shortcut-digits", metrics={"test_accuracy": 0.118, "test_accuracy_marked": 1.0})
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "zoo:small-cnn-shortcut-digits" in out and "11.8% clean, 100.0% marked" in out
    assert main(["zoo", "--models"]) == 0
    out = capsys.readouterr().out.split()
    assert "small-cnn" in out and "resnet20" in out and "torchvision:NAME" in out


def test_shipped_zoo_loads():
    """Whatever the package ships (built by scripts/build_zoo.py) must load and match its config."""
    for e in checkpoint.list_zoo(checkpoint.zoo_dir(os.path.join(os.path.dirname(
            checkpoint.__file__), "..", "zoo"))):
        m = models.load(e["path"])
        h, w = m.image_size
        assert m(torch.rand(2, m.in_chans, h, w)).shape == (2, e["num_classes"])
