"""Issue #9 (models): every bad config.json, build argument, model keyword, zoo name and broken
weight file is one line naming the problem, before anything is built, downloaded or opened."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from trustvision import TrustVisionError, models


def _one_line(fn, *words):
    with pytest.raises(TrustVisionError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8, widths=(4, 8))
    return models.save(net, tmp_path / "ck", classes=["a", "b", "c"], dataset="toy")


def _write(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


_DROP = object()

# key -> bad value -> words the one-line error must hold
CONFIG_MUTATIONS = [
    ("format_version", "abc", ["'format_version'", "whole number"]),
    ("format_version", 0, ["'format_version'"]),
    ("format", 3, ["'format'", "a string"]),
    ("architecture", 7, ["'architecture'", "string"]),
    ("architecture", "", ["'architecture'"]),
    ("architecture", ["small-cnn"], ["'architecture'"]),
    ("num_classes", -3, ["'num_classes'", "1 to 100000"]),
    ("num_classes", 0, ["'num_classes'"]),
    ("num_classes", 1e9, ["'num_classes'", "1 to 100000"]),
    ("num_classes", 10**9, ["'num_classes'", "1 to 100000"]),
    ("num_classes", 10.7, ["'num_classes'", "whole number"]),
    ("num_classes", 3.0, ["'num_classes'", "whole number"]),
    ("num_classes", "3", ["'num_classes'"]),
    ("num_classes", True, ["'num_classes'"]),
    ("num_classes", None, ["'num_classes'"]),
    ("in_chans", 0, ["'in_chans'", "1 to 64"]),
    ("in_chans", 65, ["'in_chans'", "1 to 64"]),
    ("in_chans", "1", ["'in_chans'"]),
    ("image_size", "8", ["'image_size'", "[height, width]"]),
    ("image_size", [8], ["'image_size'"]),
    ("image_size", [8, 8, 8], ["'image_size'"]),
    ("image_size", [8, 0], ["'image_size'"]),
    ("image_size", [8, 9000], ["'image_size'", "8192"]),
    ("image_size", -8, ["'image_size'"]),
    ("image_size", {"h": 8}, ["'image_size'"]),
    ("kwargs", [1, 2], ["'kwargs'", "JSON object"]),
    ("kwargs", "dropout=0.1", ["'kwargs'"]),
    ("classes", 5, ["'classes'", "list of class names"]),
    ("classes", "abc", ["'classes'"]),
    ("classes", [1, 2, 3], ["'classes'"]),
    ("classes", ["a", "b"], ["'classes' has 2 names", "'num_classes' is 3"]),
    ("classes", ["a", "b", "c", "d"], ["'classes' has 4 names"]),
    ("dataset", 7, ["'dataset'", "string) or null"]),
    ("dataset", ["digits"], ["'dataset'"]),
    ("metrics", 3, ["'metrics'", "JSON object"]),
    ("metrics", [0.5], ["'metrics'"]),
    ("normalization", {"mean": [0.5, 0.5], "std": [0.5, 0.5]}, ["'normalization'", "'in_chans' is 1"]),
    ("normalization", {"mean": [0.5], "std": [0.0]}, ["'normalization'", "std > 0"]),
    ("normalization", {"mean": [0.5], "std": [-1.0]}, ["'normalization'"]),
    ("normalization", {"mean": [0.5], "std": ["nan"]}, ["'normalization'"]),
    ("normalization", {"mean": [0.5]}, ["'normalization'"]),
    ("normalization", {"mean": [0.5], "std": [0.5, 0.5]}, ["'normalization'"]),
    ("normalization", [0.5, 0.5], ["'normalization'"]),
    ("trustvision_version", 1, ["'trustvision_version'"]),
    ("training", [1], ["'training'"]),
]


@pytest.mark.parametrize("key,value,words", CONFIG_MUTATIONS,
                         ids=[f"{k}={json.dumps(v)[:20]}" for k, v, _ in CONFIG_MUTATIONS])
def test_config_mutation_is_one_line_naming_key_and_file(ckpt, key, value, words):
    _write(ckpt, **{key: value})
    _one_line(lambda: models.load(ckpt), str(ckpt / "config.json"), *words)


def test_huge_num_classes_is_refused_before_building(ckpt, monkeypatch):
    """num_classes 1e9 would allocate hundreds of GB: nothing may be built for it."""
    built = []
    real = models._factory

    def spy(name):
        built.append(name)
        return real(name)

    monkeypatch.setattr(models, "_factory", spy)
    _write(ckpt, num_classes=10**9, classes=None)
    _one_line(lambda: models.load(ckpt), "'num_classes'")
    assert built == []


@pytest.mark.parametrize("kwargs,words", [
    ({"pretrained": True}, ["pretrained=True"]),
    ({"pretrained": 1}, ["pretrained=1"]),
    ({"weights": "DEFAULT"}, ["weights='DEFAULT'"]),
    ({"checkpoint_path": "/tmp/x.pth"}, ["checkpoint_path="]),
    ({"pretrained_cfg": {"url": "x"}}, ["pretrained_cfg"]),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, ["pretrained_cfg_overlay"]),
    ({"file": "w.bin"}, ["file="]),
    ({"url": "somewhere"}, ["url="]),
    ({"cache_dir": "/tmp"}, ["cache_dir="]),
    ({"init_path": "x"}, ["init_path="]),
    ({"teacher_url": "x"}, ["teacher_url="]),
    ({"vocab_file": "x"}, ["vocab_file="]),
    ({"data_dir": "x"}, ["data_dir="]),
    ({"note": "http://example.com/w.pth"}, ["note="]),
    ({"note": "HTTPS://example.com"}, ["note="]),
    ({"note": "ftp://example.com"}, ["note="]),
    ({"note": "s3://bucket/w"}, ["note="]),
    ({"note": "hf-hub:timm/resnet18"}, ["note="]),
    ({"member_kwargs": {"pretrained": True}}, ["member_kwargs.pretrained"]),
    ({"member_kwargs": {"checkpoint_path": "x"}}, ["member_kwargs.checkpoint_path"]),
    ({"layers": [{"src": "https://x"}]}, ["layers[0].src"]),
])
def test_config_kwargs_that_reach_network_or_files_are_refused(ckpt, kwargs, words):
    _write(ckpt, kwargs=kwargs)
    _one_line(lambda: models.load(ckpt), "refusing to load", str(ckpt / "config.json"), *words)


def test_harmless_kwargs_pass_the_file_check(ckpt):
    from trustvision.models._schema import file_kwarg

    assert file_kwarg({"widths": [4, 8], "pretrained": False, "checkpoint_path": None,
                       "note": "see https later", "member_kwargs": {"dropout": 0.1}}) is None
    _write(ckpt, kwargs={"widths": [4, 8], "dropout": 0.0})
    assert models.load(ckpt).num_classes == 3


def test_kwargs_mean_std_are_checked(ckpt):
    _write(ckpt, kwargs={"widths": [4, 8], "std": [0.0]})
    _one_line(lambda: models.load(ckpt), "std must be", "positive")
    _write(ckpt, kwargs={"widths": [4, 8], "mean": [0.5, 0.5]})
    _one_line(lambda: models.load(ckpt), "mean must be a list of 1")


def test_bad_kwargs_type_in_config(ckpt):
    _write(ckpt, kwargs={"widths": "abc"})
    _one_line(lambda: models.load(ckpt), "cannot rebuild", "'small-cnn'", "widths must be")
    _write(ckpt, kwargs={"colour": "red"})
    _one_line(lambda: models.load(ckpt), "cannot rebuild", "colour")


# --- models.create: factory errors become one line naming the architecture ---------------------

FACTORY_ERRORS = [
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=25), {},
     ["model 'ibinn-small' cannot be built for 1x25x25 images with 2 classes",
      "image size (25, 25) must be divisible by 8 for this layout"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=4), {}, ["at least 8x8"]),
    ("ibinn-small-ff", dict(num_classes=2, in_chans=1, image_size=(8, 12)), {}, ["divisible by 8"]),
    ("ibinn-cifar", dict(num_classes=10, in_chans=3, image_size=30), {}, ["'ibinn-cifar'", "divisible"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"stages": "abc"}, ["stages must be"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"stages": [2, 2]}, ["same length"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"subnet": "mlp"}, ["subnet must be"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"clamp": -1}, ["clamp must be"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"fc_width": 0}, ["fc_width"]),
    ("ibinn-small", dict(num_classes=2, in_chans=1, image_size=8), {"colour": 1}, ["colour"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"widths": "abc"},
     ["model 'small-cnn' cannot be built for 1x8x8 images with 2 classes", "widths must be", "--model-kw"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"widths": []}, ["widths must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"widths": [8, -1]}, ["widths must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"widths": 8}, ["widths must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"dropout": "abc"}, ["dropout must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"dropout": 1.5}, ["dropout must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"colour": "red"},
     ["unexpected keyword argument 'colour'", "--model-kw"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"mean": [0.5, 0.5]}, ["mean must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"std": [0]}, ["std must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=8), {"std": "abc"}, ["std must be"]),
    ("resnet20", dict(num_classes=2, in_chans=1, image_size=8), {"depth": 21}, ["6n+2"]),
    ("resnet20", dict(num_classes=2, in_chans=1, image_size=8), {"depth": "abc"}, ["6n+2"]),
    ("resnet20", dict(num_classes=2, in_chans=1, image_size=8), {"widths": "abc"}, ["widths must be"]),
    ("ensemble", dict(num_classes=2, in_chans=1, image_size=8), {"n": "abc"}, ["'ensemble'"]),
    ("ensemble", dict(num_classes=2, in_chans=1, image_size=8), {"member": "nope"}, ["unknown model 'nope'"]),
    ("ensemble", dict(num_classes=2, in_chans=1, image_size=8),
     {"member": "small-cnn", "n": 2, "member_kwargs": {"widths": "abc"}}, ["widths must be"]),
    ("torchvision:nope", dict(num_classes=2, in_chans=3, image_size=32), {}, ["unknown torchvision model"]),
    ("torchvision:resnet18", dict(num_classes=2, in_chans=3, image_size=32), {"colour": 1}, ["colour"]),
    ("small-cnn", dict(num_classes=-3, in_chans=1, image_size=8), {}, ["num_classes must be", "1 to 100000"]),
    ("small-cnn", dict(num_classes=10**9, in_chans=1, image_size=8), {}, ["num_classes must be"]),
    ("small-cnn", dict(num_classes=2.5, in_chans=1, image_size=8), {}, ["num_classes must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=0, image_size=8), {}, ["in_chans must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=0), {}, ["image_size must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size="8"), {}, ["image_size must be"]),
    ("small-cnn", dict(num_classes=2, in_chans=1, image_size=(8, 8, 8)), {}, ["image_size must be"]),
    (7, dict(num_classes=2, in_chans=1, image_size=8), {}, ["model name must be"]),
]


@pytest.mark.parametrize("name,args,kw,words", FACTORY_ERRORS,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(FACTORY_ERRORS)])
def test_factory_errors_are_one_line(name, args, kw, words):
    _one_line(lambda: models.create(name, **args, **kw), *words)


@pytest.mark.parametrize("name,kw", [
    ("torchvision:resnet18", {"pretrained": True}),
    ("torchvision:resnet18", {"weights": "DEFAULT"}),
    ("timm:resnet18", {"pretrained": True}),
    ("ensemble", {"member": "torchvision:resnet18", "n": 2, "member_kwargs": {"pretrained": True}}),
    ("small-cnn", {"note": "https://example.com/w.pth"}),
])
def test_create_never_downloads(name, kw, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    msg = _one_line(lambda: models.create(name, num_classes=2, in_chans=3, image_size=32, **kw),
                    "never downloads", "models.load(path, architecture=")
    assert "--model-kw" in msg


def test_create_allows_user_named_paths_and_pretrained_false():
    # The user named these (e.g. through --model-kw): allowed at create; refused in a checkpoint.
    net = models.create("small-cnn", num_classes=2, in_chans=1, image_size=8, widths=(4,),
                        dropout=0.0)
    assert net.tv_config["kwargs"] == {"widths": (4,), "dropout": 0.0}
    net = models.create("torchvision:resnet18", num_classes=2, in_chans=3, image_size=32,
                        pretrained=False)
    assert net.num_classes == 2


def test_train_cli_factory_error_is_one_line(tmp_path, capsys):
    from trustvision.cli import main

    code = main(["train", "--data", "faces", "--model", "ibinn-small", "--epochs", "1", "--out",
                 str(tmp_path / "r"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "model 'ibinn-small' cannot be built for 1x25x25 images with 2 classes" in err
    assert "must be divisible by 8" in err
    code = main(["train", "--data", "digits", "--model", "small-cnn", "--model-kw", "widths=abc",
                 "--epochs", "1", "--out", str(tmp_path / "r2"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "widths must be" in err, err
    code = main(["train", "--data", "digits", "--model", "torchvision:resnet18", "--model-kw",
                 "pretrained=true", "--epochs", "1", "--out", str(tmp_path / "r3"), "--no-progress",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "never downloads" in err, err
    assert not (tmp_path / "r3" / "train_state.pt").exists()


# --- zoo names ----------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8, widths=(4, 8))
    models.save(net, root / "good")
    models.save(net, tmp_path / "outside")  # a valid checkpoint outside the zoo folder
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "sub").mkdir()
    models.save(net, root / "sub" / "nested")
    models.save(net, root / ".hidden")
    monkeypatch.setenv("TRUSTVISION_ZOO", str(root))
    return root


@pytest.mark.parametrize("name", [
    "zoo:../outside", "zoo:../../outside", "zoo:good/../../outside", "zoo:escape", "zoo:sub/nested",
    "zoo:sub\\nested", "zoo:.hidden", "zoo:.", "zoo:..", "zoo:", "zoo:/etc", "zoo:ABS",
    "zoo:good/", "zoo:./good", "zoo:nul\x00l", "zoo:c:good",
])
def test_zoo_names_cannot_leave_the_zoo(zoo, name):
    if name == "zoo:ABS":
        name = f"zoo:{zoo.parent / 'outside'}"
    _one_line(lambda: models.load(name), "unknown zoo model", "`trustvision zoo`")


def test_zoo_lists_and_loads_only_entries_inside(zoo):
    assert [e["name"] for e in models.list_zoo()] == ["zoo:good"]
    assert models.load("zoo:good").num_classes == 3


# --- weights: non-finite values, symlinks, non-regular files -------------------------------------


@pytest.mark.parametrize("key,value", [("fc.weight", math.nan), ("fc.bias", math.inf),
                                       ("fc.bias", -math.inf), ("body.0.1.running_var", math.nan),
                                       ("body.0.1.running_mean", math.inf)])
def test_non_finite_weights_are_refused(ckpt, key, value):
    state = models.load(ckpt).state_dict()
    state[key].view(-1)[0] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    _one_line(lambda: models.load(ckpt), "non-finite", repr(key), str(ckpt / "model.safetensors"))


def test_non_finite_foreign_state_dict_is_refused(tmp_path):
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8, widths=(4, 8))
    state = net.state_dict()
    state["fc.weight"][0, 0] = math.nan
    torch.save(state, tmp_path / "w.pt")
    _one_line(lambda: models.load(tmp_path / "w.pt", architecture="small-cnn", num_classes=3,
                                  in_chans=1, image_size=8, widths=[4, 8]), "non-finite", "'fc.weight'")


def test_zero_std_buffer_is_refused(ckpt):
    state = models.load(ckpt).state_dict()
    state["norm_std"].zero_()
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    _one_line(lambda: models.load(ckpt), "std <= 0", "'norm_std'")


def test_symlinks_inside_the_folder_are_fine_outside_refused(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(ckpt / "real.safetensors")
    (ckpt / "model.safetensors").symlink_to("real.safetensors")
    assert models.load(ckpt).num_classes == 3
    (ckpt / "model.safetensors").unlink()
    (ckpt / "real.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _one_line(lambda: models.load(ckpt), "symlink", "outside the checkpoint folder")
    # the weights file itself, named by the user, may be a link
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "w.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (tmp_path / "named" / "config.json").write_text((ckpt / "config.json").read_text())
    assert models.load(tmp_path / "named" / "w.safetensors").num_classes == 3


def test_weights_that_are_not_regular_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    _one_line(lambda: models.load(ckpt), "not a regular file")


def test_oversized_config_is_refused(ckpt, monkeypatch):
    from trustvision.models import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_CONFIG_BYTES", 100)
    _one_line(lambda: models.load(ckpt), "too big", "config.json")


def test_save_drops_timm_init_only_kwargs(tmp_path):
    """A model built with a user-named timm checkpoint_path saves (and reloads) without it."""
    net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8, widths=(4, 8))
    net.tv_config["kwargs"].update(checkpoint_path=str(tmp_path / "init.pth"), pretrained_cfg_overlay={})
    ck = models.save(net, tmp_path / "ck")
    assert json.loads((ck / "config.json").read_text())["kwargs"] == {"widths": [4, 8]}
    assert models.load(ck).tv_config["kwargs"] == {"widths": [4, 8]}
